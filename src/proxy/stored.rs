//! The Responses API's stored responses on the request path (`crate::stored` keeps them):
//! a request continuing one (`previous_response_id`) gets the conversation so far; a finished
//! translated answer is kept (`store`, true by default) before the client has the last of it,
//! so its next turn finds it on any node; and `GET /v1/responses/{id}`, `GET
//! /v1/responses/{id}/input_items` and `DELETE /v1/responses/{id}` answer from the store.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use http::{Method, StatusCode};
use lumen_plugins::auth::Principal;
use serde_json::{json, Value};

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use crate::error::{GatewayError, RequestError};
use crate::openai::{self, LlmRequest};
use crate::ops::Reply;
use crate::routing::Route;
use crate::stored::Stored;
use crate::translate::TranslateError;
use crate::upstream::provider::Api;

/// A stored-responses call.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Call {
    Get(String),
    InputItems(String),
    Delete(String),
}

/// The call `method path` makes, if it is one (`POST /v1/responses…` is not: those are
/// requests and token counts).
pub(super) fn route(method: &Method, path: &str) -> Option<Call> {
    let rest = path.strip_prefix("/v1/responses/")?;
    let (id, items) = match rest.strip_suffix("/input_items") {
        Some(id) => (id, true),
        None => (rest.strip_suffix('/').unwrap_or(rest), false),
    };
    if id.is_empty() || id.contains('/') {
        return None;
    }
    match (method, items) {
        (&Method::GET, false) => Some(Call::Get(id.to_string())),
        (&Method::GET, true) => Some(Call::InputItems(id.to_string())),
        (&Method::DELETE, false) => Some(Call::Delete(id.to_string())),
        _ => None,
    }
}

impl Gateway {
    /// After step 7, for a Responses request with `previous_response_id`: the stored
    /// conversation (the key's own), translated in before the request's input. An id this
    /// gateway never stored may be the provider's own when the route has a target that speaks
    /// the Responses API: it goes there as it is (and to no other target). A request only such
    /// a target can serve (a built-in tool; for a Messages request, a server tool or a
    /// document block) is refused on a route without one.                            400, 503
    pub(super) async fn continue_stored(
        &self,
        principal: &Principal,
        mut req: LlmRequest,
        route: &Route,
    ) -> Result<LlmRequest, GatewayError> {
        // A request only its own API can carry (a built-in tool, a server tool) needs a
        // target that speaks it (the Messages API, for a Messages request).
        if let Some(e) = req.untranslatable.as_ref() {
            if !route
                .targets
                .iter()
                .any(|t| t.provider.api.native_for(req.endpoint))
            {
                return Err(RequestError::Translate((**e).clone()).into());
            }
        }
        let native = route
            .targets
            .iter()
            .any(|t| t.provider.api == Api::Responses);
        let Some(id) = req.previous_response_id().map(str::to_string) else {
            return Ok(req);
        };
        match Box::pin(self.node.responses.get(&principal.key_id, &id)).await? {
            Some(stored) => Ok(openai::continued(req, stored.history())?),
            None if native => {
                req.untranslatable.get_or_insert_with(|| {
                    Box::new(TranslateError::unsupported(
                        "previous_response_id",
                        "the response is the provider's: only a target that speaks the Responses API can continue it",
                    ))
                });
                Ok(req)
            }
            None => Err(GatewayError::PreviousResponseNotFound(id)),
        }
    }

    /// Keeps the finished response `ctx` holds, if it asked to be kept. A store that fails
    /// costs the client nothing but the stored copy: logged, not an error.
    pub(super) async fn keep_response(&self, ctx: &mut RequestCtx) {
        if ctx.keep.as_ref().is_none_or(|k| k.response.is_none()) {
            return;
        }
        let (Some(keep), Some(principal), Some(config)) =
            (ctx.keep.take(), ctx.principal.as_ref(), ctx.config.as_ref())
        else {
            return;
        };
        let Some(response) = keep.response else {
            return;
        };
        let stored = Stored {
            response,
            input: keep.input,
        };
        let ttl = config.responses.store_ttl;
        if let Err(e) = self
            .node
            .responses
            .put(&principal.key_id, &keep.id, &stored, ttl)
            .await
        {
            tracing::warn!(error = %e, id = %keep.id, "a response could not be stored");
        }
    }

    /// Answers a stored-responses call for `principal` (its own responses only: another
    /// key's id is not found).                                                  404, 503
    pub(super) async fn answer_stored(
        &self,
        call: Call,
        principal: &Principal,
        query: Option<&str>,
    ) -> Result<Reply, GatewayError> {
        let store = &self.node.responses;
        let owner = principal.key_id.as_str();
        match call {
            Call::Get(id) => {
                let stored = store
                    .get(owner, &id)
                    .await?
                    .ok_or(GatewayError::ResponseNotFound(id))?;
                Ok(Reply::json(StatusCode::OK, &stored.response))
            }
            Call::InputItems(id) => {
                let stored = store
                    .get(owner, &id)
                    .await?
                    .ok_or_else(|| GatewayError::ResponseNotFound(id.clone()))?;
                Ok(Reply::json(
                    StatusCode::OK,
                    &input_items(&id, stored.input, query),
                ))
            }
            Call::Delete(id) => {
                if !store.delete(owner, &id).await? {
                    return Err(GatewayError::ResponseNotFound(id));
                }
                let body = json!({"id": id, "object": "response", "deleted": true});
                Ok(Reply::json(StatusCode::OK, &body))
            }
        }
    }
}

/// A page of a stored response's input items, as OpenAI lists them: `order` (`desc`, the
/// default, or `asc`), `limit` (1 to 100, 20 by default), `after` (an item id). Items without
/// an id get one from their place (`<response id>_in_<n>`).
fn input_items(id: &str, items: Vec<Value>, query: Option<&str>) -> Value {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let mut items: Vec<Value> = items
        .into_iter()
        .enumerate()
        .map(|(n, mut item)| {
            if let Some(o) = item.as_object_mut() {
                o.entry("id")
                    .or_insert_with(|| Value::from(format!("{id}_in_{n}")));
            }
            item
        })
        .collect();
    if param("order").as_deref() != Some("asc") {
        items.reverse();
    }
    let start = match param("after") {
        Some(after) => items
            .iter()
            .position(|i| i.get("id").and_then(Value::as_str) == Some(after.as_str()))
            .map_or(items.len(), |p| p.saturating_add(1)),
        None => 0,
    };
    let rest = items.get(start..).unwrap_or_default();
    let page: Vec<Value> = rest.iter().take(limit).cloned().collect();
    let id_of = |v: Option<&Value>| v.and_then(|i| i.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id_of(page.first()),
        "last_id": id_of(page.last()),
        "has_more": rest.len() > page.len(),
        "data": page,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_get_items_and_delete_only() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(
            r(Method::GET, "/v1/responses/resp_1"),
            Some(Call::Get("resp_1".into()))
        );
        assert_eq!(
            r(Method::GET, "/v1/responses/resp_1/input_items"),
            Some(Call::InputItems("resp_1".into()))
        );
        assert_eq!(
            r(Method::DELETE, "/v1/responses/resp_1"),
            Some(Call::Delete("resp_1".into()))
        );
        assert_eq!(r(Method::POST, "/v1/responses/input_tokens"), None);
        assert_eq!(r(Method::POST, "/v1/responses"), None);
        assert_eq!(r(Method::GET, "/v1/responses/"), None);
        assert_eq!(r(Method::GET, "/v1/responses/a/b"), None);
        assert_eq!(r(Method::DELETE, "/v1/responses/a/input_items"), None);
    }

    #[test]
    fn input_items_are_paged_newest_first_by_default() {
        let items: Vec<Value> = (0..5)
            .map(|n| json!({"role": "user", "content": n}))
            .collect();
        let page = input_items("resp_x", items.clone(), Some("limit=2"));
        assert_eq!(page["data"][0]["content"], 4);
        assert_eq!(page["data"][0]["id"], "resp_x_in_4");
        assert_eq!(page["has_more"], true);
        assert_eq!(page["last_id"], "resp_x_in_3");
        let next = input_items("resp_x", items.clone(), Some("limit=2&after=resp_x_in_3"));
        assert_eq!(next["first_id"], "resp_x_in_2");
        let asc = input_items("resp_x", items, Some("order=asc&limit=100"));
        assert_eq!(asc["data"].as_array().unwrap().len(), 5);
        assert_eq!(asc["data"][0]["content"], 0);
        assert_eq!(asc["has_more"], false);
    }
}
