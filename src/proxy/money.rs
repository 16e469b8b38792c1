//! Dollars at their pipeline steps: a request's worst case reserved under the caller's
//! budgets (its key's or JWT's, and its tenant's) at step 10, after its tokens; its cost worked
//! out from the usage the provider reported and settled when it ends, with its tokens. Through
//! Redis when configured (one script to reserve, one to settle), else in this process; when
//! Redis fails, `on_redis_error` decides (fail-open spends this node's `local_budget_share`).
//!
//! The worst case is the prompt's estimate and the completion budget (`max_tokens`, or the
//! default) at the route's dearest target, so no fallback can spend more than was reserved.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderName, HeaderValue};
use lumen_plugins::auth::Principal;
use lumen_plugins::budget::shared::SharedBudgetGuard;
use lumen_plugins::budget::{format_usd, BudgetId, Charge, Exceeded, Micros, Standing};
use lumen_plugins::rate_limit::shared::OnRedisError;
use lumen_plugins::rate_limit::{LimitReason, Limited};
use lumen_plugins::sse::usage::UsageReport;

use super::ctx::{MoneyHold, MoneyReservation as Hold, RequestCtx};
use super::gateway::Gateway;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::openai::{LlmRequest, DEFAULT_COMPLETION_TOKENS};
use crate::routing::Route;

/// What is left of the caller's tightest budget window, after this request's reservation.
const X_LUMEN_BUDGET_REMAINING: HeaderName =
    HeaderName::from_static("x-lumen-budget-remaining-usd");

/// Why no dollars could be reserved.
pub enum Refused {
    /// A budget would go over.
    Exceeded(Exceeded),
    /// Redis could not be asked and `on_redis_error: fail_closed` is set.
    Unavailable(Limited),
    /// A target of the route has no price for the model: its cost could not be counted.
    Unpriced { provider: String },
}

/// Whether a dollar budget may apply to the caller (its own, or its tenant's): most callers
/// have none, and pay nothing for the feature.
pub fn has_budget(principal: &Principal, config: &Snapshot) -> bool {
    principal.budget.is_some()
        || principal
            .tenant
            .as_deref()
            .is_some_and(|t| config.tenants.contains_key(t))
}

/// The budgets a caller's request is charged under: its own (a key's `budget:`, a JWT's
/// `budget_usd` claim), then its tenant's.
pub fn charges(principal: &Principal, config: &Snapshot) -> Vec<Charge> {
    let mut charges = Vec::new();
    if !has_budget(principal, config) {
        return charges;
    }
    if let Some(budget) = &principal.budget {
        charges.push(Charge {
            id: BudgetId::key(&principal.key_id),
            budget: budget.clone(),
        });
    }
    if let Some((tenant, budget)) = principal
        .tenant
        .as_deref()
        .and_then(|t| Some((t, config.tenants.get(t)?)))
    {
        charges.push(Charge {
            id: BudgetId::tenant(tenant),
            budget: budget.clone(),
        });
    }
    charges
}

/// What `ctx`'s request cost, from the usage its provider reported (or, for an answer cut
/// short, what was sent and streamed), at the price of the target that answered. A cache hit
/// or a coalesced answer costs nothing; an answer from a target without a price is `None`.
pub fn cost_of(ctx: &RequestCtx) -> Option<Micros> {
    if matches!(ctx.cache, Some("hit" | "coalesced")) {
        return Some(0);
    }
    let hedges = ctx.hedge_spent.1;
    let Some(price) = ctx.price else {
        return (hedges > 0).then_some(hedges);
    };
    let usage = match (ctx.usage_split, ctx.usage_estimate) {
        (Some((prompt, completion)), _) => UsageReport {
            prompt,
            completion,
            cached: ctx.usage_detail.0,
            reasoning: ctx.usage_detail.1,
        },
        (None, Some(total)) => {
            let prompt = ctx.prompt_estimate.min(total);
            UsageReport {
                prompt,
                completion: total.saturating_sub(prompt),
                ..UsageReport::default()
            }
        }
        // No answer: nothing was generated.
        (None, None) => return Some(hedges),
    };
    Some(price.cost(&usage).saturating_add(hedges))
}

impl Gateway {
    /// Step 10 (dollars): reserves the request's worst case under the caller's budgets: `None`
    /// when it has none. [`Gateway::hold_money`] applies the outcome.
    pub(super) async fn reserve_money(
        &self,
        principal: &Principal,
        req: &LlmRequest,
        route: &Route,
        config: &Snapshot,
        hedges: u64,
    ) -> Option<Result<(MoneyHold, Standing), Refused>> {
        let charges = charges(principal, config);
        if charges.is_empty() {
            return None;
        }
        let (prompt, completion) = req.token_split(DEFAULT_COMPLETION_TOKENS);
        // The dearest target's worst case, and on a hedged route the dearest prompt once more
        // per hedge. A target without a price could spend anything: a budgeted caller is not
        // sent there.
        let mut amount = 0;
        let mut hedge_prompt = 0;
        for target in &route.targets {
            match config.routes.price(target, &req.model) {
                Some(price) => {
                    amount = amount.max(price.worst_case(prompt, completion));
                    hedge_prompt = hedge_prompt.max(price.worst_case(prompt, 0));
                }
                None => {
                    return Some(Err(Refused::Unpriced {
                        provider: target.provider.name.clone(),
                    }))
                }
            }
        }
        let amount = amount.saturating_add(hedge_prompt.saturating_mul(hedges));
        let local = |charges: &[Charge]| {
            self.node
                .budgets
                .reserve(charges, amount, SystemTime::now())
                .map(|(r, standing)| (Hold::Local(r), standing))
        };
        let result = match &self.node.redis {
            None => local(&charges),
            Some(redis) => match Box::pin(redis.budgets.reserve(&charges, amount)).await {
                Ok(result) => result.map(|(r, standing)| {
                    (
                        Hold::Shared(SharedBudgetGuard::new(redis.budgets.clone(), r)),
                        standing,
                    )
                }),
                Err(unanswered) => match self.redis_failed_for(&unanswered.error, "budget") {
                    OnRedisError::FailOpen => {
                        // This node's share of each budget, counted here until Redis is back;
                        // the cost is owed to the fleet's budgets (refunded if not admitted).
                        let owed = SharedBudgetGuard::unanswered(redis.budgets.clone(), unanswered);
                        let share: Vec<Charge> = charges
                            .iter()
                            .map(|c| Charge {
                                id: c.id.clone(),
                                budget: Arc::new(c.budget.share(redis.local_budget_share)),
                            })
                            .collect();
                        self.node
                            .budgets
                            .reserve(&share, amount, SystemTime::now())
                            .map(|(local, standing)| (Hold::FailedOpen { local, owed }, standing))
                    }
                    OnRedisError::FailClosed => {
                        drop(SharedBudgetGuard::unanswered(
                            redis.budgets.clone(),
                            unanswered,
                        ));
                        let limited = Limited::for_a_second(0, LimitReason::Unavailable);
                        return Some(Err(Refused::Unavailable(limited)));
                    }
                },
            },
        };
        Some(match result {
            Ok((hold, standing)) => Ok((MoneyHold { hold, charges }, standing)),
            Err(exceeded) => Err(Refused::Exceeded(exceeded)),
        })
    }

    /// Keeps a dollar reservation in `ctx` with `x-lumen-budget-remaining-usd`, or turns a
    /// refusal into the error to answer (429 `budget_exceeded`, `Retry-After` until its window
    /// resets).
    pub(super) fn hold_money(
        &self,
        ctx: &mut RequestCtx,
        result: Option<Result<(MoneyHold, Standing), Refused>>,
    ) -> Result<(), GatewayError> {
        match result {
            None => Ok(()),
            Some(Ok((hold, standing))) => {
                push_remaining(ctx, &standing);
                ctx.money = Some(hold);
                Ok(())
            }
            Some(Err(Refused::Exceeded(exceeded))) => Err(self.refuse_budget(ctx, &exceeded)),
            Some(Err(Refused::Unavailable(limited))) => Err(self.refuse(ctx, &limited)),
            Some(Err(Refused::Unpriced { provider })) => Err(GatewayError::Unpriced {
                model: ctx.model.clone().unwrap_or_default(),
                provider,
            }),
        }
    }

    /// `x-lumen-budget-remaining-usd` for an answer that reserves nothing (a cache hit): what
    /// is left of the caller's tightest window now. Nothing when the store cannot say.
    pub(super) async fn peek_money(
        &self,
        ctx: &mut RequestCtx,
        principal: &Principal,
        config: &Snapshot,
    ) {
        let mut tightest: Option<Standing> = None;
        for charge in charges(principal, config) {
            let windows = match &self.node.redis {
                None => self
                    .node
                    .budgets
                    .status(&charge.id, &charge.budget, SystemTime::now()),
                Some(redis) => match Box::pin(redis.budgets.status(&charge)).await {
                    Ok(windows) => windows,
                    Err(e) => {
                        self.redis_failed_for(&e, "budget");
                        return;
                    }
                },
            };
            for w in windows {
                if tightest.is_none_or(|t| w.remaining < t.remaining) {
                    tightest = Some(Standing {
                        remaining: w.remaining,
                        reset_after: std::time::Duration::from_millis(w.resets_in_ms),
                    });
                }
            }
        }
        if let Some(standing) = tightest {
            push_remaining(ctx, &standing);
        }
    }

    /// A budget refusal: what is left, `Retry-After` until the window resets, the metric.
    fn refuse_budget(&self, ctx: &mut RequestCtx, exceeded: &Exceeded) -> GatewayError {
        push_remaining(
            ctx,
            &Standing {
                remaining: exceeded.remaining,
                reset_after: exceeded.retry_after,
            },
        );
        let secs = exceeded
            .retry_after
            .as_secs()
            .saturating_add(u64::from(exceeded.retry_after.subsec_nanos() > 0))
            .max(1);
        ctx.response_headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(secs)));
        self.metrics
            .rate_limited
            .with_label_values(&[ctx.key_label(), "budget"])
            .inc();
        GatewayError::BudgetExceeded {
            scope: if exceeded.id.scope() == "tenant" {
                "tenant"
            } else {
                "key"
            },
            period: exceeded.period.label(),
            remaining: format_usd(exceeded.remaining),
        }
    }

    /// Works out the request's cost (into `ctx.cost`) and settles its dollar reservation with
    /// it; a budget's used share goes to `lumen_budget_used_ratio`. What was settled is gone
    /// from `ctx`: a second call only works the cost out again.
    /// (The cost is worked out now; the settling, which may wait on Redis, is the returned
    /// future, so that the caller can run it beside the token budget's.)
    pub(super) fn settle_money(
        &self,
        ctx: &mut RequestCtx,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        ctx.cost = cost_of(ctx);
        if let (Some(token), Some(cost)) = (&ctx.job_token, ctx.cost) {
            self.node.jobs.note_cost(token, cost);
        }
        let money = ctx.money.take();
        let actual = ctx.cost.unwrap_or(0);
        let configured = ctx.principal.as_ref().is_some_and(|p| p.configured);
        async move {
            if let Some(money) = money {
                self.settle_budgets(money, actual, configured).await;
            }
        }
    }

    /// Replaces a dollar reservation with the cost `actual`, and updates the used share of
    /// configured keys' (`configured`) and tenants' budgets.
    async fn settle_budgets(&self, money: MoneyHold, actual: Micros, configured: bool) {
        let MoneyHold { hold, charges } = money;
        let ratios = match hold {
            Hold::Local(r) => r.settle(actual, &charges, SystemTime::now()),
            Hold::Shared(mut guard) => {
                let (Some(r), Some(redis)) = (guard.take(), &self.node.redis) else {
                    return;
                };
                match Box::pin(redis.budgets.settle(&r, actual)).await {
                    Ok(spent) => ratios_of(&charges, &spent),
                    Err(e) => {
                        self.redis_failed_for(&e, "budget");
                        // A settlement applies once however often it is sent: sent again off
                        // the request's path (else the reservation is released when held past
                        // its time, and this cost is not counted).
                        redis.budgets.settle_later(r, actual);
                        return;
                    }
                }
            }
            Hold::FailedOpen { local, owed } => {
                // Served while Redis could not be asked: the fleet's budgets are charged once
                // it answers, so their totals still equal what was spent.
                owed.owe(actual);
                local.settle(actual, &charges, SystemTime::now())
            }
        };
        for (charge, ratio) in charges.iter().zip(ratios) {
            // Configured keys and tenants only (tenant budgets come from the config): a JWT's
            // subjects are unbounded as labels.
            let name = charge.id.name();
            let labelled = charge.id.scope() == "tenant" || configured;
            if labelled {
                let labels = [charge.id.scope(), name];
                self.metrics
                    .budget_used
                    .with_label_values(&labels)
                    .set(ratio);
                if let Some(alert_at) = charge.budget.alert_at {
                    self.metrics
                        .budget_alert
                        .with_label_values(&labels)
                        .set(alert_at);
                }
            }
        }
    }
}

/// The highest share used per budget, from what each window charged now holds (windows in
/// the order the budgets' `limits()` give them, budget after budget).
fn ratios_of(charges: &[Charge], spent: &[Micros]) -> Vec<f64> {
    let mut spent = spent.iter();
    charges
        .iter()
        .map(|c| {
            c.budget
                .limits()
                .map(|(_, limit)| {
                    spent
                        .next()
                        .map_or(0.0, |s| *s as f64 / limit.max(1) as f64)
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

/// `x-lumen-budget-remaining-usd`: the tightest window's remainder.
fn push_remaining(ctx: &mut RequestCtx, standing: &Standing) {
    ctx.response_headers
        .retain(|(k, _)| *k != X_LUMEN_BUDGET_REMAINING);
    if let Ok(v) = HeaderValue::from_str(&format_usd(standing.remaining)) {
        ctx.response_headers.push((X_LUMEN_BUDGET_REMAINING, v));
    }
}
