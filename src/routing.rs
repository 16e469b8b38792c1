//! The routing table: a client-facing model name → a route with ordered targets.
//!
//! Exact names win over patterns, and among patterns the first one in the file wins. A provider
//! with `expose_models: true` also answers `provider/model` directly. Picking a target among a
//! route's targets (strategies, health, fallback) is `forward`'s job, not this module's.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use lumen_plugins::rate_limit::RequestLimit;

use crate::config::raw::{RawRoute, Strategy};
use crate::config::{Problem, Provider};

/// A configured model name and where requests for it go.
#[derive(Debug)]
pub struct Route {
    /// The model name or pattern as written in the config; also the `route` metrics label.
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<Target>,
    /// Requests per key on this route, on top of the key's own limits.
    pub limits: Option<RequestLimit>,
    /// The rate-limit bucket suffix for this route (`|route:NAME`), built once.
    pub bucket_suffix: String,
}

/// One place a route can send a request.
#[derive(Debug)]
pub struct Target {
    pub provider: Arc<Provider>,
    /// The provider's model name, JSON-encoded (with quotes) so it can be spliced into the
    /// body as is; `None` keeps the client's model name (pattern routes, exposed providers).
    pub model_json: Option<Bytes>,
}

impl Target {
    fn new(provider: Arc<Provider>, model: Option<&str>) -> Self {
        Target {
            provider,
            model_json: model.map(|m| Bytes::from(serde_json::to_vec(m).unwrap_or_default())),
        }
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
}

impl RouteTable {
    /// Compiles the routes, pushing a `Problem` for each unknown provider, duplicate model name
    /// or empty target list.
    pub fn build(
        raw: &[RawRoute],
        providers: &HashMap<String, Arc<Provider>>,
        problems: &mut Vec<Problem>,
    ) -> RouteTable {
        let mut table = RouteTable {
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
                    Some(p) => targets.push(Target::new(p.clone(), t.model.as_deref())),
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
            let route = Arc::new(Route {
                bucket_suffix: format!("|route:{}", r.model),
                name: r.model.clone(),
                strategy: r.strategy,
                targets,
                limits,
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
            targets: vec![Target::new(provider.clone(), Some(upstream_model))],
            limits: None,
            bucket_suffix: String::new(),
        }))
    }

    /// Client-facing model names, in file order (patterns are not listable).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.listed.iter().map(String::as_str)
    }
}

fn is_pattern(model: &str) -> bool {
    model.contains(['*', '?'])
}

/// `*` matches any run of characters, `?` exactly one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

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
}
