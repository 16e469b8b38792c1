//! A hedged attempt: the first target's attempt and, once it is late, attempts on the next
//! eligible targets, raced up to the commit point (`routing::hedge` says when and how often).
//! The first to reach it is committed; every other is dropped at once, its connection closed
//! (a provider stops generating, a sidecar frees its slot), its circuit permit handed back
//! without a verdict, and what it used (its prompt, estimated) settled with the request.
//! Nothing is ever hedged after the commit point.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use http::{HeaderName, HeaderValue};

use super::attempt::{
    client_gone, commit, gone, internal, prepare, reach, record, Attempt, Failed, PermitGuard,
    Reached, Try, Upstreams,
};
use super::watch::Watchers;

use crate::openai::LlmRequest;
use crate::proxy::ctx::RequestCtx;
use crate::routing::balance::TargetState;
use crate::routing::hedge::{HedgePolicy, RouteHedging};
use crate::routing::{Route, Target};
use crate::session::Session;
use crate::upstream::health::quota::QuotaHold;
use crate::upstream::health::{InFlight, Outcome};

/// One attempt's hold on its target: what it must give back however it ends.
pub(super) struct Racer<'a> {
    /// Its target's index in `route.targets`.
    pub index: usize,
    pub t: Try<'a>,
    pub permit: PermitGuard,
    pub quota: QuotaHold,
    /// Its provider's in-flight count, until its answer arrived (handed to the watchers when
    /// it commits).
    pub in_flight: Option<InFlight>,
    pub price: Option<crate::price::Price>,
}

/// Takes what an attempt on `target` needs before it starts: a circuit permit (held by a
/// guard from here) and its share of our quota with the provider. `None` when either refuses
/// (the permit is then handed back without a verdict).
pub(super) async fn arm(
    target: &Target,
    state: &TargetState,
    up: &Upstreams<'_>,
) -> Option<(PermitGuard, QuotaHold)> {
    let provider = &*target.provider;
    let circuit = &state.model.circuit;
    let permit = circuit.acquire(up.health.now_ms(), &provider.circuit)?;
    // From here the permit is held by a guard: a half-open trial that never reports (a
    // panic, a dropped future) is handed back, so the circuit cannot stay stuck.
    let mut permit = PermitGuard::new(permit, &state.model);
    // Most providers have no quota. One that has is counted (in Redis, with a fleet) through
    // a boxed future: inline, its state (4.6 KiB) would be part of every request's future,
    // which is moved whole once per request.
    let taken = if provider.quota.is_empty() {
        Ok(QuotaHold::default())
    } else {
        Box::pin(up.quotas.take(&provider.quota, &state.provider, up.health)).await
    };
    match taken {
        Ok(hold) => Some((permit, hold)),
        Err(_) => {
            if let Some(permit) = permit.take() {
                circuit.record(permit, Outcome::Neutral, 0, &provider.circuit);
            }
            None
        }
    }
}

/// The targets a request may hedge to, in the route's plan order after its first attempt's.
pub(super) struct Candidates<'a> {
    pub route: &'a Route,
    pub states: &'a [TargetState],
    /// Target indexes still to consider.
    pub left: std::collections::VecDeque<usize>,
    /// Where and within which bounds the first attempt runs (the hedges share its pool,
    /// retry policy and deadline).
    pub like: Try<'a>,
    pub req: &'a LlmRequest,
    pub config: Option<std::sync::Arc<crate::config::Snapshot>>,
}

impl<'a> Candidates<'a> {
    /// The next target that can take the request now, armed.
    async fn arm_next(&mut self, up: &Upstreams<'_>) -> Option<Racer<'a>> {
        while let Some(i) = self.left.pop_front() {
            let (Some(target), Some(state)) = (self.route.targets.get(i), self.states.get(i))
            else {
                continue;
            };
            let now_ms = up.health.now_ms();
            let suited = super::request::unsuited(self.req, target).is_none();
            if !suited
                || state
                    .provider
                    .availability(&state.model, now_ms, &target.provider.circuit)
                    .is_err()
            {
                continue;
            }
            let Some((permit, quota)) = arm(target, state, up).await else {
                continue;
            };
            let price = self
                .config
                .as_ref()
                .and_then(|c| c.routes.price(target, &self.req.model));
            return Some(Racer {
                index: i,
                t: Try {
                    target,
                    state,
                    ..self.like
                },
                permit,
                quota,
                in_flight: Some(state.provider.enter()),
                price,
            });
        }
        None
    }
}

/// How a hedged attempt ended: the attempt that answered (or the last that failed), and its
/// hold, which the attempt loop settles as it settles any attempt.
pub(super) struct Raced<'a> {
    pub racer: Racer<'a>,
    pub attempt: Attempt,
    /// The targets hedges were started on (each an attempt of the request).
    pub hedged: Vec<usize>,
}

type Reaching<'a> = Pin<Box<dyn Future<Output = Result<Reached, Failed>> + Send + 'a>>;

/// An attempt in the race: its hold, and its way to the commit point while it is on it.
struct Runner<'a> {
    racer: Racer<'a>,
    reaching: Option<Reaching<'a>>,
    /// How it failed, once it did.
    failed: Option<Failed>,
}

/// What the race needs besides the attempts.
pub(super) struct Race<'r> {
    pub policy: &'r HedgePolicy,
    pub learnt: &'r RouteHedging,
    pub route: &'r str,
}

/// Races `primary` and, each the route's delay after the one before, hedges on the next of
/// `next` (at most `policy.max`, each within the route's budget).
#[allow(clippy::too_many_arguments)]
pub(super) async fn race<'a>(
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &LlmRequest,
    primary: Racer<'a>,
    mut next: Candidates<'a>,
    race: Race<'_>,
    up: &'a Upstreams<'a>,
    watch: &mut Watchers,
) -> Raced<'a> {
    let whole = |price: &Option<crate::price::Price>, watch: &Watchers| {
        price.is_some() && watch.capture.is_none()
    };
    let start = |t: Try<'a>, outgoing| -> Reaching<'a> {
        Box::pin(async move { reach(&t, outgoing, up.health).await })
    };
    let outgoing = match prepare(
        session,
        ctx,
        req,
        primary.t.target,
        whole(&primary.price, watch),
    ) {
        Ok(outgoing) => outgoing,
        Err(e) => {
            return Raced {
                racer: primary,
                attempt: internal(e),
                hedged: Vec::new(),
            }
        }
    };
    let delay = race.learnt.delay(race.policy.after);
    let started = Instant::now();
    // The first attempt, and the hedges started after it (index 0 is the first).
    let mut runners = Runners {
        first: Runner {
            reaching: Some(start(primary.t, outgoing)),
            racer: primary,
            failed: None,
        },
        hedges: Vec::new(),
    };
    let mut hedging = true;
    let mut hedged = Vec::new();
    let mut due = Instant::now().checked_add(delay);
    loop {
        let hedges = runners.hedges.len();
        let next_due = due.filter(|_| hedging && hedges < race.policy.max);
        tokio::select! {
            (at, result) = first_of(&mut runners) => match result {
                Ok(reached) => {
                    let (winner, others) = runners.take(at);
                    // The others stop now: dropped, their connections close.
                    for other in others {
                        end(ctx, other, up).await;
                    }
                    if hedges > 0 {
                        let outcome = if at == 0 { "lost" } else { "won" };
                        up.metrics.hedges.with_label_values(&[race.route, outcome]).inc();
                    }
                    // The route learns its first target's time to first byte; when a hedge won,
                    // that time is unknown, and the wait so far is a lower bound of it (a
                    // bound that never turns hedging off, as "the longest" would once the
                    // first target is slow more often than the percentile allows).
                    race.learnt.observe_ttft(started.elapsed());
                    let mut racer = winner.racer;
                    ctx.provider = Some(racer.t.target.provider.name.clone());
                    ctx.price = racer.price;
                    // The watchers give it back as soon as the answer is in.
                    if let Some(in_flight) = racer.in_flight.take() {
                        watch.in_flight(in_flight);
                    }
                    let t = racer.t;
                    let attempt =
                        commit(session, ctx, req, &t, reached, &mut racer.permit, up, watch).await;
                    return Raced { racer, attempt, hedged };
                }
                Err(failed) => {
                    // Before a hedge starts, a failure goes back to the loop (which falls
                    // back as usual); after, the race goes on while one is on its way.
                    if !runners.any_reaching_but(at) {
                        let (last, others) = runners.take(at);
                        for other in others {
                            end(ctx, other, up).await;
                        }
                        return Raced {
                            racer: last.racer,
                            attempt: Attempt::Failed(failed),
                            hedged,
                        };
                    }
                    if let Some(runner) = runners.get_mut(at) {
                        runner.reaching = None;
                        runner.failed = Some(failed);
                    }
                }
            },
            () = sleep_until(next_due), if next_due.is_some() => {
                due = Instant::now().checked_add(delay);
                if !race.learnt.may_hedge(race.policy.budget) {
                    up.metrics.hedges.with_label_values(&[race.route, "skipped_budget"]).inc();
                    hedging = false;
                    continue;
                }
                let Some(hedge) = next.arm_next(up).await else {
                    hedging = false;
                    continue;
                };
                match prepare(session, ctx, req, hedge.t.target, whole(&hedge.price, watch)) {
                    Ok(outgoing) => {
                        race.learnt.count_hedge();
                        if hedges == 0 {
                            ctx.response_headers.push((
                                HeaderName::from_static("x-lumen-hedged"),
                                HeaderValue::from_static("1"),
                            ));
                        }
                        hedged.push(hedge.index);
                        // An attempt of the request (its `x-lumen-attempts` says so).
                        ctx.attempts = ctx.attempts.saturating_add(1);
                        runners.hedges.push(Runner {
                            reaching: Some(start(hedge.t, outgoing)),
                            racer: hedge,
                            failed: None,
                        });
                    }
                    // This target cannot carry the request: no hedge after all.
                    Err(_) => give_back(hedge, up, Outcome::Neutral, 0).await,
                }
            }
            () = client_gone(session) => {
                let (first, others) = runners.take(0);
                for other in others {
                    end(ctx, other, up).await;
                }
                return Raced { racer: first.racer, attempt: gone(), hedged };
            }
        }
    }
}

/// The attempts of a race: the first, and its hedges.
struct Runners<'a> {
    first: Runner<'a>,
    hedges: Vec<Runner<'a>>,
}

impl<'a> Runners<'a> {
    fn get_mut(&mut self, at: usize) -> Option<&mut Runner<'a>> {
        match at.checked_sub(1) {
            None => Some(&mut self.first),
            Some(h) => self.hedges.get_mut(h),
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Runner<'a>> {
        std::iter::once(&mut self.first).chain(self.hedges.iter_mut())
    }

    /// Whether an attempt other than `at` is still on its way.
    fn any_reaching_but(&mut self, at: usize) -> bool {
        self.iter_mut()
            .enumerate()
            .any(|(i, r)| i != at && r.reaching.is_some())
    }

    /// Attempt `at` (the first when there is no such hedge), and all the others.
    fn take(self, at: usize) -> (Runner<'a>, Vec<Runner<'a>>) {
        let Runners { first, mut hedges } = self;
        match at.checked_sub(1).filter(|h| *h < hedges.len()) {
            None => (first, hedges),
            Some(h) => {
                let chosen = hedges.swap_remove(h);
                hedges.push(first);
                (chosen, hedges)
            }
        }
    }
}

/// Ends an attempt that did not win: a failed one is recorded as the loop records failures;
/// one still on its way is dropped (a lost hedge), its permit handed back without a verdict,
/// its prompt counted as used.
async fn end(ctx: &mut RequestCtx, runner: Runner<'_>, up: &Upstreams<'_>) {
    let Runner {
        racer,
        reaching,
        failed,
    } = runner;
    drop(reaching);
    let provider = &racer.t.target.provider;
    match failed {
        Some(failed) => {
            up.metrics
                .attempts
                .with_label_values(&[provider.name.as_str(), failed.failure.label()])
                .inc();
            let outcome = if failed.failure.is_provider_fault() {
                Outcome::Failure
            } else {
                Outcome::Neutral
            };
            racer.t.state.provider.set_error(failed.error.to_string());
            give_back(racer, up, outcome, 0).await;
        }
        None => {
            up.metrics
                .attempts
                .with_label_values(&[provider.name.as_str(), "hedge_lost"])
                .inc();
            // It was sent the whole prompt: that much is spent, at its target's price.
            let prompt = ctx.prompt_estimate;
            let cost = racer.price.map_or(0, |p| {
                p.cost(&lumen_plugins::sse::usage::UsageReport {
                    prompt,
                    ..Default::default()
                })
            });
            ctx.hedge_spent = (
                ctx.hedge_spent.0.saturating_add(prompt),
                ctx.hedge_spent.1.saturating_add(cost),
            );
            give_back(racer, up, Outcome::Neutral, prompt).await;
        }
    }
}

/// Gives back what an attempt held: its circuit permit (with `outcome`), its quota (settled
/// with `used` tokens) and its in-flight count.
async fn give_back(mut racer: Racer<'_>, up: &Upstreams<'_>, outcome: Outcome, used: u64) {
    if let Some(permit) = racer.permit.take() {
        record(up, &racer.t, permit, outcome);
    }
    up.quotas.settle(racer.quota, used).await;
    drop(racer.in_flight);
}

/// The first of the attempts still on their way to reach the commit point (or fail): its
/// index and how it went. Pending while none is on its way.
async fn first_of(runners: &mut Runners<'_>) -> (usize, Result<Reached, Failed>) {
    std::future::poll_fn(|cx| {
        for (i, runner) in runners.iter_mut().enumerate() {
            if let Some(reaching) = runner.reaching.as_mut() {
                if let Poll::Ready(result) = reaching.as_mut().poll(cx) {
                    return Poll::Ready((i, result));
                }
            }
        }
        Poll::Pending
    })
    .await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
