//! What a job is, for every part of the engine: the validated `jobs:` settings, a job's status,
//! view and updates, and the errors of submitting one. A leaf: the queue backends (`memory`,
//! `redis`), the workers and the HTTP shapes all read it; it imports nothing of its parent.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::config::problem::Problem;
use crate::config::raw::RawJobs;

/// The validated `jobs:` section.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub workers: usize,
    pub queue_size: usize,
    pub max_queued_per_key: usize,
    pub result_ttl: Duration,
    pub wait_timeout: Duration,
    pub default_model: Option<String>,
    /// Without its trailing slash (`""` for `/`).
    pub compat_prefix: String,
    pub shape_a: bool,
    pub shape_b: bool,
    pub max_attempts: u32,
    pub visibility_timeout: Duration,
}

impl JobSettings {
    pub fn build(raw: &RawJobs, problems: &mut Vec<Problem>) -> JobSettings {
        if raw.queue_size == 0 {
            problems.push(Problem::at("jobs.queue_size", "must be at least 1"));
        }
        if raw.max_queued_per_key == 0 {
            problems.push(Problem::at("jobs.max_queued_per_key", "must be at least 1"));
        }
        if raw.max_attempts == 0 {
            problems.push(Problem::at("jobs.max_attempts", "must be at least 1"));
        }
        if raw.visibility_timeout < Duration::from_millis(100) {
            problems.push(Problem::at(
                "jobs.visibility_timeout",
                "must be at least 100ms",
            ));
        }
        if !raw.compat_prefix.starts_with('/') {
            problems.push(Problem::at(
                "jobs.compat_prefix",
                format!("`{}` must start with /", raw.compat_prefix),
            ));
        }
        JobSettings {
            workers: raw.workers,
            queue_size: raw.queue_size.max(1),
            max_queued_per_key: raw.max_queued_per_key.max(1),
            result_ttl: raw.result_ttl,
            wait_timeout: raw.wait_timeout,
            default_model: raw.default_model.clone(),
            compat_prefix: raw.compat_prefix.trim_end_matches('/').to_string(),
            shape_a: raw.shape_a,
            shape_b: raw.shape_b,
            max_attempts: raw.max_attempts.max(1),
            visibility_timeout: raw.visibility_timeout,
        }
    }
}

/// Where a job is in its life (as the native API spells it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = JobStatus)]
pub enum Status {
    Queued,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(label: &str) -> Option<Status> {
        Some(match label {
            "queued" => Status::Queued,
            "processing" => Status::Processing,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// Why a job failed, in OpenAI's error terms.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub code: Option<String>,
    /// The HTTP status the pipeline answered the job's request with, when it answered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl JobError {
    pub fn cancelled(message: &str) -> JobError {
        JobError {
            message: message.into(),
            kind: "job_cancelled".into(),
            code: Some("cancelled".into()),
            status: None,
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub id: String,
    pub status: Status,
    /// Unix microseconds.
    pub created_us: u64,
    pub started_us: Option<u64>,
    pub finished_us: Option<u64>,
    /// The upstream's OpenAI answer, once completed.
    pub result: Option<Value>,
    pub error: Option<JobError>,
    /// What its request cost at the configured prices, in micro-dollars, once completed.
    pub cost_micros: Option<u64>,
}

impl JobView {
    /// A job just submitted.
    pub fn queued(id: String, created_us: u64) -> JobView {
        JobView {
            id,
            status: Status::Queued,
            created_us,
            started_us: None,
            finished_us: None,
            result: None,
            error: None,
            cost_micros: None,
        }
    }

    /// The generated text of a completed chat or completions job.
    pub fn text(&self) -> Option<String> {
        let choice = self.result.as_ref()?["choices"].get(0)?;
        choice["message"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .map(str::to_string)
    }
}

/// What a job's watchers are told after the state they started from.
#[derive(Debug, Clone)]
pub enum Update {
    Status(Status),
    Delta(String),
}

/// Unix time in microseconds (job timestamps: queue waits are often well under a millisecond).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Why a jobs call could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the job queue is full ({0} jobs); retry later")]
    QueueFull(usize),
    #[error("this key already has {0} jobs waiting; retry when some have started")]
    KeyFull(usize),
    #[error("this node is shutting down and takes no new jobs")]
    ShuttingDown,
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
}
