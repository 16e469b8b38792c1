//! Exact prompt token counts from a `lumen-llama` sidecar (`POST /tokenize`), for requests
//! routed to one. The token reservation and the token counting endpoints then use the model's
//! own tokenizer instead of the estimate from the body's size (about four bytes a token), which
//! for a small local model is off by half or more, either way.
//!
//! Best effort and bounded: no answer within [`TIMEOUT`], an error, or an answer that is not a
//! count leaves the estimate in place. The body carries only the chat (messages and tools, or
//! a completion's prompt), and the head only the provider's own headers: nothing of the
//! client's credentials.

use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http::Method;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use serde_json::{json, Map, Value};

use super::exchange::exchange;
use super::provider::Provider;

/// The longest a request waits for its count before going on with the estimate.
pub const TIMEOUT: Duration = Duration::from_millis(500);
/// A count answer is a few bytes; anything much larger is not one.
const MAX_ANSWER: usize = 4096;

/// The `/tokenize` body for a chat body (`messages`, and the tools the chat would render) or
/// a completion body with a text `prompt`; `None` for anything else (the estimate stays).
pub fn request_body(raw: &[u8], model: &str) -> Option<Vec<u8>> {
    let body: Map<String, Value> = serde_json::from_slice(raw).ok()?;
    let mut ask = Map::new();
    ask.insert("model".into(), json!(model));
    // The count alone: the token ids are not needed here.
    ask.insert("with_tokens".into(), json!(false));
    match (body.get("messages"), body.get("prompt")) {
        (Some(messages @ Value::Array(_)), _) => {
            ask.insert("messages".into(), messages.clone());
            for key in ["tools", "tool_choice", "parallel_tool_calls"] {
                if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
                    ask.insert(key.into(), v.clone());
                }
            }
        }
        (None, Some(prompt @ Value::String(_))) => {
            ask.insert("content".into(), prompt.clone());
        }
        _ => return None,
    }
    serde_json::to_vec(&ask).ok()
}

/// Asks `provider` (a sidecar) to count `body`'s tokens, within [`TIMEOUT`].
pub async fn count(
    connector: &Connector,
    provider: &Provider,
    body: Vec<u8>,
) -> Result<u64, String> {
    tokio::time::timeout(TIMEOUT, ask(connector, provider, body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {TIMEOUT:?}")))
}

async fn ask(connector: &Connector, provider: &Provider, body: Vec<u8>) -> Result<u64, String> {
    let peer = provider
        .peer
        .peer()
        .await
        .map_err(|e| format!("resolving: {e}"))?;
    let mut head =
        RequestHeader::build(Method::POST, b"/tokenize", Some(4)).map_err(|e| e.to_string())?;
    let _ = head.insert_header(USER_AGENT, "lumen");
    let _ = head.insert_header(CONTENT_TYPE, "application/json");
    let _ = head.insert_header(CONTENT_LENGTH, body.len());
    let answer = exchange(
        connector,
        provider,
        &peer,
        head,
        Some(body.into()),
        TIMEOUT,
        MAX_ANSWER,
    )
    .await?;
    if answer.status != 200 {
        return Err(format!("HTTP {}", answer.status));
    }
    serde_json::from_slice::<Value>(&answer.body)
        .ok()
        .and_then(|v| v.get("count")?.as_u64())
        .ok_or_else(|| "the answer has no count".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: Option<Vec<u8>>) -> Value {
        serde_json::from_slice(&body.expect("a body")).unwrap()
    }

    #[test]
    fn a_chat_is_counted_with_its_tools_and_nothing_else() {
        let raw = br#"{"model":"client-name","messages":[{"role":"user","content":"hi"}],
            "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":null,
            "user":"someone","max_tokens":5}"#;
        let ask = parsed(request_body(raw, "smollm2"));
        assert_eq!(
            ask,
            json!({"model": "smollm2", "with_tokens": false,
                   "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]})
        );
    }

    #[test]
    fn a_text_prompt_is_counted_as_content_and_other_bodies_are_not() {
        let ask = parsed(request_body(br#"{"model":"m","prompt":"once upon"}"#, "m"));
        assert_eq!(ask["content"], "once upon");
        assert!(request_body(br#"{"model":"m","prompt":["a","b"]}"#, "m").is_none());
        assert!(request_body(br#"{"model":"m","input":"x"}"#, "m").is_none());
        assert!(request_body(b"not json", "m").is_none());
    }
}
