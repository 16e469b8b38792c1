//! Per-request state carried through the pipeline's phases and into the access log.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use lumen_plugins::auth::Principal;
use pingora::http::ResponseHeader;

use crate::config::Snapshot;
use crate::openai::Endpoint;
use crate::routing::Route;

/// Counts a request in `lumen_requests_in_flight` for as long as it lives.
pub struct InFlightGauge(prometheus::IntGauge);

impl InFlightGauge {
    pub fn enter(gauge: &prometheus::IntGauge) -> InFlightGauge {
        gauge.inc();
        InFlightGauge(gauge.clone())
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Tokens held for a request under its key's budgets, in process or in Redis.
pub enum TokenHold {
    Local(lumen_plugins::rate_limit::TokenReservation),
    Shared(lumen_plugins::rate_limit::shared::ReservationGuard),
    /// Held in process because Redis did not answer (`fail_open`); what the request uses is
    /// also charged to the fleet's windows once Redis answers (`owed`, which a drop refunds).
    FailedOpen {
        local: lumen_plugins::rate_limit::TokenReservation,
        owed: lumen_plugins::rate_limit::shared::ReservationGuard,
    },
}

/// Dollars held for a request under its budgets (key or JWT, tenant), with the budgets charged
/// (ids and limits as the request's config had them).
pub struct MoneyHold {
    pub hold: MoneyReservation,
    pub charges: Vec<lumen_plugins::budget::Charge>,
}

pub enum MoneyReservation {
    Local(lumen_plugins::budget::LocalReservation),
    Shared(lumen_plugins::budget::shared::SharedBudgetGuard),
    /// Held against this node's share because Redis did not answer (`fail_open`); the cost is
    /// also charged to the fleet's budgets once Redis answers (`owed`, which a drop refunds).
    FailedOpen {
        local: lumen_plugins::budget::LocalReservation,
        owed: lumen_plugins::budget::shared::SharedBudgetGuard,
    },
}

/// What one request has gathered so far. Created empty by `new_ctx`, filled phase by phase.
pub struct RequestCtx {
    pub started: Instant,
    /// The config this request runs on from start to end, whatever reloads happen meanwhile.
    pub config: Option<Arc<Snapshot>>,
    /// Client's `x-request-id` when it sent a sane one, otherwise generated.
    pub request_id: HeaderValue,
    /// Headers every response to this request carries (request id, CORS).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    pub endpoint: Option<Endpoint>,
    /// The client speaks Anthropic's API (a `/v1/messages` path): every error it gets, from
    /// the first check on, takes Anthropic's shape.
    pub anthropic: bool,
    /// A translated Responses answer to keep once complete (`store`).
    pub keep: Option<crate::stored::Keep>,
    /// The request fields the current attempt's target could not be given (its API has no
    /// place for them), named in `x-lumen-dropped-params` on the answer that commits.
    pub dropped: Vec<&'static str>,
    /// Who is calling, once authenticated (shared, not copied: keys' principals are built at
    /// config load). Its `key_id` goes to the access log, never the credential.
    pub principal: Option<Arc<Principal>>,
    /// Keeps `lumen_requests_in_flight` counted while the request lives.
    pub gauge: Option<InFlightGauge>,
    /// This request's in-flight slot under its key's concurrency limit (in process: released
    /// on drop; in Redis: released in the logging phase).
    pub in_flight: Option<lumen_plugins::rate_limit::InFlight>,
    /// The fleet-wide slot (Redis): given back by the guard when the request ends, however.
    pub shared_slot: Option<lumen_plugins::rate_limit::shared::SlotGuard>,
    /// Tokens reserved under the key's token budgets; settled in the logging phase.
    pub tokens: Option<TokenHold>,
    /// Read usage off the response (and ask streams for it): set when tokens are reserved.
    pub track_usage: bool,
    /// Total tokens the provider reported, when it did.
    pub usage_total: Option<u64>,
    /// Tokens estimated from what was sent and streamed, when a committed answer carried no
    /// usage (a stream cut short, a provider that reports none): what budgets and quotas
    /// settle on then. Never zero for an answer that started.
    pub usage_estimate: Option<u64>,
    /// The prompt's share of the estimate (from the body's size), set when forwarding starts.
    pub prompt_estimate: u64,
    /// What hedges that lost used: their prompts' tokens (estimated: each was sent the whole
    /// prompt) and those tokens' cost at their targets' prices, in micro-dollars. Settled
    /// with the request's own usage.
    pub hedge_spent: (u64, u64),
    /// The tokens reserved for possible hedges' prompts (on top of the request's estimate).
    pub hedge_reserve: u64,
    /// (prompt, completion) tokens the provider reported, when it did.
    pub usage_split: Option<(u64, u64)>,
    /// (cached prompt, reasoning) tokens the provider reported (priced apart).
    pub usage_detail: (u64, u64),
    /// Dollars reserved under the caller's budgets; settled with the cost when it ends.
    pub money: Option<MoneyHold>,
    /// The price of the target that answered (or is answering), when it has one.
    pub price: Option<crate::price::Price>,
    /// What the request cost, in micro-dollars, once known (settling); `None`: unpriced.
    pub cost: Option<u64>,
    /// The job token of a worker's request (internal socket): its cost goes to the job.
    pub job_token: Option<Box<str>>,
    /// A worker's request for a batch's line: it waits for room kept for interactive requests.
    pub batch_line: bool,
    /// The route, once resolved (its name is a bounded metrics label).
    pub route: Option<Arc<Route>>,
    /// The provider that answered, once one did.
    pub provider: Option<String>,
    /// The model the client asked for, once its route and allow-list admitted it (usage).
    pub model: Option<String>,
    pub stream: bool,
    /// Status sent to the client (0 until a response head went out).
    pub status: u16,
    /// Request sent upstream → first body chunk received (time to first token for streams).
    pub first_byte: Option<Duration>,
    /// Upstream attempts made (`x-lumen-attempts`).
    pub attempts: u32,
    /// Time spent waiting on providers in attempts before the current one, and when the
    /// current one started: what `x-lumen-overhead-us` leaves out.
    pub upstream_wait: Duration,
    pub attempt_started: Option<Instant>,
    /// When the answer was committed to the client; streaming from then on is bound by the
    /// provider, not by us.
    pub committed_at: Option<Instant>,
    /// `hit`, `miss`, `bypass` or `coalesced` for a cacheable route (metrics, access log).
    pub cache: Option<&'static str>,
    /// Short reason for the access log when the request failed.
    pub error: Option<String>,
    /// Its spans, when traces are on (`tracing:`); ended with the request.
    pub trace: Option<Box<crate::telemetry::RequestTrace>>,
}

impl RequestCtx {
    /// Time spent in the gateway itself so far: everything but waiting on providers.
    pub fn overhead(&self) -> Duration {
        // One clock read for all three spans.
        let now = Instant::now();
        let since = |t: Instant| now.saturating_duration_since(t);
        let streamed = self.committed_at.map_or(Duration::ZERO, since);
        let current = self
            .attempt_started
            .map_or(Duration::ZERO, |t| since(t).saturating_sub(streamed));
        since(self.started).saturating_sub(
            self.upstream_wait
                .saturating_add(current)
                .saturating_add(streamed),
        )
    }

    /// The route's configured name, or `""` before one is resolved.
    pub fn route_name(&self) -> &str {
        self.route.as_deref().map_or("", |r| r.name.as_str())
    }

    /// The caller as a bounded metrics label: a configured key's id, else `jwt`, `anonymous`
    /// (auth off) or `ip` (refused before authentication).
    pub fn key_label(&self) -> &str {
        match &self.principal {
            Some(p) if p.configured => &p.key_id,
            Some(p) if p.key_id == "anonymous" => "anonymous",
            Some(_) => "jwt",
            None => "ip",
        }
    }

    pub fn new() -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            config: None,
            request_id: HeaderValue::from_static(""),
            response_headers: Vec::new(),
            endpoint: None,
            anthropic: false,
            keep: None,
            dropped: Vec::new(),
            principal: None,
            gauge: None,
            in_flight: None,
            shared_slot: None,
            tokens: None,
            model: None,
            track_usage: false,
            usage_total: None,
            usage_estimate: None,
            prompt_estimate: 0,
            hedge_spent: (0, 0),
            hedge_reserve: 0,
            usage_split: None,
            usage_detail: (0, 0),
            money: None,
            price: None,
            cost: None,
            job_token: None,
            batch_line: false,
            route: None,
            provider: None,
            stream: false,
            status: 0,
            first_byte: None,
            attempts: 0,
            upstream_wait: Duration::ZERO,
            attempt_started: None,
            committed_at: None,
            cache: None,
            error: None,
            trace: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}

/// A client-sent request id we are willing to echo and log: short, visible ASCII only.
pub fn accept_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A gateway-made id for one request's fleet-wide concurrency slot: unique per request
/// whatever the client sends as its request id.
pub fn new_slot_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// A fresh 128-bit random id in hex (formatted on the stack: one allocation, the value's).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
    let mut id = [0u8; 32];
    for (i, slot) in id.iter_mut().enumerate() {
        let shift = 124u32.saturating_sub(4u32.saturating_mul(i as u32));
        *slot = HEX
            .get(((n >> shift) & 0xf) as usize)
            .copied()
            .unwrap_or(b'0');
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Every answer's request id (parsed at compile time, like every name set per request).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Appends the per-request headers (request id, CORS, rate limits, cache status) to a response
/// head.
pub fn add_headers(head: &mut ResponseHeader, headers: &[(HeaderName, HeaderValue)]) {
    edit_headers(head, |map| {
        for (name, value) in headers {
            map.append(name.clone(), value.clone());
        }
    });
}

/// Runs `edit` on `head`'s header map itself. Pingora's `insert_header` and `append_header`
/// parse every name they are given again (a `HeaderName` included) and keep a second map of
/// the names' spellings: most of what building a head cost per request. Here names are
/// parsed once (constants, or the request's own), and the head keeps no spelling map: field
/// names go out lowercase, standard ones in Pingora's title case.
pub fn edit_headers(head: &mut ResponseHeader, edit: impl FnOnce(&mut HeaderMap)) {
    // Moved out and back: no copy of the map, and an empty `Parts` allocates nothing.
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(head, empty));
    edit(&mut parts.headers);
    *head = ResponseHeader::from(parts);
}

#[cfg(test)]
mod id_tests {
    use super::new_request_id;

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_fresh() {
        let a = new_request_id();
        let b = new_request_id();
        for id in [&a, &b] {
            let s = id.to_str().unwrap_or_default();
            assert_eq!(s.len(), 32, "{s}");
            assert!(
                s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{s}"
            );
        }
        assert_ne!(a, b);
        // All 32 digits are drawn: across many ids every position takes several values.
        let ids: Vec<Vec<u8>> = (0..64)
            .map(|_| new_request_id().as_bytes().to_vec())
            .collect();
        for pos in 0..32 {
            let distinct: std::collections::HashSet<u8> =
                ids.iter().filter_map(|id| id.get(pos).copied()).collect();
            assert!(distinct.len() > 4, "position {pos} barely varies");
        }
    }
}
