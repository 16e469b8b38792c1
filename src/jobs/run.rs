//! Workers: take jobs off the queue and run each through this process's own proxy, over an
//! internal Unix socket, as the key that submitted it.
//!
//! Chat and completions jobs are always run as streams (asking for the usage chunk), so
//! `/events` watchers get the tokens as they are generated; the final answer is the stream
//! assembled back into the non-stream OpenAI response (the cache's assembler), exactly what
//! the same request without `stream` would have returned.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lumen_plugins::sse::{Assembler, Kind};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use serde_json::{json, Value};

use super::job::{now_us, JobError, Status};
use super::memory;
use super::redis::{self, RedisClaim, RedisJobs};
use super::{Backend, Jobs};
use crate::config::Snapshot;
use crate::openai::Endpoint;
use arc_swap::ArcSwap;
use lumen_plugins::auth::Principal;

/// The header a worker's request carries: a one-time token naming the job it runs.
pub const JOB_TOKEN: &str = "x-lumen-job-token";
/// When the job a worker's request runs was queued (microseconds since the epoch), for the
/// queue wait's span.
pub const JOB_QUEUED: &str = "x-lumen-job-queued-us";
/// Longest stream assembled into a result.
const RESULT_LIMIT: usize = 64 << 20;
/// How often a job refused by its key's token budget is tried again, at most.
const BUDGET_RETRIES: u32 = 5;
const BUDGET_WAIT_MAX: Duration = Duration::from_secs(60);

/// The internal socket for a process: one per pid, so an upgrade's two processes never share.
/// It lives in the service's runtime directory (systemd's `RuntimeDirectory=` sets
/// `$RUNTIME_DIRECTORY`), else the user's (`$XDG_RUNTIME_DIR`), else the temp directory, and is
/// removed on shutdown by [`SocketFile`].
pub fn socket_path() -> PathBuf {
    socket_path_in(|name| std::env::var_os(name), std::process::id())
}

/// Longest Unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;

fn socket_path_in(env: impl Fn(&str) -> Option<std::ffi::OsString>, pid: u32) -> PathBuf {
    let name = format!("lumen-{pid}-jobs.sock");
    let runtime = env("RUNTIME_DIRECTORY")
        // systemd lists one path per `RuntimeDirectory=` entry, colon-separated.
        .and_then(|dirs| dirs.to_string_lossy().split(':').next().map(PathBuf::from))
        .into_iter()
        .chain(env("XDG_RUNTIME_DIR").map(PathBuf::from));
    runtime
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(&name))
        .find(|path| path.as_os_str().len() <= SUN_PATH_MAX)
        .unwrap_or_else(|| std::env::temp_dir().join(name))
}

/// Removes the internal socket's file once the server shuts down (the listener stops accepting
/// at the same signal), so clean exits leave nothing behind.
pub struct SocketFile {
    pub path: PathBuf,
}

#[async_trait]
impl BackgroundService for SocketFile {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // `Err`: the server is gone, which is shutdown too.
        while shutdown.changed().await.is_ok() && !*shutdown.borrow() {}
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the jobs socket");
            }
        }
    }
}

/// The background service running `jobs.workers` workers, and refreshing the queue depth
/// `/health` and the metrics show.
pub struct Workers {
    pub jobs: Arc<Jobs>,
    pub socket: PathBuf,
    pub config: Arc<ArcSwap<Snapshot>>,
}

/// Where a running job's progress goes.
enum Sink<'a> {
    Memory(&'a memory::Job),
    Redis(&'a RedisJobs, &'a RedisClaim, &'a str),
}

impl Sink<'_> {
    /// Records generated text; `true` when the job was asked to stop.
    async fn delta(&self, text: &str) -> bool {
        match self {
            Sink::Memory(job) => {
                job.delta(text);
                false
            }
            Sink::Redis(r, claim, _) => r.delta(claim, text).await,
        }
    }

    /// How long generated text may wait to be reported with what follows it.
    fn batch_every(&self) -> Duration {
        match self {
            Sink::Memory(_) => Duration::ZERO,
            Sink::Redis(..) => Duration::from_millis(25),
        }
    }

    /// Resolves when the job is asked to stop (keeping a Redis claim alive meanwhile).
    async fn stopped(&self) {
        match self {
            Sink::Memory(job) => {
                let mut cancel = job.cancelled();
                let _ = cancel.wait_for(|c| *c).await;
            }
            Sink::Redis(r, claim, consumer) => {
                let every =
                    (r.visibility() / 3).clamp(Duration::from_millis(50), Duration::from_secs(1));
                loop {
                    tokio::time::sleep(every).await;
                    if r.heartbeat(claim, consumer).await {
                        return;
                    }
                }
            }
        }
    }

    async fn finish(&self, status: Status, outcome: Result<Value, JobError>, cost: Option<u64>) {
        match self {
            Sink::Memory(job) => job.finish(outcome, status, cost),
            Sink::Redis(r, claim, _) => {
                if let Err(e) = r.finish(claim, status, &outcome, cost).await {
                    // The claim stays pending: another worker runs the job again after the
                    // visibility timeout.
                    tracing::error!(error = %e, "jobs: could not record a result");
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Workers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        let peer = match HttpPeer::new_uds(&self.socket.to_string_lossy(), false, String::new()) {
            Ok(peer) => Arc::new(peer),
            Err(e) => {
                tracing::error!(error = %e, "jobs: bad internal socket; no workers");
                return;
            }
        };
        let node = format!("lumen-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let mut tasks = Vec::new();
        for i in 0..self.jobs.settings.workers {
            let (jobs, connector, peer) = (self.jobs.clone(), connector.clone(), peer.clone());
            let config = self.config.clone();
            let stop = shutdown.clone();
            let consumer = format!("{node}-{i}");
            tasks.push(tokio::spawn(async move {
                worker(jobs, config, connector, peer, stop, consumer).await;
            }));
        }
        loop {
            self.jobs.refresh().await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {
                    // Running jobs finish within the grace period; nothing new is taken. A
                    // Redis job cut short by the exit is claimed again by another worker.
                    self.jobs.close();
                    for t in tasks {
                        let _ = t.await;
                    }
                    return;
                }
            }
        }
    }
}

async fn worker(
    jobs: Arc<Jobs>,
    config: Arc<ArcSwap<Snapshot>>,
    connector: Arc<Connector>,
    peer: Arc<HttpPeer>,
    mut stop: ShutdownWatch,
    consumer: String,
) {
    match &jobs.backend {
        Backend::Memory(m) => loop {
            let job = tokio::select! {
                job = m.take() => job,
                _ = stop.changed() => None,
            };
            let Some(job) = job else { return };
            if !job.start() {
                jobs.metrics.jobs.with_label_values(&["cancelled"]).inc();
                continue;
            }
            let sink = Sink::Memory(&job);
            let owner = job.owner.clone();
            let id = job.id();
            // Stored as the bytes it was submitted as (checked then): parsed only to run.
            let body: Value = serde_json::from_slice(&job.body).unwrap_or_default();
            run(
                &jobs,
                &connector,
                &peer,
                &sink,
                owner,
                &id,
                job.endpoint,
                &body,
                job.created_us(),
                job.trace.as_deref(),
            )
            .await;
        },
        Backend::Redis(r) => {
            let mut conn = None;
            while !*stop.borrow() {
                if conn.is_none() {
                    match r.link().dedicated("jobs").await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let claim = tokio::select! {
                    claim = r.take(c, &consumer) => claim,
                    _ = stop.changed() => return,
                };
                let claim = match claim {
                    Ok(Some(claim)) => claim,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "jobs: redis queue unavailable; retrying");
                        conn = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let sink = Sink::Redis(r, &claim, &consumer);
                match redis::principal_of(&claim.principal, &config.load().auth) {
                    Ok(owner) => {
                        run(
                            &jobs,
                            &connector,
                            &peer,
                            &sink,
                            owner,
                            &claim.id,
                            claim.endpoint,
                            &claim.body,
                            claim.created_us,
                            claim.trace.as_deref(),
                        )
                        .await
                    }
                    Err(e) => {
                        sink.finish(Status::Failed, Err(e), None).await;
                        jobs.metrics.jobs.with_label_values(&["failed"]).inc();
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    jobs: &Jobs,
    connector: &Connector,
    peer: &HttpPeer,
    sink: &Sink<'_>,
    owner: Arc<Principal>,
    id: &str,
    endpoint: Endpoint,
    body: &Value,
    created_us: u64,
    trace: Option<&str>,
) {
    jobs.metrics
        .job_queue_wait
        .observe(now_us().saturating_sub(created_us) as f64 / 1e6);
    // The token lets the holder act as the job's key: unguessable, from the OS's CSPRNG.
    let token = format!("{:032x}", u128::from_le_bytes(super::secure_random::<16>()));
    let batch_line = id.starts_with(super::BATCH_LINE_PREFIX);
    jobs.register(&token, owner, batch_line);
    let run_started = Instant::now();
    let outcome = tokio::select! {
        outcome = execute(connector, peer, sink, endpoint, body, &token, (trace, created_us)) => outcome,
        _ = sink.stopped() => Err(JobError::cancelled("cancelled while running")),
    };
    // What the request cost, as the pipeline noted it when it settled (before the worker
    // read the answer's end).
    let cost = jobs.take_cost(&token);
    jobs.unregister(&token);
    jobs.metrics
        .job_run
        .observe(run_started.elapsed().as_secs_f64());
    let status = match &outcome {
        Ok(_) => Status::Completed,
        Err(e) if e.kind == "job_cancelled" => Status::Cancelled,
        Err(_) => Status::Failed,
    };
    sink.finish(status, outcome, cost).await;
    jobs.metrics.jobs.with_label_values(&[status.label()]).inc();
}

/// Runs the job's request through the proxy; its answer, or why there is none.
async fn execute(
    connector: &Connector,
    peer: &HttpPeer,
    sink: &Sink<'_>,
    endpoint: Endpoint,
    body: &Value,
    token: &str,
    trace: (Option<&str>, u64),
) -> Result<Value, JobError> {
    let kind = match endpoint {
        Endpoint::ChatCompletions => Some(Kind::Chat),
        Endpoint::Completions => Some(Kind::Completion),
        _ => None,
    };
    let mut body = body.clone();
    if endpoint.translated() {
        // A Responses or Messages job's result is its whole answer, in its own API.
        body["stream"] = Value::Bool(false);
    }
    if kind.is_some() {
        body["stream"] = Value::Bool(true);
        if body.get("stream_options").is_none_or(Value::is_null) {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut tries = 0;
    loop {
        tries += 1;
        // The queue wait is the first try's (a retry's wait is the budget's, not the queue's).
        let trace = (trace.0, if tries == 1 { trace.1 } else { 0 });
        match attempt(connector, peer, sink, endpoint, token, &body, kind, trace).await {
            Err(Retry::After(wait)) if tries <= BUDGET_RETRIES => {
                // The key's token budget is spent for now: the job waits, it does not fail.
                tokio::time::sleep(wait.min(BUDGET_WAIT_MAX)).await;
            }
            Err(Retry::After(_)) => {
                return Err(JobError {
                    message: "the key's token budget stayed exhausted".into(),
                    kind: "rate_limit_exceeded".into(),
                    code: Some("rate_limit_exceeded".into()),
                    status: Some(429),
                })
            }
            Err(Retry::Fail(e)) => return Err(e),
            Ok(v) => return Ok(v),
        }
    }
}

/// Whether an error body is a dollar budget's refusal (`budget_exceeded`).
fn is_budget_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["error"]["type"] == "budget_exceeded")
}

enum Retry {
    After(Duration),
    Fail(JobError),
}

fn internal(message: impl Into<String>) -> Retry {
    Retry::Fail(JobError {
        message: message.into(),
        kind: "api_error".into(),
        code: Some("internal_error".into()),
        status: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    connector: &Connector,
    peer: &HttpPeer,
    sink: &Sink<'_>,
    endpoint: Endpoint,
    token: &str,
    body: &Bytes,
    kind: Option<Kind>,
    (trace, created_us): (Option<&str>, u64),
) -> Result<Value, Retry> {
    let mut head = RequestHeader::build(
        "POST",
        format!("/v1{}", endpoint.suffix()).as_bytes(),
        Some(6),
    )
    .map_err(|e| internal(e.to_string()))?;
    let set = |head: &mut RequestHeader, k: &'static str, v: String| {
        head.insert_header(k, v)
            .map_err(|e| internal(e.to_string()))
    };
    set(&mut head, "host", "lumen-jobs".into())?;
    set(&mut head, "content-type", "application/json".into())?;
    set(&mut head, "content-length", body.len().to_string())?;
    set(&mut head, JOB_TOKEN, token.to_string())?;
    // The run continues the submit's trace; its queue wait is a span of it (the proxy reads
    // JOB_QUEUED only on this internal socket).
    if let Some(trace) = trace {
        set(&mut head, "traceparent", trace.to_string())?;
        if created_us > 0 {
            set(&mut head, JOB_QUEUED, created_us.to_string())?;
        }
    }
    let (mut session, _) = connector
        .get_http_session(peer)
        .await
        .map_err(|e| internal(format!("internal socket: {e}")))?;
    session
        .write_request_header(Box::new(head))
        .await
        .map_err(|e| internal(e.to_string()))?;
    session
        .write_request_body(body.clone(), true)
        .await
        .map_err(|e| internal(e.to_string()))?;
    session
        .finish_request_body()
        .await
        .map_err(|e| internal(e.to_string()))?;
    session
        .read_response_header()
        .await
        .map_err(|e| internal(e.to_string()))?;
    let (status, retry_after, from_lumen) = {
        let h = session
            .response_header()
            .ok_or_else(|| internal("no response head"))?;
        let retry_after = h
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        (
            h.status.as_u16(),
            retry_after,
            h.headers.get("x-lumen-provider").is_none(),
        )
    };
    if status != 200 {
        let mut text = Vec::new();
        while let Ok(Some(chunk)) = session.read_response_body().await {
            text.extend_from_slice(&chunk);
        }
        // A spent dollar budget resets with its day or month: failed now, not retried.
        if status == 429 && from_lumen && !is_budget_refusal(&text) {
            return Err(Retry::After(Duration::from_secs(retry_after.unwrap_or(1))));
        }
        return Err(Retry::Fail(error_of(&text, status)));
    }
    let Some(kind) = kind else {
        let mut text = Vec::new();
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| internal(e.to_string()))?
        {
            text.extend_from_slice(&chunk);
        }
        // Kept for the next job: one internal connection per worker, not one per job.
        connector.release_http_session(session, peer, None).await;
        return serde_json::from_slice(&text).map_err(|e| internal(format!("bad answer: {e}")));
    };
    let mut assembler = Assembler::new(kind, RESULT_LIMIT);
    let mut lines = Lines::default();
    // Text not yet reported: Redis gets it in batches (one call per batch, not per token).
    let mut pending = String::new();
    let mut reported = Instant::now();
    let every = sink.batch_every();
    while let Some(chunk) = session.read_response_body().await.map_err(|e| {
        Retry::Fail(JobError {
            message: format!("the stream broke: {e}"),
            kind: "api_error".into(),
            code: Some("upstream_error".into()),
            status: None,
        })
    })? {
        assembler.push(&chunk);
        for data in lines.push(&chunk) {
            if let Some(error) = data.get("error") {
                return Err(Retry::Fail(error_from(error)));
            }
            let choice = &data["choices"][0];
            if let Some(text) = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
            {
                pending.push_str(text);
            }
        }
        if !pending.is_empty() && reported.elapsed() >= every {
            reported = Instant::now();
            if sink.delta(&std::mem::take(&mut pending)).await {
                return Err(Retry::Fail(JobError::cancelled("cancelled while running")));
            }
        }
    }
    if !pending.is_empty() && sink.delta(&pending).await {
        return Err(Retry::Fail(JobError::cancelled("cancelled while running")));
    }
    let answer = assembler.finish().ok_or_else(|| {
        Retry::Fail(JobError {
            message: "the stream ended before it was complete".into(),
            kind: "api_error".into(),
            code: Some("upstream_error".into()),
            status: None,
        })
    })?;
    connector.release_http_session(session, peer, None).await;
    serde_json::from_slice(&answer).map_err(|e| internal(format!("bad answer: {e}")))
}

fn error_of(body: &[u8], status: u16) -> JobError {
    let mut error = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v["error"].is_object() => error_from(&v["error"]),
        _ => JobError {
            message: format!("HTTP {status}"),
            kind: "api_error".into(),
            code: None,
            status: None,
        },
    };
    error.status = Some(status);
    error
}

fn error_from(error: &Value) -> JobError {
    JobError {
        message: error["message"].as_str().unwrap_or("error").to_string(),
        kind: error["type"].as_str().unwrap_or("api_error").to_string(),
        code: error["code"].as_str().map(str::to_string),
        status: None,
    }
}

/// Splits an SSE stream into its `data:` payloads, chunks split anywhere.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, chunk: &[u8]) -> Vec<Value> {
        self.partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = self.partial[start..].iter().position(|b| *b == b'\n') {
            let line = self.partial[start..start + end].trim_ascii();
            if let Some(data) = line.strip_prefix(b"data:") {
                if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
                    out.push(v);
                }
            }
            start += end + 1;
        }
        self.partial.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_jobs_socket_goes_to_the_runtime_directory_first() {
        let vars = [
            ("RUNTIME_DIRECTORY", "/run/lumen:/run/other"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        assert_eq!(
            socket_path_in(env(&vars), 7),
            PathBuf::from("/run/lumen/lumen-7-jobs.sock")
        );
        assert_eq!(
            socket_path_in(env(&vars[1..]), 7),
            PathBuf::from("/run/user/1000/lumen-7-jobs.sock")
        );
        assert_eq!(
            socket_path_in(env(&[]), 7),
            std::env::temp_dir().join("lumen-7-jobs.sock")
        );
    }

    #[test]
    fn a_runtime_directory_too_long_for_a_socket_path_falls_back() {
        let long = format!("/{}", "d".repeat(120));
        let vars = [("RUNTIME_DIRECTORY", long.as_str())];
        assert_eq!(
            socket_path_in(env(&vars), 7),
            std::env::temp_dir().join("lumen-7-jobs.sock")
        );
    }
}
