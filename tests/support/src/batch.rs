//! The Batch API from a client's side: multipart uploads as the SDKs send them, JSONL lines,
//! and batches followed to their end. Shared by the batch tests and the Redis Cluster test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Response;
use crate::keyed::{as_key, as_key_with};

const BOUNDARY: &str = "lumen-test-boundary-7d3f";

/// A multipart upload as the SDKs send it.
pub fn multipart(purpose: &str, file: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// One JSONL line: a chat completion whose prompt is its `custom_id`, with `extra` in its body.
pub fn chat_line(id: &str, model: &str, extra: Value) -> String {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": id}], "max_tokens": 5});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

/// `method path` on `addr` as `key` with `body`: JSON (`json_body`) or the multipart form of
/// [`multipart`]; nothing when empty.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &[u8],
    json_body: bool,
) -> Response {
    let content_type = if json_body {
        "application/json".to_string()
    } else {
        format!("multipart/form-data; boundary={BOUNDARY}")
    };
    as_key_with(addr, method, path, key, body, &content_type).await
}

/// Uploads `lines` as a batch input file.
pub async fn upload(addr: SocketAddr, key: &str, lines: &[String]) -> Response {
    let file = lines.join("\n") + "\n";
    call(
        addr,
        "POST",
        "/v1/files",
        key,
        &multipart("batch", file.as_bytes()),
        false,
    )
    .await
}

/// Creates a chat batch from `file_id`; asserts it was accepted.
pub async fn create(addr: SocketAddr, key: &str, file_id: &str) -> Value {
    let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"run": "test"}});
    let r = as_key(addr, "POST", "/v1/batches", key, Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Polls the batch until it is completed, failed, expired or cancelled.
pub async fn wait_final(addr: SocketAddr, key: &str, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = as_key(addr, "GET", &format!("/v1/batches/{id}"), key, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if ["completed", "failed", "expired", "cancelled"]
            .contains(&v["status"].as_str().unwrap_or(""))
        {
            return v;
        }
        assert!(Instant::now() < deadline, "not final in time: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file's lines as JSON, by `custom_id` (each must appear once).
pub async fn file_lines(addr: SocketAddr, key: &str, id: &str) -> HashMap<String, Value> {
    let r = as_key(addr, "GET", &format!("/v1/files/{id}/content"), key, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut out = HashMap::new();
    for line in r.text().lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["custom_id"].as_str().unwrap().to_string();
        assert!(
            out.insert(id.clone(), v).is_none(),
            "{id} is in the file twice"
        );
    }
    out
}
