//! Requests as the holder of an API key, and the gateway's answers read back: jobs followed to
//! their end, a job's event stream, the admin reports of budgets and Redis, and the metrics by
//! Redis operation. Shared by the tests of jobs, money and the fleet's Redis.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{request, Response};
use crate::harness::Lumen;
use crate::openai::bearer;

/// `method path` on `addr` as the holder of `key` (`Authorization: Bearer KEY`), with `body` as
/// JSON when given. Panics when no response comes.
pub async fn as_key(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> Response {
    let body = body.map(Value::to_string).unwrap_or_default();
    as_key_with(addr, method, path, key, body.as_bytes(), "application/json").await
}

/// [`as_key`] with a body of any `content_type` (sent only with a body).
pub async fn as_key_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &[u8],
    content_type: &str,
) -> Response {
    let auth = bearer(key);
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", content_type));
    }
    request(addr, method, path, &headers, body).await.unwrap()
}

/// Polls `GET /v1/jobs/{id}` on `addr` until the job is completed, failed or cancelled.
pub async fn wait_job(addr: SocketAddr, key: &str, id: &str, limit: Duration) -> Value {
    wait_job_until(addr, key, id, &["completed", "failed", "cancelled"], limit).await
}

/// Polls `GET /v1/jobs/{id}` on `addr` until the job's status is one of `want`.
pub async fn wait_job_until(
    addr: SocketAddr,
    key: &str,
    id: &str,
    want: &[&str],
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = as_key(addr, "GET", &format!("/v1/jobs/{id}"), key, None)
            .await
            .json();
        if want.contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "wanted {want:?}: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The text of a job's `/events` stream's `delta` events, joined.
pub fn event_deltas(events: &str) -> String {
    events
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: delta\ndata: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|v| v["content"].as_str().unwrap_or("").to_string())
        .collect()
}

/// `n` chat requests (model `fast`) at once as `key`, spread over `nodes`; their statuses (0:
/// no answer at all).
pub async fn chat_burst(nodes: &[SocketAddr], key: &str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, key) = (nodes[i % nodes.len()], key.to_string());
            tokio::spawn(async move { chat_status(addr, &key).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// One chat request (model `fast`) as `key` to `addr`: its status, 0 when no answer came (a
/// node that is down or dying).
pub async fn chat_status(addr: SocketAddr, key: &str) -> u16 {
    crate::openai::chat_status(addr, key, &crate::openai::chat("fast", "hi")).await
}

/// How many of `statuses` are `status`.
pub fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// `GET path` on the admin listener, as JSON.
pub async fn admin(lumen: &Lumen, path: &str) -> Value {
    admin_at(lumen.admin, path).await
}

/// `GET path` on the admin listener at `admin`, as JSON.
pub async fn admin_at(admin: SocketAddr, path: &str) -> Value {
    request(admin, "GET", path, &[], b"").await.unwrap().json()
}

/// The budget `scope:name` as `/admin/budgets` shows it.
pub async fn budget(lumen: &Lumen, scope: &str, name: &str) -> Value {
    let report = admin(lumen, "/admin/budgets").await;
    report["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == scope && b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no budget {scope}:{name} in {report}"))
}

/// Micro-dollars from a USD number or string (`0.001900`).
pub fn micros(v: &Value) -> i64 {
    let usd = match v {
        Value::String(s) => s.parse::<f64>().unwrap(),
        other => other.as_f64().unwrap(),
    };
    (usd * 1e6).round() as i64
}

/// Polls `/admin/redis` until `ok` holds (20 s at most); the view that matched.
pub async fn topology_until(admin: SocketAddr, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = admin_at(admin, "/admin/redis").await;
        if ok(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "topology never matched: {seen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Primaries marked up in an `/admin/redis` view.
pub fn primaries_up(view: &Value) -> usize {
    view["topology"]["nodes"].as_array().map_or(0, |nodes| {
        nodes
            .iter()
            .filter(|n| n["role"] == "primary" && n["up"] == true)
            .count()
    })
}

/// A metric labelled by Redis operation (`lumen_redis_errors_total`,
/// `lumen_redis_latency_seconds_count`), by `op`, as one node's `/metrics` shows it now.
pub async fn by_op(admin: SocketAddr, metric: &str) -> BTreeMap<String, f64> {
    let text = request(admin, "GET", "/metrics", &[], b"")
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    let prefix = format!("{metric}{{op=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (op, value) = rest.split_once("\"} ")?;
            Some((op.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `urls` as a YAML flow list: `["redis://a", "redis://b"]`.
pub fn yaml_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Failed Redis calls on one node (its admin listener `admin`), all operations together.
pub async fn redis_errors(admin: SocketAddr) -> u64 {
    by_op(admin, "lumen_redis_errors_total")
        .await
        .values()
        .sum::<f64>() as u64
}
