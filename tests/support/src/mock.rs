//! A mock OpenAI-compatible provider: the one stand-in tests may use, because cloud providers
//! cannot be reached. It speaks HTTP/1.1 with keep-alive, and records every request it receives
//! (method, path, headers, body) so tests can check what the gateway really sent.
//!
//! Its behaviour is chosen by the **model name it receives** (so a gateway route can aim a
//! target at a failure mode by naming the target's model) and by two optional body fields the
//! gateway forwards untouched:
//!
//! | model            | behaviour |
//! |------------------|-----------|
//! | anything else    | a normal answer for the endpoint (chat, completions, embeddings, rerank) |
//! | `status-NNN`     | HTTP NNN with an OpenAI error body (`429` adds `retry-after`, 1 s unless `mock_retry_after`) |
//! | `hang`           | reads the request, never answers |
//! | `drop`           | closes the connection without answering |
//! | `drop-after-head`| sends a 200 response head, then closes before any body |
//! | `hang-after-head`| sends a 200 response head, then never sends the body |
//! | `drop-mid-stream`| streams two chunks, then closes the connection mid-stream |
//! | `empty`          | a 200 with an empty body |
//! | `comment-then-drop` | a 200 SSE head and a `: processing` comment, then closes |
//! | `slow-NNN`       | a normal answer after NNN ms |
//! | `ttft-B-P-T`     | a normal answer after B ms, or after T ms for P% of requests at random (a long tail) |
//! | `fail-first-NNN` | after NNN ms, a 503 for the first such request in the process, then normal answers |
//! | `flaky-NN`       | fails NN% of requests at random (503, 429, a drop, or a drop after the head) |
//! | `interim-100`    | a `100 Continue` interim answer first, then a normal answer |
//! | `no-done`        | a stream that ends (chunked terminator) without `data: [DONE]` |
//! | `http10-stream`  | an HTTP/1.0 stream, close-delimited, cut before `data: [DONE]` |
//! | `embed-short`    | an embeddings answer with one vector fewer than the inputs |
//! | `ignores-stream` | a whole JSON answer, even to a stream request |
//! | `whole-then-drop` | a 200 JSON head and the start of its body, then closes |
//!
//! Body fields: `mock_chunks` (stream chunk count, default 3), `mock_delay_ms` (delay before each
//! stream chunk, default 0), `mock_one_write` (the whole stream in one write, so it all reaches
//! the gateway at once), `mock_retry_after` (seconds, for `status-429`), `mock_headers`
//! (an object of extra response headers on a normal answer), `mock_usage` (the `usage` object a
//! chat answer or stream reports, as given). `GET /v1/models` lists a few
//! models (with HTTP NNN instead when the path has a `/models-NNN/` segment); `GET /_mock/requests` returns the recorded requests as JSON (for tests in other
//! languages). Health probes (user agent `lumen-health-probe`) are counted, not recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-cased names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// A running mock on 127.0.0.1, on its own runtime thread; stops when dropped.
pub struct MockUpstream {
    pub addr: SocketAddr,
    log: Log,
    probes: Arc<std::sync::atomic::AtomicUsize>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl MockUpstream {
    /// Starts on a free port with request recording on.
    pub fn start() -> MockUpstream {
        Self::start_on(0, true, 2)
    }

    pub fn start_on(port: u16, record: bool, threads: usize) -> MockUpstream {
        let std_listener =
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind mock upstream");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_log = record.then(|| log.clone());
        let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server_probes = probes.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server_connections = connections.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()
                .expect("mock runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                tokio::select! {
                    _ = serve_counting(listener, server_log, server_probes, server_connections) => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_background();
        });
        MockUpstream {
            addr,
            log,
            probes,
            connections,
            _stop: stop,
        }
    }

    /// Health probes received so far.
    pub fn probes(&self) -> usize {
        self.probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut l) = self.log.lock() {
            l.clear();
        }
    }
}

type Counter = Arc<std::sync::atomic::AtomicUsize>;

/// `fail-first-NNN`: whether the first such request (in this process) has failed yet.
static FAILED_FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, log: Option<Log>) {
    serve_counting(listener, log, Counter::default(), Counter::default()).await
}

async fn serve_counting(
    listener: TcpListener,
    log: Option<Log>,
    probes: Counter,
    connections: Counter,
) {
    // Connections end with the server: a stopped mock must look like a dead provider.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (log, probes) = (log.clone(), probes.clone());
        tasks.spawn(async move {
            let _ = connection(stream, log, probes).await;
        });
        while tasks.try_join_next().is_some() {}
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let mut tmp = [0u8; 16 * 1024];
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < length {
        let mut tmp = vec![0u8; (length - buf.len()).min(256 * 1024)];
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

async fn connection(
    mut stream: TcpStream,
    log: Option<Log>,
    probes: Counter,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 * 1024);
    while let Some(req) = read_request(&mut stream, &mut buf).await? {
        let probe = req
            .headers
            .iter()
            .any(|(k, v)| k == "user-agent" && v == "lumen-health-probe");
        if probe {
            probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if let Some(log) = &log {
            if let Ok(mut l) = log.lock() {
                l.push(Recorded {
                    method: req.method.clone(),
                    path: req.path.clone(),
                    headers: req.headers.clone(),
                    body: req.body.clone(),
                });
            }
        }
        if !answer(&mut stream, &req, log.as_ref()).await? {
            return Ok(());
        }
    }
    Ok(())
}

async fn write_json(
    stream: &mut TcpStream,
    status: u16,
    extra: &str,
    body: &Value,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body)?;
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: upstream-own-id\r\n{extra}\r\n",
        reason(status),
        body.len()
    );
    let mut wire = head.into_bytes();
    wire.extend_from_slice(&body);
    stream.write_all(&wire).await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Answers one request; `Ok(false)` closes the connection.
async fn answer(stream: &mut TcpStream, req: &Request, log: Option<&Log>) -> std::io::Result<bool> {
    if req.method == "GET" && req.path.ends_with("/_mock/requests") {
        let recorded: Vec<Value> = log
            .and_then(|l| l.lock().ok().map(|l| l.clone()))
            .unwrap_or_default()
            .iter()
            .filter(|r| !r.path.ends_with("/_mock/requests"))
            .map(|r| {
                json!({
                    "method": r.method, "path": r.path,
                    "headers": r.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                    "body": String::from_utf8_lossy(&r.body),
                })
            })
            .collect();
        write_json(stream, 200, "", &json!(recorded)).await?;
        return Ok(true);
    }
    if req.method == "GET" && req.path.ends_with("/models") {
        // A base URL with a `/models-NNN/` segment answers its model list with HTTP NNN (how
        // providers without a public model list answer health probes).
        if let Some(code) = req
            .path
            .split('/')
            .find_map(|seg| seg.strip_prefix("models-")?.parse::<u16>().ok())
        {
            let error = json!({"error": {"message": "mock: no model list", "type": "invalid_request_error", "param": null, "code": null}});
            write_json(stream, code, "", &error).await?;
            return Ok(true);
        }
        let data: Vec<Value> = ["mock-small", "mock-large", "mock-embed"]
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
            .collect();
        write_json(stream, 200, "", &json!({"object": "list", "data": data})).await?;
        return Ok(true);
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let mut model = body["model"].as_str().unwrap_or("").to_string();
    if let Some(pct) = model
        .strip_prefix("flaky-")
        .and_then(|p| p.parse::<u32>().ok())
    {
        model = if fastrand::u32(..100) < pct {
            ["status-503", "status-429", "drop", "drop-after-head"][fastrand::usize(..4)]
        } else {
            "mock-ok"
        }
        .to_string();
    }
    if let Some(ms) = model
        .strip_prefix("slow-")
        .and_then(|p| p.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(spec) = model.strip_prefix("ttft-") {
        let parts: Vec<u64> = spec.split('-').filter_map(|p| p.parse().ok()).collect();
        if let [base, pct, tail] = parts[..] {
            let ms = if fastrand::u64(..100) < pct {
                tail
            } else {
                base
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    if let Some(ms) = model
        .strip_prefix("fail-first-")
        .and_then(|p| p.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if !FAILED_FIRST.swap(true, std::sync::atomic::Ordering::SeqCst) {
            model = "status-503".to_string();
        }
    }
    if let Some(code) = model
        .strip_prefix("status-")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let extra = if code == 429 {
            format!(
                "retry-after: {}\r\n",
                body["mock_retry_after"].as_u64().unwrap_or(1)
            )
        } else {
            String::new()
        };
        let err = if req
            .path
            .split('?')
            .next()
            .unwrap_or("")
            .ends_with("/messages")
        {
            json!({"type": "error", "error": {"type": "mock_error", "message": format!("mock upstream says {code}")}})
        } else {
            json!({"error": {"message": format!("mock upstream says {code}"), "type": "mock_error", "param": null, "code": format!("mock_{code}")}})
        };
        write_json(stream, code, &extra, &err).await?;
        return Ok(true);
    }
    match model.as_str() {
        "interim-100" => {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            stream.flush().await?;
        }
        "no-done" | "http10-stream" => {
            let head: &[u8] = if model == "no-done" {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            } else {
                b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
            };
            stream.write_all(head).await?;
            for i in 0..2 {
                let event = format!(
                    "data: {}\n\n",
                    json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                           "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]})
                );
                if model == "no-done" {
                    write_chunk(stream, event.as_bytes()).await?;
                } else {
                    stream.write_all(event.as_bytes()).await?;
                    stream.flush().await?;
                }
            }
            if model == "no-done" {
                stream.write_all(b"0\r\n\r\n").await?;
                return Ok(true);
            }
            return Ok(false);
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(false);
        }
        "drop" => return Ok(false),
        "whole-then-drop" => {
            // A whole JSON answer (whatever `stream` said) cut off mid-body.
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"id\":\"x\",\"choices\":[")
                .await?;
            stream.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(false);
        }
        "empty" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(true);
        }
        "comment-then-drop" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await?;
            write_chunk(stream, b": processing\n\n").await?;
            return Ok(false);
        }
        "drop-after-head" | "hang-after-head" => {
            let kind = if body["stream"].as_bool().unwrap_or(false) {
                "text/event-stream\r\ntransfer-encoding: chunked"
            } else {
                "application/json\r\ncontent-length: 100"
            };
            stream
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\n\r\n").as_bytes())
                .await?;
            stream.flush().await?;
            if model == "hang-after-head" {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            return Ok(false);
        }
        _ => {}
    }
    let extra_headers: String = body["mock_headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| format!("{k}: {}\r\n", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let stream_mode = body["stream"].as_bool().unwrap_or(false) && model != "ignores-stream";
    let path = req.path.split('?').next().unwrap_or("");
    if path.ends_with("/messages") {
        return messages_answer(stream, &body, &model, stream_mode).await;
    }
    if path.ends_with("/responses") {
        return responses_answer(stream, &body, &model, stream_mode).await;
    }
    if path.ends_with("/chat/completions") && wants_tool_call(&body) {
        return tool_call_answer(stream, &body, &model, stream_mode).await;
    }
    if stream_mode && (path.ends_with("/chat/completions") || path.ends_with("/completions")) {
        return stream_answer(stream, &body, &model, path.ends_with("/chat/completions")).await;
    }
    let response = if path.ends_with("/chat/completions") {
        let tool_result = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .filter(|m| m["role"] == "tool")
            .and_then(|m| m["content"].as_str());
        let text = match tool_result {
            Some(result) => format!("mock reply from {model}: the tool said {result}"),
            None => format!("mock reply from {model}"),
        };
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": mock_usage(&body).unwrap_or_else(|| json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})),
        })
    } else if path.ends_with("/completions") {
        json!({
            "id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "text": format!("mock completion from {model}"), "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        })
    } else if path.ends_with("/embeddings") {
        let items: Vec<Value> = match &body["input"] {
            Value::Array(items) if items.iter().all(Value::is_string) => items.clone(),
            other => vec![other.clone()],
        };
        let mut items = items;
        if model == "embed-short" {
            items.pop();
        }
        let inputs = items.len();
        // A vector that depends on the input's text, so tests can tell inputs apart.
        let data: Vec<Value> = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let text = item.to_string();
                let sum: u32 = text.bytes().map(u32::from).sum();
                json!({"object": "embedding", "index": i,
                       "embedding": [text.len() as f64 / 100.0, f64::from(sum % 1000) / 1000.0, 0.5]})
            })
            .collect();
        json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": inputs * 3, "total_tokens": inputs * 3}})
    } else if path.ends_with("/rerank") {
        let docs = body["documents"].as_array().map_or(0, Vec::len);
        let results: Vec<Value> = (0..docs)
            .map(|i| json!({"index": i, "relevance_score": 1.0 / (i as f64 + 1.0)}))
            .collect();
        json!({"id": "rerank-mock", "model": model, "results": results, "usage": {"total_tokens": docs * 4}})
    } else {
        write_json(stream, 404, "", &json!({"error": {"message": "mock: unknown path", "type": "invalid_request_error", "param": null, "code": null}})).await?;
        return Ok(true);
    };
    write_json(stream, 200, &extra_headers, &response).await?;
    Ok(true)
}

/// A chat request with tools whose last message is not a tool's result: the mock calls the
/// first tool (as a model would), with `{"city":"Paris"}`. After a tool's result, it answers
/// in text quoting the result.
fn wants_tool_call(body: &Value) -> bool {
    let has_tools = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    let last_is_tool = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "tool");
    has_tools && body["tool_choice"] != "none" && !last_is_tool
}

/// The tool call of [`wants_tool_call`]; streamed, its arguments arrive in three pieces.
async fn tool_call_answer(
    stream: &mut TcpStream,
    body: &Value,
    model: &str,
    stream_mode: bool,
) -> std::io::Result<bool> {
    let name = body["tools"][0]["function"]["name"]
        .as_str()
        .unwrap_or("tool");
    let arguments = r#"{"city":"Paris"}"#;
    let usage = json!({"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15});
    if !stream_mode {
        let answer = json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": arguments}}]}}],
            "usage": usage,
        });
        write_json(stream, 200, "", &answer).await?;
        return Ok(true);
    }
    let chunk = |delta: Value, finish: Value| {
        let payload = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
                             "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {payload}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function",
                                                    "function": {"name": name, "arguments": ""}}]}),
        Value::Null,
    )];
    for piece in [r#"{"city""#, r#":"Par"#, r#"is"}"#] {
        events.push(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            Value::Null,
        ));
    }
    events.push(chunk(json!({}), json!("tool_calls")));
    if body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false)
    {
        let payload = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
                             "model": model, "choices": [], "usage": usage});
        events.push(format!("data: {payload}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    let mut wire = Vec::new();
    wire.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    stream.write_all(&wire).await?;
    wire.clear();
    for event in events {
        frame(&mut wire, event.as_bytes());
        write_out(stream, &mut wire).await?;
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    write_out(stream, &mut wire).await?;
    Ok(true)
}

/// The usage a test asked for (`mock_usage`: the `usage` object to report, as is).
fn mock_usage(body: &Value) -> Option<Value> {
    body.get("mock_usage").filter(|u| u.is_object()).cloned()
}

async fn stream_answer(
    stream: &mut TcpStream,
    body: &Value,
    model: &str,
    chat: bool,
) -> std::io::Result<bool> {
    let chunks = body["mock_chunks"].as_u64().unwrap_or(3);
    let delay = Duration::from_millis(body["mock_delay_ms"].as_u64().unwrap_or(0));
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let drop_mid = model == "drop-mid-stream";
    // Everything into `wire`; written after each chunk, or once at the end with `mock_one_write`.
    let one_write = body["mock_one_write"].as_bool().unwrap_or(false);
    let mut wire = Vec::new();
    wire.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n");
    if !one_write {
        stream.write_all(&wire).await?;
        wire.clear();
    }
    let event = |payload: &Value| format!("data: {payload}\n\n");
    for i in 0..chunks {
        if drop_mid && i == 2 {
            return Ok(false);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let payload = if chat {
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                   "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]})
        } else {
            json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": model,
                   "choices": [{"index": 0, "text": format!("tok{i} "), "finish_reason": null}]})
        };
        frame(&mut wire, event(&payload).as_bytes());
        if !one_write {
            write_out(stream, &mut wire).await?;
        }
    }
    let last = if chat {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    } else {
        json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    };
    let mut tail = event(&last);
    if include_usage {
        let usage = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                           "choices": [], "usage": mock_usage(body).unwrap_or_else(|| json!({"prompt_tokens": 7, "completion_tokens": chunks, "total_tokens": 7 + chunks}))});
        tail.push_str(&event(&usage));
    }
    tail.push_str("data: [DONE]\n\n");
    frame(&mut wire, tail.as_bytes());
    wire.extend_from_slice(b"0\r\n\r\n");
    write_out(stream, &mut wire).await?;
    Ok(true)
}

/// Anthropic's Messages API (`POST …/messages`), for `api: anthropic` providers: a text
/// answer (`tok0 tok1 tok2 ` streamed), or with tools and no tool result yet a `tool_use` of
/// the first tool with `{"city":"Paris"}` (its input streamed in three pieces); after a tool
/// result, text quoting it. `drop-mid-stream` drops the connection after two deltas.
async fn messages_answer(
    stream: &mut TcpStream,
    body: &Value,
    model: &str,
    stream_mode: bool,
) -> std::io::Result<bool> {
    let last = body["messages"].as_array().and_then(|m| m.last());
    let tool_result = last
        .and_then(|m| m["content"].as_array())
        .and_then(|blocks| blocks.iter().find(|b| b["type"] == "tool_result"))
        .map(|b| match &b["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    let tool = body["tools"][0]["name"]
        .as_str()
        .filter(|_| tool_result.is_none() && body["tool_choice"]["type"] != "none");
    let id = "msg_mock_1";
    if !stream_mode {
        let (content, stop) = match (tool, &tool_result) {
            (Some(name), _) => (
                json!([{"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {"city": "Paris"}}]),
                "tool_use",
            ),
            (None, Some(result)) => (
                json!([{"type": "text", "text": format!("mock reply from {model}: the tool said {result}")}]),
                "end_turn",
            ),
            (None, None) => (
                json!([{"type": "text", "text": format!("mock reply from {model}")}]),
                "end_turn",
            ),
        };
        let answer = json!({"id": id, "type": "message", "role": "assistant", "model": model,
                            "content": content, "stop_reason": stop, "stop_sequence": null,
                            "usage": {"input_tokens": 7, "output_tokens": 4}});
        write_json(stream, 200, "", &answer).await?;
        return Ok(true);
    }
    let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 7, "output_tokens": 1}}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let stop = match tool {
        Some(name) => {
            events.push(event("content_block_start", json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {}}})));
            for piece in [r#"{"city""#, r#":"Par"#, r#"is"}"#] {
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
            "tool_use"
        }
        None => {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            for i in 0..3 {
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": format!("tok{i} ")}}),
                ));
            }
            "end_turn"
        }
    };
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 3}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    let mut wire = Vec::new();
    wire.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    stream.write_all(&wire).await?;
    wire.clear();
    for (i, e) in events.into_iter().enumerate() {
        if model == "drop-mid-stream" && i == 5 {
            return Ok(false);
        }
        frame(&mut wire, e.as_bytes());
        write_out(stream, &mut wire).await?;
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    write_out(stream, &mut wire).await?;
    Ok(true)
}

/// OpenAI's Responses API (`POST …/responses`), for `api: responses` providers: a text
/// answer naming the model and the tools it was given (`mock responses reply from M with
/// [tools]`), streamed as `tok0 tok1 tok2 `; its id is `resp_mock_<n>` where n counts the
/// input items it got (a continuation resolved by the provider shows as `prev=<id>`).
async fn responses_answer(
    stream: &mut TcpStream,
    body: &Value,
    model: &str,
    stream_mode: bool,
) -> std::io::Result<bool> {
    let items = body["input"].as_array().map_or(1, Vec::len);
    let id = format!("resp_mock_{items}");
    let tools: Vec<&str> = body["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["type"].as_str()).collect())
        .unwrap_or_default();
    let prev = body["previous_response_id"]
        .as_str()
        .map(|p| format!(" prev={p}"))
        .unwrap_or_default();
    let text = format!("mock responses reply from {model} with {tools:?}{prev}");
    let usage = json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8});
    let message = |text: &str, status: &str| {
        json!({"type": "message", "id": "msg_mock", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": 1_700_000_000, "status": status,
               "model": model, "output": output, "usage": usage, "error": null,
               "incomplete_details": null, "instructions": null, "metadata": {},
               "parallel_tool_calls": true, "temperature": null, "tool_choice": "auto",
               "tools": [], "top_p": null})
    };
    if !stream_mode {
        let answer = response("completed", json!([message(&text, "completed")]), usage);
        write_json(stream, 200, "", &answer).await?;
        return Ok(true);
    }
    let mut seq = 0;
    let mut events = Vec::new();
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        events.push(format!("event: {kind}\ndata: {data}\n\n"));
    };
    push(
        "response.created",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    );
    push(
        "response.in_progress",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    );
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": message("", "in_progress")}),
    );
    push(
        "response.content_part.added",
        json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0,
        "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    for i in 0..3 {
        push(
            "response.output_text.delta",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0,
            "delta": format!("tok{i} "), "logprobs": []}),
        );
    }
    let full = "tok0 tok1 tok2 ";
    push(
        "response.output_text.done",
        json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0,
        "text": full, "logprobs": []}),
    );
    push(
        "response.content_part.done",
        json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0,
        "part": {"type": "output_text", "text": full, "annotations": []}}),
    );
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": message(full, "completed")}),
    );
    push(
        "response.completed",
        json!({"response": response("completed", json!([message(full, "completed")]), usage)}),
    );
    let mut wire = Vec::new();
    wire.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for e in events {
        frame(&mut wire, e.as_bytes());
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    write_out(stream, &mut wire).await?;
    Ok(true)
}

/// Appends `data` as one chunk of a chunked body.
fn frame(wire: &mut Vec<u8>, data: &[u8]) {
    wire.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    wire.extend_from_slice(data);
    wire.extend_from_slice(b"\r\n");
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut wire = Vec::with_capacity(data.len().saturating_add(16));
    frame(&mut wire, data);
    write_out(stream, &mut wire).await
}

async fn write_out(stream: &mut TcpStream, wire: &mut Vec<u8>) -> std::io::Result<()> {
    stream.write_all(wire).await?;
    wire.clear();
    stream.flush().await
}
