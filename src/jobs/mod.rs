//! Async jobs: submit now, collect later.
//!
//! A job is one OpenAI request (chat, completions or embeddings) that a worker runs later
//! through the very same pipeline as a synchronous request: the worker sends it to this
//! process's own proxy over an internal Unix socket ([`run`]), so routing, fallback, cache,
//! token limits, usage accounting and metrics all apply unchanged. The worker's request names
//! the job by a one-time token that only this process knows; the pipeline then acts as the key
//! that submitted the job (its token budgets are reserved when the job starts; its request
//! limit was counted when it was submitted).
//!
//! Two backends behind one facade ([`Jobs`]):
//! - [`memory`] (no `redis:`): a bounded queue and a table in this process. A restart loses
//!   every job, queued, running or finished (clients then get 404).
//! - [`redis`] (`redis:` set): a Redis stream with a consumer group is the queue, job state
//!   and results are hashes with a TTL, progress is a stream per job, so any node answers for
//!   any job and workers on any node (`lumen worker`) run them. A job whose worker died is
//!   claimed again after `jobs.visibility_timeout`, up to `jobs.max_attempts` runs; exactly
//!   one result is recorded.
//!
//! [`api`] turns the HTTP shapes (native `/v1/jobs`, and the two compatible shapes) into calls
//! on [`Jobs`].
//!
//! Imports: `config`, `openai`, `error`, the plugins (`sse`, `redis_link`); the jobs API writes
//! to Pingora's session itself; never `proxy` or `node` (workers reach the pipeline over the
//! socket, not by a call).

pub mod api;
pub mod job;
pub mod memory;
pub mod redis;
pub mod run;
pub mod shapes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lumen_plugins::auth::Principal;
use lumen_plugins::redis_link::RedisLink;
use serde_json::Value;

use crate::openai::Endpoint;

pub use job::{now_us, JobError, JobSettings, JobView, Status, SubmitError, Update};

/// The prefix of the jobs that run a batch's lines (`crate::batches`): they are the lowest
/// priority traffic, and `/v1/jobs` refuses client ids that start with it.
pub const BATCH_LINE_PREFIX: &str = "batch_";

enum Backend {
    Memory(memory::Memory),
    Redis(redis::RedisJobs),
}

/// A running job's owner, what its request cost once the pipeline settled it, and whether it
/// is a batch's line (the lowest priority).
type Running = (Arc<Principal>, Option<u64>, bool);

/// The node's jobs: the backend, and what workers and the pipeline share.
pub struct Jobs {
    pub settings: JobSettings,
    backend: Backend,
    /// Running jobs by token (how the pipeline knows a worker's request): whose they are, what
    /// their request cost once the pipeline settled it (noted there, taken by the worker when
    /// the answer is in), and whether they are batch lines.
    tokens: Mutex<HashMap<String, Running>>,
    running: AtomicUsize,
    closing: AtomicBool,
    /// Queue depth and Redis reachability as last seen (`/health` must not wait on Redis).
    depth: AtomicI64,
    connected: AtomicBool,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Jobs {
    /// In memory, or in Redis (`link`, key prefix) when `redis:` is configured.
    pub fn new(
        settings: JobSettings,
        redis: Option<(Arc<RedisLink>, String)>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Jobs {
        let backend = match redis {
            Some((link, prefix)) => Backend::Redis(redis::RedisJobs::new(link, &prefix, &settings)),
            None => Backend::Memory(memory::Memory::new(&settings)),
        };
        Jobs {
            settings,
            backend,
            tokens: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            depth: AtomicI64::new(0),
            connected: AtomicBool::new(true),
            metrics,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// Queues a job, or returns the existing one when `client_id` was used before by this key
    /// (`Ok((job, false))`). `trace`: the submitting request's `traceparent`, which the run
    /// carries on (its trace links the submit and the run, on whichever node).
    pub async fn submit(
        &self,
        owner: &Arc<Principal>,
        endpoint: Endpoint,
        body: Value,
        client_id: Option<String>,
        trace: Option<String>,
    ) -> Result<(JobView, bool), SubmitError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        let id = client_id.unwrap_or_else(|| new_id("job_"));
        let result = match &self.backend {
            Backend::Memory(m) => m.submit(owner, endpoint, body, id, trace),
            Backend::Redis(r) => r.submit(owner, endpoint, body, id, trace).await,
        };
        if let Ok((_, true)) = &result {
            self.depth.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .jobs_queued
                .set(self.depth.load(Ordering::Relaxed));
        }
        result
    }

    /// A job of `owner`'s, if it exists (and has not expired).
    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<JobView>, SubmitError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.get(owner, id)),
            Backend::Redis(r) => r.get(owner, id).await,
        }
    }

    /// Cancels a queued job at once, or asks its worker to stop a running one.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<Option<JobView>, SubmitError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.cancel(owner, id)),
            Backend::Redis(r) => r.cancel(owner, id).await,
        }
    }

    /// The job's state now, and its changes from here.
    pub async fn subscribe(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<Option<(JobView, String, Subscription)>, SubmitError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m
                .subscribe(owner, id)
                .map(|(v, text, s)| (v, text, Subscription::Memory(s)))),
            Backend::Redis(r) => Ok(r
                .subscribe(owner, id)
                .await?
                .map(|(v, text, s)| (v, text, Subscription::Redis(s)))),
        }
    }

    pub(crate) fn register(&self, token: &str, principal: Arc<Principal>, batch_line: bool) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), (principal, None, batch_line));
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unregister(&self, token: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// Notes what the request of the job running under `token` cost (micro-dollars); nothing
    /// for a token no job runs under.
    pub fn note_cost(&self, token: &str, micros: u64) {
        if let Some((_, cost, _)) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(token)
        {
            *cost = Some(micros);
        }
    }

    /// What the request of the job running under `token` cost, when the pipeline noted it.
    pub(crate) fn take_cost(&self, token: &str) -> Option<u64> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .and_then(|(_, cost, _)| *cost)
    }

    /// Whether the job running under `token` is a batch's line: it yields to interactive
    /// requests (`batches.capacity_share`).
    pub fn is_batch_line(&self, token: &str) -> bool {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .is_some_and(|(_, _, batch)| *batch)
    }

    /// The key a worker's internal request runs as, by its token.
    pub fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .map(|(principal, _, _)| principal.clone())
    }

    /// Stops taking jobs (graceful shutdown).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Refreshes what `/health` and the queue gauge show; drops expired results (memory).
    pub async fn refresh(&self) {
        let depth = match &self.backend {
            Backend::Memory(m) => {
                m.sweep(self.settings.result_ttl);
                Ok(m.queued() as i64)
            }
            Backend::Redis(r) => r.depth().await,
        };
        match depth {
            Ok(d) => {
                self.depth.store(d, Ordering::Relaxed);
                self.connected.store(true, Ordering::Relaxed);
                self.metrics.jobs_queued.set(d);
            }
            Err(_) => self.connected.store(false, Ordering::Relaxed),
        }
    }

    /// `/health`'s `jobs` object.
    pub fn health(&self) -> JobsHealth {
        JobsHealth {
            backend: self.backend(),
            redis_connected: match self.backend {
                Backend::Redis(_) => Some(self.connected.load(Ordering::Relaxed)),
                Backend::Memory(_) => None,
            },
            queue_depth: self.depth.load(Ordering::Relaxed).max(0) as u64,
            running: self.running() as u64,
            workers: self.settings.workers as u64,
        }
    }
}

/// The job engine in `/health`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobsHealth {
    /// `memory` or `redis`.
    pub backend: &'static str,
    /// Whether the Redis backend answers (absent in memory).
    pub redis_connected: Option<bool>,
    pub queue_depth: u64,
    pub running: u64,
    pub workers: u64,
}

/// A watcher of one job.
pub enum Subscription {
    Memory(memory::MemorySub),
    Redis(redis::RedisSub),
}

impl Subscription {
    /// The next change; `None` when no more will come (the job ended or disappeared).
    /// Waits at most `idle` (then `Some(None)`: nothing happened, e.g. time for a keep-alive).
    pub async fn next(&mut self, idle: Duration) -> Option<Option<Update>> {
        match self {
            Subscription::Memory(s) => s.next(idle).await,
            Subscription::Redis(s) => s.next(idle).await,
        }
    }
}

/// `prefix` and 24 random base32 characters (120 bits from the OS's CSPRNG): an id names a job
/// (`job_`), a batch or a file to its owner, so it must not be guessable from others.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut id = String::with_capacity(prefix.len().saturating_add(24));
    id.push_str(prefix);
    for b in secure_random::<24>() {
        if let Some(&c) = ALPHABET.get(usize::from(b & 31)) {
            id.push(char::from(c));
        }
    }
    id
}

/// `N` bytes from the operating system's CSPRNG. Should the OS refuse (it does not on Linux
/// once booted), the process-local generator is used with a log line, rather than fail jobs.
pub fn secure_random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    if let Err(e) = getrandom::fill(&mut bytes) {
        tracing::error!(error = %e, "OS random source failed; using the process generator");
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes
}
