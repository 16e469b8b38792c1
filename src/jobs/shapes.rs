//! The request and response bodies of the jobs API, as types: the handlers read and write
//! these, and `/openapi.json` is generated from the same types, so the spec cannot drift from
//! what is answered.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::job::{JobView, Status};

/// The OpenAI endpoint a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum JobEndpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
    #[serde(rename = "/v1/responses")]
    Responses,
    #[serde(rename = "/v1/messages")]
    Messages,
}

/// `POST /v1/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"endpoint": "/v1/chat/completions", "body": {"model": "fast", "messages": [{"role": "user", "content": "Say hi"}]}, "job_id": "nightly-42"}))]
pub struct SubmitJob {
    pub endpoint: JobEndpoint,
    /// The OpenAI request, exactly as it would be sent to `endpoint`. (Checked after the
    /// `job_id` lookup, so a retried submit always finds its job.)
    #[serde(default)]
    #[schema(value_type = Object, required = true)]
    pub body: Value,
    /// A client-chosen id (1 to 128 of `A-Z a-z 0-9 . _ : -`): submitting it again returns the
    /// existing job instead of a second one.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub job_id: Option<String>,
}

/// Timings and tokens of a finished job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobMetrics {
    /// Seconds from submit to start.
    pub queue_wait_time: Option<f64>,
    /// Seconds from start to end.
    pub processing_time: Option<f64>,
    /// Seconds from submit to end.
    pub total_time: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub tokens_per_second: Option<f64>,
    /// What the job's request cost at the configured prices, in USD (its target's price, the
    /// usage it reported); absent when unpriced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// An error in OpenAI's terms.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

/// Every error Lumen answers itself: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A job (`GET /v1/jobs/{id}`; also what submit and cancel answer).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobObject {
    pub id: String,
    /// Always `job`.
    pub object: &'static str,
    pub status: Status,
    /// Unix seconds.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// The upstream's OpenAI answer, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<JobMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

impl JobView {
    /// `metrics` of a finished job: queue wait, processing and total seconds, tokens, tokens/s.
    pub fn metrics(&self) -> JobMetrics {
        let secs = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        let usage = self.result.as_ref().map(|r| &r["usage"]);
        let prompt = usage.and_then(|u| u["prompt_tokens"].as_u64());
        let completion = usage.and_then(|u| u["completion_tokens"].as_u64());
        let processing = secs(self.started_us, self.finished_us);
        JobMetrics {
            queue_wait_time: secs(Some(self.created_us), self.started_us),
            processing_time: processing,
            total_time: secs(Some(self.created_us), self.finished_us),
            prompt_tokens: prompt,
            completion_tokens: completion,
            tokens_per_second: match (completion, processing) {
                (Some(c), Some(p)) if p > 0.0 => Some(c as f64 / p),
                _ => None,
            },
            cost_usd: self.cost_micros.map(|c| c as f64 / 1e6),
        }
    }

    /// The native answer.
    pub fn native(&self) -> JobObject {
        let completed = self.status == Status::Completed;
        JobObject {
            id: self.id.clone(),
            object: "job",
            status: self.status,
            created_at: self.created_us / 1_000_000,
            started_at: self.started_us.map(|t| t / 1_000_000),
            finished_at: self.finished_us.map(|t| t / 1_000_000),
            result: completed.then(|| self.result.clone().unwrap_or(Value::Null)),
            metrics: completed.then(|| self.metrics()),
            error: self.error.as_ref().map(|e| ErrorDetail {
                message: e.message.clone(),
                kind: e.kind.clone(),
                param: None,
                code: e.code.clone(),
            }),
        }
    }
}

/// Shape A's states: a failed or cancelled job is `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Processing,
    Completed,
    Error,
}

impl From<Status> for TaskState {
    fn from(s: Status) -> TaskState {
        match s {
            Status::Queued => TaskState::Queued,
            Status::Processing => TaskState::Processing,
            Status::Completed => TaskState::Completed,
            Status::Failed | Status::Cancelled => TaskState::Error,
        }
    }
}

/// Shape A: `POST /generate`. A setting that is absent or null takes its default.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"prompt": "Write a haiku about the edge", "max_tokens": 64}))]
pub struct GenerateTask {
    pub prompt: String,
    #[serde(default)]
    #[schema(default = 512, minimum = 1)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    #[schema(default = 0.7)]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schema(default = 0.9)]
    pub top_p: Option<f64>,
    /// Passed upstream as OpenAI's `user`.
    #[serde(default)]
    pub user_id: Option<String>,
    /// A model of the routing table; `jobs.default_model` when absent.
    #[serde(default)]
    pub model: Option<String>,
}

impl GenerateTask {
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens.unwrap_or(512)
    }
    pub fn temperature(&self) -> f64 {
        self.temperature.unwrap_or(0.7)
    }
    pub fn top_p(&self) -> f64 {
        self.top_p.unwrap_or(0.9)
    }
}

/// Shape A: a task's state (`POST /generate`, `GET /status/{task_id}`, and `GET
/// /result/{task_id}` until it ends).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskStatus {
    pub status: TaskState,
    pub task_id: String,
    pub message: String,
}

/// Shape A: `GET /result/{task_id}` of a completed task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskResult {
    /// `completed`.
    pub status: TaskState,
    pub task_id: String,
    /// The generated text.
    pub result: String,
    pub metrics: JobMetrics,
}

/// Shape A: `GET /result/{task_id}` of a failed or cancelled task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskError {
    /// `error`.
    pub status: TaskState,
    pub task_id: String,
    pub error_message: String,
    pub error_type: String,
}

/// Shape A: `GET /result/{task_id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TaskAnswer {
    Completed(TaskResult),
    Error(TaskError),
    Pending(TaskStatus),
}

/// Shape B: generation settings. A setting that is absent or null takes its default.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct JobMeta {
    #[serde(default)]
    #[schema(default = 0.2)]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schema(default = 8096, minimum = 1)]
    pub tokens_limit: Option<u64>,
    /// Passed upstream as OpenAI's `stop`: one string or a list.
    #[serde(default)]
    pub stop_words: Option<StopWords>,
    /// A model of the routing table; `jobs.default_model` when absent.
    #[serde(default)]
    pub model: Option<String>,
}

impl JobMeta {
    pub fn temperature(&self) -> f64 {
        self.temperature.unwrap_or(0.2)
    }
    pub fn tokens_limit(&self) -> u64 {
        self.tokens_limit.unwrap_or(8096)
    }
}

/// OpenAI's `stop`: one string or a list of them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopWords {
    One(String),
    Many(Vec<String>),
}

/// `meta` absent or null: every default.
fn meta_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<JobMeta, D::Error> {
    Ok(Option::<JobMeta>::deserialize(d)?.unwrap_or_default())
}

/// Shape B: `POST /generate`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"job_id": "b-1", "meta": {"temperature": 0.2, "tokens_limit": 64}, "content": "Summarise: the edge is near"}))]
pub struct GenerateJob {
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub job_id: Option<String>,
    #[serde(deserialize_with = "meta_or_default")]
    pub meta: JobMeta,
    pub content: String,
}

/// Shape B: `POST /chat_completion`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"job_id": "b-2", "meta": {"tokens_limit": 64}, "messages": [{"role": "user", "content": "Say hi"}]}))]
pub struct ChatJob {
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub job_id: Option<String>,
    #[serde(default, deserialize_with = "meta_or_default")]
    pub meta: JobMeta,
    /// OpenAI chat messages.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
}

/// Shape B: the generated text, once the job ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Generated {
    pub content: String,
}

/// Shape B: the job did not end within `jobs.wait_timeout`; poll it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StillRunning {
    pub job_id: String,
    pub status: Status,
    /// `/v1/jobs/{job_id}`.
    pub poll: String,
}

/// Shape B: a job that failed, with its id.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobFailed {
    pub error: ErrorDetail,
    pub job_id: String,
}
