//! The routing table: a client-facing model name → a route with ordered targets.
//!
//! Exact names win over patterns, and among patterns the first one in the file wins. A provider
//! with `expose_models: true` also answers `provider/model` directly. Ordering a route's targets
//! for one request (strategy, health) is `balance`'s job; trying them is `forward`'s.
//!
//! Imports: `config` (raw routes, problems), `upstream` (providers, health, retry policies),
//! the plugins; never `proxy`.

pub mod affinity;
pub mod balance;
pub mod hedge;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;

use lumen_plugins::rate_limit::RequestLimit;

use crate::config::problem::Problem;
use crate::config::raw::{RawRetry, RawRoute, Strategy};
use crate::metrics::RouteSeries;
use crate::price::{Price, PriceTable};
use crate::upstream::provider::Provider;
use crate::upstream::retry::{self, RetryPolicy};
use lumen_plugins::cache::CachePolicy;
pub use lumen_plugins::glob::glob_match;

/// A configured model name and where requests for it go.
#[derive(Debug)]
pub struct Route {
    /// The model name or pattern as written in the config; also the `route` metrics label.
    pub name: String,
    pub strategy: Strategy,
    /// Prefer the target whose cache holds the request's conversation (`affinity`).
    pub prefix_affinity: bool,
    pub targets: Vec<Target>,
    /// Requests per key on this route, on top of the key's own limits.
    pub limits: Option<RequestLimit>,
    /// The rate-limit bucket suffix for this route (`|route:NAME`), built once.
    pub bucket_suffix: String,
    pub retry: RetryPolicy,
    /// Requests so far: the round-robin and weighted position.
    pub turn: AtomicUsize,
    /// Smooth weighted round robin, unrolled once at load: target indexes in the order the
    /// weights give (`weighted` only).
    pub weighted_order: Vec<usize>,
    /// The route's cache policy; `None`: never cached.
    pub cache: Option<CachePolicy>,
    /// Its metric series, resolved on first use.
    pub series: RouteSeries,
    /// Race the next target when the first is slow to answer.
    pub hedge: Option<hedge::HedgePolicy>,
}

/// One place a route can send a request.
#[derive(Debug)]
pub struct Target {
    pub provider: Arc<Provider>,
    /// The provider's model name, JSON-encoded (with quotes) so it can be spliced into the
    /// body as is; `None` keeps the client's model name (pattern routes, exposed providers).
    pub model_json: Option<Bytes>,
    /// Which per-model health state this target uses: the model name from the config, or
    /// `*` when the client's model name is passed through (client strings never become
    /// state or metric labels).
    pub health_key: String,
    pub weight: u32,
    /// What the provider charges for this model; `None`: no price known (counted as free).
    /// A target that keeps the client's model name is priced per request
    /// ([`RouteTable::price`]).
    pub price: Option<Price>,
}

impl Target {
    fn new(provider: Arc<Provider>, model: Option<&str>, weight: u32, prices: &PriceTable) -> Self {
        Target {
            price: model.and_then(|m| prices.lookup(&provider.name, m)),
            model_json: model.map(|m| Bytes::from(serde_json::to_vec(m).unwrap_or_default())),
            health_key: model.unwrap_or("*").to_string(),
            provider,
            weight,
        }
    }

    /// The model name the provider is sent, as configured (`*`: the client's).
    pub fn model_name(&self) -> &str {
        &self.health_key
    }
}

/// The longest unrolled weighted order; larger weight sums are scaled down to fit.
const MAX_WEIGHTED_ORDER: u64 = 1000;

/// nginx's smooth weighted round robin, unrolled over one full cycle: each step every target
/// gains its weight, the largest is picked and pays back the total. Heavy targets are spread
/// out rather than picked in runs (weights 5,1,1 give a a b a c a a, not a a a a a b c).
pub fn smooth_weighted_order(weights: &[u32]) -> Vec<usize> {
    let gcd = weights
        .iter()
        .fold(0u64, |g, &w| num_gcd(g, u64::from(w)))
        .max(1);
    let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w) / gcd).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_WEIGHTED_ORDER {
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = (*x * MAX_WEIGHTED_ORDER / sum).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &wi) in current.iter_mut().zip(&w) {
            *c += wi as i64;
        }
        let Some(best) = (0..w.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i))) else {
            break;
        };
        current[best] -= total;
        order.push(best);
    }
    order
}

fn num_gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        num_gcd(b, a % b)
    }
}

/// All routes of one snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<Route>>,
    patterns: Vec<(String, Arc<Route>)>,
    /// Providers reachable as `provider/model`.
    exposed: HashMap<String, Arc<Provider>>,
    /// Exact route names in file order, for `GET /v1/models`.
    listed: Vec<String>,
    /// The prices targets were priced with; a target that keeps the client's model name is
    /// priced from it per request.
    prices: Arc<PriceTable>,
}

impl RouteTable {
    /// Compiles the routes, pushing a `Problem` for each unknown provider, duplicate model name
    /// or empty target list.
    pub fn build(
        raw: &[RawRoute],
        providers: &HashMap<String, Arc<Provider>>,
        prices: &Arc<PriceTable>,
        problems: &mut Vec<Problem>,
    ) -> RouteTable {
        let mut table = RouteTable {
            prices: prices.clone(),
            exposed: providers
                .iter()
                .filter(|(_, p)| p.expose_models)
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            ..RouteTable::default()
        };
        for (i, r) in raw.iter().enumerate() {
            if r.model.is_empty() {
                problems.push(Problem::at(
                    format!("routes[{i}].model"),
                    "must not be empty",
                ));
                continue;
            }
            if r.targets.is_empty() {
                problems.push(Problem::at(
                    format!("routes[{i}].targets"),
                    format!("route `{}` has no targets", r.model),
                ));
                continue;
            }
            let mut targets = Vec::with_capacity(r.targets.len());
            for (j, t) in r.targets.iter().enumerate() {
                match providers.get(&t.provider) {
                    Some(p) => {
                        if t.weight == 0 && r.strategy == Strategy::Weighted {
                            problems.push(Problem::at(
                                format!("routes[{i}].targets[{j}].weight"),
                                "must be at least 1 (remove the target to stop using it)",
                            ));
                        }
                        targets.push(Target::new(p.clone(), t.model.as_deref(), t.weight, prices))
                    }
                    None => {
                        let mut known: Vec<&str> = providers.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        problems.push(Problem::at(
                            format!("routes[{i}].targets[{j}].provider"),
                            format!(
                                "unknown provider `{}` (known: {})",
                                t.provider,
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            let limits = match r.limits.as_ref().map(|l| l.to_limit()) {
                None => None,
                Some(Ok(limit)) => Some(limit),
                Some(Err(e)) => {
                    problems.push(Problem::at(format!("routes[{i}].limits"), e));
                    None
                }
            };
            let retry = match retry_policy(r.retry.as_ref(), targets.len()) {
                Ok(policy) => policy,
                Err(e) => {
                    problems.push(Problem::at(format!("routes[{i}].retry"), e));
                    RetryPolicy::default_for(targets.len())
                }
            };
            let weighted_order = if r.strategy == Strategy::Weighted {
                smooth_weighted_order(&targets.iter().map(|t| t.weight).collect::<Vec<_>>())
            } else {
                Vec::new()
            };
            let cache = r.cache.as_ref().map(|c| CachePolicy {
                ttl: c.ttl,
                scope: c.scope,
                max_entry_bytes: c.max_entry_bytes.0,
                when: c.when,
                charge_tokens: c.charge_tokens,
            });
            if cache.as_ref().is_some_and(|c| c.ttl.is_zero()) {
                problems.push(Problem::at(
                    format!("routes[{i}].cache.ttl"),
                    "must be above zero (remove `cache:` to turn caching off)",
                ));
            }
            let hedge = match r.hedge.as_ref().map(hedge::HedgePolicy::build) {
                None => None,
                Some(Ok(policy)) if targets.len() > 1 => Some(policy),
                Some(Ok(_)) => {
                    problems.push(Problem::at(
                        format!("routes[{i}].hedge"),
                        "needs a second target to hedge to",
                    ));
                    None
                }
                Some(Err(e)) => {
                    problems.push(Problem::at(format!("routes[{i}].hedge"), e));
                    None
                }
            };
            let route = Arc::new(Route {
                hedge,
                cache,
                bucket_suffix: format!("|route:{}", r.model),
                name: r.model.clone(),
                strategy: r.strategy,
                prefix_affinity: r.prefix_affinity,
                targets,
                limits,
                retry,
                turn: AtomicUsize::new(0),
                weighted_order,
                series: RouteSeries::default(),
            });
            let duplicate = if is_pattern(&r.model) {
                let dup = table.patterns.iter().any(|(p, _)| p == &r.model);
                table.patterns.push((r.model.clone(), route));
                dup
            } else {
                table.listed.push(r.model.clone());
                table.exact.insert(r.model.clone(), route).is_some()
            };
            if duplicate {
                problems.push(Problem::at(
                    format!("routes[{i}].model"),
                    format!("model `{}` is routed twice", r.model),
                ));
            }
        }
        table
    }

    /// The route for a client's model name, if any.
    pub fn resolve(&self, model: &str) -> Option<Arc<Route>> {
        if let Some(route) = self.exact.get(model) {
            return Some(route.clone());
        }
        if let Some((_, route)) = self.patterns.iter().find(|(p, _)| glob_match(p, model)) {
            return Some(route.clone());
        }
        let (provider, upstream_model) = model.split_once('/')?;
        let provider = self.exposed.get(provider)?;
        Some(Arc::new(Route {
            name: format!("{}/*", provider.name),
            strategy: Strategy::Priority,
            prefix_affinity: false,
            targets: vec![Target {
                health_key: "*".to_string(),
                ..Target::new(provider.clone(), Some(upstream_model), 1, &self.prices)
            }],
            limits: None,
            bucket_suffix: String::new(),
            retry: RetryPolicy::default_for(1),
            turn: AtomicUsize::new(0),
            weighted_order: Vec::new(),
            cache: None,
            series: RouteSeries::default(),
            hedge: None,
        }))
    }

    /// The price of `target` for a request for `model`: its own, or for a target that keeps
    /// the client's model name, that name's.
    pub fn price(&self, target: &Target, model: &str) -> Option<Price> {
        match (&target.price, &target.model_json) {
            (Some(p), _) => Some(*p),
            (None, Some(_)) => None,
            (None, None) => self.prices.lookup(&target.provider.name, model),
        }
    }

    /// Every configured route (exact names, then patterns), for readiness.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.listed
            .iter()
            .filter_map(|name| self.exact.get(name))
            .chain(self.patterns.iter().map(|(_, r)| r))
    }

    /// Client-facing model names, in file order (patterns are not listable).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.listed.iter().map(String::as_str)
    }
}

fn is_pattern(model: &str) -> bool {
    model.contains(['*', '?'])
}

/// The retry policy for a route with `targets` targets. Unset, every target is tried once, plus
/// one more attempt (so a single-target route retries once), on every retryable failure.
fn retry_policy(raw: Option<&RawRetry>, targets: usize) -> Result<RetryPolicy, String> {
    let mut policy = RetryPolicy::default_for(targets);
    let Some(raw) = raw else {
        return Ok(policy);
    };
    if let Some(attempts) = raw.attempts {
        if !(1..=retry::MAX_ATTEMPTS).contains(&attempts) {
            return Err(format!(
                "attempts must be between 1 and {}, not {attempts}",
                retry::MAX_ATTEMPTS
            ));
        }
        policy.attempts = attempts;
    }
    if let Some(on) = &raw.on {
        policy.connect = false;
        policy.timeout = false;
        policy.dropped = false;
        policy.status_429 = false;
        policy.status_5xx = false;
        for item in on {
            match item.as_str() {
                "connect" => policy.connect = true,
                "timeout" => policy.timeout = true,
                "dropped" => policy.dropped = true,
                "429" => policy.status_429 = true,
                "5xx" => policy.status_5xx = true,
                code => match code.parse::<u16>() {
                    Ok(c) if (400..600).contains(&c) => policy.statuses.push(c),
                    _ => {
                        return Err(format!(
                            "unknown failure `{code}` in `on` (use connect, timeout, dropped, 429, 5xx, or a status code 400-599)"
                        ))
                    }
                },
            }
        }
    }
    if raw.backoff.max < raw.backoff.base {
        return Err("backoff.max must not be below backoff.base".into());
    }
    policy.backoff_base = raw.backoff.base;
    policy.backoff_max = raw.backoff.max;
    if raw.deadline.is_some_and(|d| d.is_zero()) {
        return Err("deadline must be above zero".into());
    }
    policy.deadline = raw.deadline;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::{glob_match, retry_policy, smooth_weighted_order};
    use crate::config::raw::{RawBackoff, RawRetry};
    use crate::upstream::retry::Failure;
    use std::time::Duration;

    #[test]
    fn smooth_weighted_order_spreads_heavy_targets() {
        assert_eq!(smooth_weighted_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_weighted_order(&[2, 2]), vec![0, 1]);
        assert_eq!(smooth_weighted_order(&[3, 1]), vec![0, 0, 1, 0]);
        let big = smooth_weighted_order(&[9000, 1000]);
        assert!(big.len() <= 1000);
        let share = big.iter().filter(|&&i| i == 0).count() as f64 / big.len() as f64;
        assert!((share - 0.9).abs() < 0.01, "{share}");
    }

    #[test]
    fn globs_match_like_shells() {
        assert!(glob_match("*embed*", "text-embedding-3-small"));
        assert!(glob_match("*embed*", "embed"));
        assert!(!glob_match("*embed*", "gpt-4o"));
        assert!(glob_match("gpt-4?", "gpt-4o"));
        assert!(!glob_match("gpt-4?", "gpt-4"));
        assert!(glob_match("local/*", "local/tiny"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
    }

    // Retry policies as routes configure them.
    fn raw(on: &[&str]) -> RawRetry {
        RawRetry {
            attempts: Some(4),
            on: Some(on.iter().map(|s| s.to_string()).collect()),
            backoff: RawBackoff {
                base: Duration::from_millis(100),
                max: Duration::from_millis(500),
            },
            deadline: Some(Duration::from_secs(3)),
        }
    }

    #[test]
    fn defaults_retry_everything_once_per_target_plus_one() {
        let p = retry_policy(None, 3).unwrap();
        assert_eq!(p.attempts, 4);
        for f in [
            Failure::Connect,
            Failure::Timeout,
            Failure::Dropped,
            Failure::Status(429),
            Failure::Status(503),
        ] {
            assert!(p.retries(f), "{f:?}");
        }
        assert!(!p.retries(Failure::Status(400)));
        assert!(!p.retries(Failure::Status(404)));
    }

    #[test]
    fn on_lists_exactly_what_is_retried() {
        let p = retry_policy(Some(&raw(&["connect", "503"])), 2).unwrap();
        assert!(p.retries(Failure::Connect));
        assert!(p.retries(Failure::Status(503)));
        assert!(!p.retries(Failure::Status(500)));
        assert!(!p.retries(Failure::Status(429)));
        assert!(!p.retries(Failure::Timeout));
        let e = retry_policy(Some(&raw(&["sometimes"])), 2).unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
        let mut r = raw(&[]);
        r.attempts = Some(0);
        assert!(retry_policy(Some(&r), 1).is_err());
    }
}
