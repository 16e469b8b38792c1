//! The OpenAI requests tests send, built in one place: chat bodies (`chat`, `chat_with`), an
//! async-job body (`chat_job`), the gateway's chat endpoint called on a fresh connection
//! ([`Lumen::post_chat`] and friends), and reading the answer back (`message_content`).
//!
//! Bodies are `serde_json::Value`s a test may still change before sending; each builder spells
//! out the one user message, so two tests that send different words say so at the call.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::client::{Client, Response};
use crate::harness::Lumen;

/// A chat completion body: `model` and one user message saying `content`, nothing else.
pub fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

/// [`chat`] with each field of the object `extra` set on top (`stream`, `temperature`,
/// `max_tokens`…; a field of `extra` replaces one of [`chat`]'s).
pub fn chat_with(model: &str, content: &str, extra: Value) -> Value {
    let mut body = chat(model, content);
    let Value::Object(fields) = extra else {
        panic!("extra fields must be a JSON object, not {extra}");
    };
    for (k, v) in fields {
        body[k] = v;
    }
    body
}

/// A `POST /v1/jobs` body that runs [`chat_with`]`(model, content, extra)` as a job.
pub fn chat_job(model: &str, content: &str, extra: Value) -> Value {
    json!({"endpoint": "/v1/chat/completions", "body": chat_with(model, content, extra)})
}

/// The assistant's text in a (non-streamed) chat completion; empty when there is none.
pub fn message_content(completion: &Value) -> &str {
    completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// `Authorization` header value for an API key or token.
pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The gateway's chat endpoint, each call on a fresh connection.
impl Lumen {
    /// `POST /v1/chat/completions` with `body` and `headers`. Panics when no response comes:
    /// a test that calls it expects an HTTP status.
    pub async fn post_chat(&self, headers: &[(&str, &str)], body: &Value) -> Response {
        let mut c = Client::connect(self.addr).await.unwrap();
        c.post_json("/v1/chat/completions", headers, body)
            .await
            .unwrap()
    }

    /// [`Lumen::post_chat`] as the holder of `key` (`Authorization: Bearer KEY`).
    pub async fn post_chat_as(&self, key: &str, body: &Value) -> Response {
        self.post_chat(&[("authorization", &bearer(key))], body)
            .await
    }

    /// The status of [`Lumen::post_chat_as`], or 0 when no response came (a reload swapping
    /// listeners, say): for tests that poll until a status changes.
    pub async fn chat_status(&self, key: &str, body: &Value) -> u16 {
        chat_status(self.addr, key, body).await
    }
}

/// `POST /v1/chat/completions` with `body` to `addr` as the holder of `key`: its status, 0 when
/// no response came (a node that is down, dying or swapping listeners).
pub async fn chat_status(addr: SocketAddr, key: &str, body: &Value) -> u16 {
    let Ok(mut c) = Client::connect(addr).await else {
        return 0;
    };
    c.post_json(
        "/v1/chat/completions",
        &[("authorization", &bearer(key))],
        body,
    )
    .await
    .map_or(0, |r| r.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_fields_are_added_and_replace() {
        let body = chat_with("m", "hi", json!({"stream": true, "model": "other"}));
        assert_eq!(
            body,
            json!({"model": "other", "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(
            chat_job("fast", "hi", json!({})),
            json!({"endpoint": "/v1/chat/completions", "body": chat("fast", "hi")})
        );
    }
}
