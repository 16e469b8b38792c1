//! A streamed response read as it arrives, event by event, from blocking tests: to check what
//! a stream says ([`read_chat_stream`]), or to stop reading part-way, as a client that stalls
//! or goes away does (dropping an [`SseStream`] closes its connection).
//!
//! [`crate::client::Response::sse_data`] reads the events of a response already read whole.

use std::net::SocketAddr;

use serde_json::Value;

use crate::blocking::{block_on, REQUEST_TIMEOUT};
use crate::client::Client;

/// A streaming response read event by event. Dropping it closes the connection.
pub struct SseStream {
    client: Client,
    pub status: u16,
    /// Lower-case names, as [`crate::client::Response::headers`].
    pub headers: Vec<(String, String)>,
    /// Received text not yet split into events.
    buffer: String,
    /// The last chunk (or a read error) has been seen.
    done: bool,
}

impl SseStream {
    /// `POST`s `body` to `path` on `127.0.0.1:port` and returns once the response head is in.
    pub fn open(port: u16, path: &str, headers: &[(&str, &str)], body: &Value) -> SseStream {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let body = body.to_string();
        block_on(async {
            let mut client = Client::connect(addr).await.expect("connect");
            let head = tokio::time::timeout(
                REQUEST_TIMEOUT,
                client.request_head("POST", path, headers, body.as_bytes()),
            )
            .await
            .expect("response head in time")
            .expect("response head");
            SseStream {
                client,
                status: head.status,
                headers: head.headers,
                buffer: String::new(),
                done: false,
            }
        })
    }

    /// The next `data:` payload, or `None` when the stream has ended.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.trim().strip_prefix("data: ") {
                    return Some(data.to_string());
                }
                continue;
            }
            if self.done {
                return None;
            }
            let client = &mut self.client;
            let chunk = block_on(async {
                tokio::time::timeout(REQUEST_TIMEOUT, client.next_chunk()).await
            });
            match chunk {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => self.done = true,
            }
        }
    }

    /// Every remaining `data:` payload.
    pub fn collect_all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            out.push(d);
        }
        out
    }
}

/// The text and final chunk facts of a chat (or text) completion stream.
#[derive(Debug)]
pub struct StreamedChat {
    /// Every `delta.content` (chat) or `text` (completions), in order.
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub ended_with_done: bool,
    /// The `delta.role` of the first chunk that has one.
    pub first_role: Option<String>,
}

/// Reads `stream` to its end; panics on a chunk that is not JSON or is an error event.
pub fn read_chat_stream(stream: SseStream) -> StreamedChat {
    let events = stream.collect_all();
    let mut out = StreamedChat {
        text: String::new(),
        finish_reason: None,
        usage: None,
        ended_with_done: events.last().map(String::as_str) == Some("[DONE]"),
        first_role: None,
    };
    for data in events.iter().filter(|d| d.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("chunk {data}: {e}"));
        assert!(v.get("error").is_none(), "error event: {data}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.usage = Some(u.clone());
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if out.first_role.is_none() {
            out.first_role = choice["delta"]["role"].as_str().map(String::from);
        }
        if let Some(t) = choice["delta"]["content"].as_str() {
            out.text.push_str(t);
        }
        if let Some(t) = choice["text"].as_str() {
            out.text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            out.finish_reason = Some(f.to_string());
        }
    }
    out
}
