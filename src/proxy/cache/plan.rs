//! Whether a request uses the cache, and how (DESIGN.md step 9): its key, the route's policy,
//! what the client asked (`Cache-Control`), and for a list of embeddings one key per item. A
//! leaf of `proxy::cache`: plain data from the request, the route and the caller.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use lumen_plugins::auth::Principal;
use lumen_plugins::cache::{self as policy, Api, CachePolicy, ClientControl, Scope};
use serde_json::Value;

use crate::openai::{Endpoint, LlmRequest};
use crate::routing::Route;

/// How one request uses the cache.
pub struct Plan {
    pub key: String,
    pub policy: CachePolicy,
    pub control: ClientControl,
    pub api: Api,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// A list embeddings request: cached per item.
    pub items: Option<Items>,
}

/// A list embeddings request, item by item.
pub struct Items {
    pub body: Value,
    pub items: Vec<Value>,
    pub keys: Vec<String>,
}

/// The cache's name for an endpoint. A Responses or Messages request is cached as the chat
/// completions request it was translated to (the cache holds chat answers; a hit is
/// translated back like an answer from a provider).
fn api_of(endpoint: Endpoint) -> Option<Api> {
    match endpoint {
        Endpoint::ChatCompletions => Some(Api::Chat),
        Endpoint::Completions => Some(Api::Completion),
        Endpoint::Embeddings => Some(Api::Embeddings),
        Endpoint::Rerank => Some(Api::Rerank),
        Endpoint::Responses | Endpoint::Messages => Some(Api::Chat),
    }
}

/// Whether and how this request uses the route's cache; `None` when the route has no cache or
/// the request is not cacheable under its policy.
pub fn plan(
    route: &Route,
    req: &LlmRequest,
    principal: &Principal,
    head: &pingora::http::RequestHeader,
) -> Option<Plan> {
    let headers = &head.headers;
    let query = head.uri.query().unwrap_or("");
    let policy = route.cache.clone()?;
    let api = api_of(req.endpoint)?;
    // A translated request cached as chat needs a chat answer: not when a target may answer
    // it in its own API (a provider that speaks it), nor when only such a target can.
    let native = route
        .targets
        .iter()
        .any(|t| t.provider.api.native_for(req.endpoint));
    if req.endpoint.translated() && (native || req.untranslatable.is_some()) {
        return None;
    }
    if !policy::cacheable_raw(api, &req.raw, policy.when)? {
        return None;
    }
    let scope_id = match policy.scope {
        Scope::Key => principal.key_id.as_str(),
        // A key without a tenant is its own tenant.
        Scope::Tenant => principal.tenant.as_deref().unwrap_or(&principal.key_id),
        Scope::Global => "",
    };
    // Keyed from the bytes: a parsed tree of a large body costs many times its size.
    let key = policy::key_raw(
        policy.scope,
        scope_id,
        &route.name,
        &req.model,
        api,
        query,
        &req.raw,
    )?;
    // A list embeddings request is also cached item by item: that needs its items, so it is
    // parsed (a list of strings or token arrays, not a tree of small objects).
    let items = match api {
        Api::Embeddings => {
            let body: Value = serde_json::from_slice(&req.raw).ok()?;
            policy::embed::items(&body).map(|items| {
                let keys = policy::item_keys(
                    policy.scope,
                    scope_id,
                    &route.name,
                    &req.model,
                    query,
                    &body,
                    &items,
                );
                Items { body, items, keys }
            })
        }
        _ => None,
    };
    Some(Plan {
        key,
        control: policy::client_control(headers),
        api,
        stream: req.stream,
        include_usage: req.stream && req.include_usage,
        policy,
        items,
    })
}
