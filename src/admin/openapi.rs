//! `GET /openapi.json`: OpenAPI 3.1 for every endpoint Lumen answers itself (jobs and the
//! compatible job shapes, the probes, the model list, the admin API) and the OpenAI endpoints
//! it forwards.
//!
//! Bodies are described by the Rust types the handlers read and write (`ToSchema`), so the
//! document follows the code. The operations are declared below, one function each, because
//! the pipeline dispatches by path itself rather than through a web framework's handlers. At
//! serve time the document is fitted to the live config: the job shapes' prefix, shapes that
//! are switched off, and the listeners' addresses.

use std::sync::LazyLock;

use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::server::Server;
use utoipa::{Modify, OpenApi, ToSchema};

use super::budgets::{BudgetEntry, BudgetWindow, BudgetsReport};
use super::history::{Point, Timeseries};
use super::reports::{
    CircuitReport, ConfigReport, LastError, ModelReport, ProbeReport, ProviderReport,
    ProvidersReport, QuotaReport, ReloadReport, RouteReport, RoutesReport, TargetReport,
    UsageReport, UsageRow, UsageTotal,
};
use crate::config::Snapshot;
use crate::jobs::shapes::{
    ChatJob, ErrorBody, ErrorDetail, GenerateJob, GenerateTask, Generated, JobEndpoint, JobFailed,
    JobMeta, JobMetrics, JobObject, StillRunning, StopWords, SubmitJob, TaskAnswer, TaskError,
    TaskResult, TaskState, TaskStatus,
};
use crate::jobs::{JobsHealth, Status};
use crate::ledger::Counts;
use crate::metrics::{Quantiles, RequestSummary, Summary, UpstreamSummary};
use crate::ops::{
    Alive, HealthReport, Model, ModelList, ProviderHealth, Ready, RedisHealth, RouteCounts,
};

/// `POST /v1/chat/completions`: what Lumen reads of it (the rest goes to the provider as
/// sent).
#[derive(ToSchema)]
#[allow(dead_code)] // describes a body the pipeline forwards without deserialising it
pub struct ChatCompletionRequest {
    /// A model name of the routing table (`GET /v1/models`).
    model: String,
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Value>,
    stream: Option<bool>,
    /// Lumen asks for `include_usage` itself when it needs the token count.
    #[schema(value_type = Option<Object>)]
    stream_options: Option<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

/// `POST /v1/completions`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CompletionRequest {
    model: String,
    /// A string or an array of strings or token arrays.
    #[schema(value_type = Object)]
    prompt: Value,
    stream: Option<bool>,
    max_tokens: Option<u64>,
}

/// `POST /v1/embeddings`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingRequest {
    model: String,
    /// A string or an array of strings or token arrays.
    #[schema(value_type = Object)]
    input: Value,
}

/// `POST /v1/rerank`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RerankRequest {
    model: String,
    query: String,
    #[schema(value_type = Vec<Object>)]
    documents: Vec<Value>,
}

/// `POST /v1/responses` (OpenAI's Responses API), translated to chat completions for the
/// route's targets.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ResponsesRequest {
    model: String,
    /// A string, or a list of items: messages (`input_text`, `output_text`, `input_image`
    /// parts), `function_call` and `function_call_output` items.
    #[schema(value_type = Object)]
    input: Value,
    instructions: Option<String>,
    /// Function tools (built-in tools need a target that speaks the Responses API).
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_output_tokens: Option<u64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[schema(value_type = Option<Object>)]
    text: Option<Value>,
    stream: Option<bool>,
    user: Option<String>,
}

/// `POST /v1/messages` (Anthropic's Messages API), translated to chat completions for the
/// route's targets. `POST /v1/messages/count_tokens` takes the same body without `max_tokens`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MessagesRequest {
    model: String,
    max_tokens: u64,
    /// `{"role": "user" | "assistant", "content": string | blocks}`; blocks `text`, `image`
    /// (`base64` or `url`), `tool_use`, `tool_result`, `thinking` (left out for chat targets).
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Value>,
    /// A string or a list of text blocks.
    #[schema(value_type = Option<Object>)]
    system: Option<Value>,
    /// Client tools (`name`, `description`, `input_schema`); server tools need a target that
    /// speaks the Messages API.
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`.
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Left out for chat targets (named in `x-lumen-dropped-params`).
    top_k: Option<u64>,
    /// `{"user_id"}`, passed on as the chat request's `user`.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    stream: Option<bool>,
}

/// An error in Anthropic's shape (every error on the `/v1/messages` paths).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AnthropicError {
    /// Always `error`.
    r#type: String,
    error: AnthropicErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AnthropicErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `request_too_large`, `rate_limit_error`, `api_error`, `timeout_error`, `overloaded_error`.
    r#type: String,
    message: String,
}

/// `POST /generate` takes either shape; the body tells them apart (`content` and `meta`: shape
/// B when it is on, else `prompt`: shape A when it is on). The handler picks the shape by those
/// fields, then reads the body as that shape's type.
#[derive(ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum GenerateBody {
    ShapeB(GenerateJob),
    ShapeA(GenerateTask),
}

/// What `POST /generate` answers with 202.
#[derive(ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum GenerateAccepted {
    ShapeA(TaskStatus),
    ShapeB(StillRunning),
}

/// `POST /v1/files`: a multipart form.
#[derive(ToSchema)]
#[allow(dead_code)]
struct FileUpload {
    /// `batch` (the one purpose this gateway stores files for).
    purpose: String,
    /// JSONL, one `{"custom_id", "method": "POST", "url", "body"}` a line.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// `POST /v1/batches`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct BatchCreate {
    /// A file uploaded with `purpose: batch`.
    input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` or `/v1/responses`.
    endpoint: String,
    /// `24h`.
    completion_window: String,
    /// Up to 16 string values.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

/// One event of `GET /v1/jobs/{id}/events`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobEvent {
    event: JobEventKind,
    /// JSON: `{"id", "status"}` for `status`, `{"id", "content"}` for `delta`, the job object
    /// for `result`.
    #[schema(content_media_type = "application/json")]
    data: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub enum JobEventKind {
    Status,
    Delta,
    Result,
}

/// One event of shape A's `GET /stream/{task_id}` (data only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TaskEvent {
    /// JSON: `{"status", "message", "delta"?}` while it runs, then the `/result` answer with
    /// its `message`.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The operations, one declaration each: `#[utoipa::path]` turns each into a path item.
/// The functions are never called: requests are dispatched by the pipeline and the admin app.
#[allow(dead_code)]
mod operations {
    use super::*;

    // ---- Batches (main listener, same auth as /v1/*) ----

    /// Upload a batch input file (checked line by line: a bad line is a 400 naming it).
    #[utoipa::path(post, path = "/v1/files", tag = "batches",
        request_body(content = FileUpload, content_type = "multipart/form-data"),
        responses(
            (status = 200, description = "The `file` object", body = Object),
            (status = 400, description = "Not a form, another purpose, or a bad line", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 413, description = "Larger than `batches.max_file_bytes`", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn files_upload() {}

    /// The caller's files, newest first (`order=asc` for oldest).
    #[utoipa::path(get, path = "/v1/files", tag = "batches",
        params(
            ("purpose" = Option<String>, Query, description = "`batch` or `batch_output`"),
            ("limit" = Option<u32>, Query, description = "1 to 10000 (10000)"),
            ("after" = Option<String>, Query, description = "A file id: the page after it"),
            ("order" = Option<String>, Query, description = "`desc` (the default) or `asc`"),
        ),
        responses(
            (status = 200, description = "`{\"object\": \"list\", \"data\", \"first_id\", \"last_id\", \"has_more\"}`", body = Object),
            (status = 400, description = "A bad `limit`", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn files_list() {}

    /// A file's metadata.
    #[utoipa::path(get, path = "/v1/files/{id}", tag = "batches",
        params(("id" = String, Path, description = "The file id (`file-…`)")),
        responses(
            (status = 200, description = "The `file` object", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn files_get() {}

    /// A file's bytes (an input, or a batch's output or errors, JSONL).
    #[utoipa::path(get, path = "/v1/files/{id}/content", tag = "batches",
        params(("id" = String, Path, description = "The file id")),
        responses(
            (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn files_content() {}

    /// Deletes a file (not one an unfinished batch reads).
    #[utoipa::path(delete, path = "/v1/files/{id}", tag = "batches",
        params(("id" = String, Path, description = "The file id")),
        responses(
            (status = 200, description = "`{\"id\", \"object\": \"file\", \"deleted\": true}`", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
            (status = 409, description = "The input of a batch that has not finished", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn files_delete() {}

    /// Create a batch: each line of the input file runs as a job through the pipeline, at
    /// most `batches.concurrency` at once, below interactive requests.
    #[utoipa::path(post, path = "/v1/batches", tag = "batches", request_body = BatchCreate,
        responses(
            (status = 200, description = "The `batch` object (`in_progress`, or `failed` with `errors` naming lines for another endpoint)", body = Object),
            (status = 400, description = "A bad endpoint, window, metadata or file", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "No such input file", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn batches_create() {}

    /// The caller's batches, newest first.
    #[utoipa::path(get, path = "/v1/batches", tag = "batches",
        params(
            ("limit" = Option<u32>, Query, description = "1 to 100 (20)"),
            ("after" = Option<String>, Query, description = "A batch id: the page after it"),
        ),
        responses(
            (status = 200, description = "`{\"object\": \"list\", \"data\", \"first_id\", \"last_id\", \"has_more\"}`", body = Object),
            (status = 400, description = "A bad `limit`", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn batches_list() {}

    /// A batch: its status, `request_counts`, and once final its output and error files.
    #[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches",
        params(("id" = String, Path, description = "The batch id (`batch_…`)")),
        responses(
            (status = 200, description = "The `batch` object", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, or another key's", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn batches_get() {}

    /// Cancel a batch: what runs is stopped, what finished is kept.
    #[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches",
        params(("id" = String, Path, description = "The batch id")),
        responses(
            (status = 200, description = "The `batch` object, `cancelling` until its driver stopped it", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, or another key's", body = ErrorBody),
            (status = 409, description = "Already final", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn batches_cancel() {}

    // ---- Jobs (main listener, same auth as /v1/*) ----

    /// Submit a job.
    ///
    /// Runs the OpenAI request later, through the same routing, fallback, cache, limits and usage
    /// as a synchronous request. Counts against the key's request limit now; tokens are reserved
    /// when it starts.
    #[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = SubmitJob,
        responses(
            (status = 202, description = "Queued", body = JobObject),
            (status = 200, description = "`job_id` seen before: the existing job", body = JobObject),
            (status = 400, description = "Not a job, or not a valid OpenAI request", body = ErrorBody),
            (status = 401, description = "No or unknown key", body = ErrorBody),
            (status = 403, description = "The key may not use this model", body = ErrorBody),
            (status = 404, description = "Unknown model", body = ErrorBody),
            (status = 429, description = "Rate limited, or too many queued jobs (see Retry-After)", body = ErrorBody),
            (status = 503, description = "The job store is unreachable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn submit_job() {}

    /// A job: its status and, once completed, the upstream's OpenAI answer and metrics.
    #[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
        params(("id" = String, Path, description = "The job id (or the client's `job_id`)")),
        responses(
            (status = 200, description = "The job", body = JobObject),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "No such job for this key", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn get_job() {}

    /// Cancel a queued job or stop a running one.
    #[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
        params(("id" = String, Path)),
        responses(
            (status = 200, description = "The job, cancelled (or already finished)", body = JobObject),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "No such job for this key", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn cancel_job() {}

    /// A job's progress as server-sent events: `status` events, `delta` events while it generates,
    /// then `result` (the job object). A late client gets the current state first.
    #[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
        params(("id" = String, Path)),
        responses(
            (status = 200, description = "Event stream", content_type = "text/event-stream", body = JobEvent),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn job_events() {}

    /// Shape A (`prompt`) or shape B (`content` and `meta`), told apart by the body.
    ///
    /// Shape A answers 202 with a `task_id` at once. Shape B waits for the job to end (up to
    /// `jobs.wait_timeout`) and answers the generated text, or 202 with where to poll.
    #[utoipa::path(post, path = "/generate", tag = "job shapes", request_body = GenerateBody,
        responses(
            (status = 202, description = "Shape A: queued; shape B: still running after `jobs.wait_timeout`", body = inline(GenerateAccepted)),
            (status = 200, description = "Shape B: the generated text", body = Generated),
            (status = 400, description = "Neither shape, or an invalid request", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 403, description = "The key may not use this model", body = ErrorBody),
            (status = 404, description = "Unknown model", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
            (status = 502, description = "Shape B: the job failed", body = JobFailed),
            (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn generate() {}

    /// Shape B: a chat job, answered with the generated text when it ends.
    #[utoipa::path(post, path = "/chat_completion", tag = "job shapes", request_body = ChatJob,
        responses(
            (status = 200, description = "The generated text", body = Generated),
            (status = 202, description = "Still running after `jobs.wait_timeout`", body = StillRunning),
            (status = 400, description = "Bad request", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 403, description = "The key may not use this model", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
            (status = 502, description = "The job failed", body = JobFailed),
            (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn chat_completion() {}

    /// Shape A: a task's state.
    #[utoipa::path(get, path = "/status/{task_id}", tag = "job shapes",
        params(("task_id" = String, Path)),
        responses(
            (status = 200, description = "OK", body = TaskStatus),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn task_status() {}

    /// Shape A: a task's result once it ended, its state until then.
    #[utoipa::path(get, path = "/result/{task_id}", tag = "job shapes",
        params(("task_id" = String, Path)),
        responses(
            (status = 200, description = "OK", body = TaskAnswer),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn task_result() {}

    /// Shape A: a task's progress as server-sent events of `{"status", "message", "result"?}`.
    /// Accepts `?api_key=`, since a browser's `EventSource` cannot send headers.
    #[utoipa::path(get, path = "/stream/{task_id}", tag = "job shapes",
        params(("task_id" = String, Path),
            ("api_key" = Option<String>, Query, description = "The key, for clients that cannot send headers")),
        responses(
            (status = 200, description = "Event stream", content_type = "text/event-stream", body = TaskEvent),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = []), ()))]
    fn task_stream() {}

    // ---- Probes (main listener, no auth) ----

    /// Alive: the process answers.
    #[utoipa::path(get, path = "/healthz", tag = "health",
        responses((status = 200, description = "OK", body = Alive)))]
    fn healthz() {}

    /// Ready: the config's `readiness` rule holds (routes with a target that can take a request).
    #[utoipa::path(get, path = "/readyz", tag = "health",
        responses((status = 200, description = "OK", body = Ready), (status = 503, description = "Not ready", body = Ready)))]
    fn readyz() {}

    /// The node at a glance: routes, Redis, providers, sidecar models, job engine.
    #[utoipa::path(get, path = "/health", tag = "health",
        responses((status = 200, description = "OK", body = HealthReport),
            (status = 503, description = "No route can take a request", body = HealthReport)))]
    fn health() {}

    // ---- OpenAI (main listener) ----

    /// The models of the routing table this key may use.
    #[utoipa::path(get, path = "/v1/models", tag = "openai",
        responses((status = 200, description = "OK", body = ModelList), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn models() {}

    /// One model, if this key may use it.
    #[utoipa::path(get, path = "/v1/models/{model}", tag = "openai",
        params(("model" = String, Path)),
        responses((status = 200, description = "OK", body = Model), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn model() {}

    /// Forwarded to the route's provider (with fallback, retries, cache and limits); the answer is
    /// the provider's, as JSON or, with `stream: true`, as server-sent events.
    #[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
        responses(
            (status = 200, description = "The provider's answer", content(
                (Object = "application/json"),
                (String = "text/event-stream"))),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 403, description = "The key may not use this model", body = ErrorBody),
            (status = 404, description = "Not found", body = ErrorBody), (status = 413, description = "The body is too large", body = ErrorBody), (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
            (status = 502, description = "The provider failed", body = ErrorBody), (status = 503, description = "Unavailable", body = ErrorBody), (status = 504, description = "The provider timed out", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn chat_completions() {}

    /// Forwarded like chat completions.
    #[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
        responses(
            (status = 200, description = "The provider's answer", content(
                (Object = "application/json"),
                (String = "text/event-stream"))),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody), (status = 502, description = "The provider failed", body = ErrorBody), (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn completions() {}

    /// Forwarded; list inputs are cached per item when the route caches.
    #[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest,
        responses(
            (status = 200, description = "The provider's answer", body = Object),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody), (status = 502, description = "The provider failed", body = ErrorBody), (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn embeddings() {}

    /// Forwarded to providers with a rerank API (such as the sidecar).
    #[utoipa::path(post, path = "/v1/rerank", tag = "openai", request_body = RerankRequest,
        responses(
            (status = 200, description = "The provider's answer", body = Object),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody), (status = 502, description = "The provider failed", body = ErrorBody), (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn rerank() {}

    /// OpenAI's Responses API: translated to chat completions for the route's targets, the
    /// answer (or the stream, event by event) translated back. Fields a chat target cannot
    /// take (`reasoning`, `metadata`) are left out and named in `x-lumen-dropped-params`.
    /// The response is stored for `responses.store_ttl` unless `store: false` (in Redis when
    /// configured, so any node finds it); `previous_response_id` continues a stored one.
    #[utoipa::path(post, path = "/v1/responses", tag = "openai", request_body = ResponsesRequest,
        responses(
            (status = 200, description = "A `response` object, or with `stream: true` the Responses event stream", body = Object),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody), (status = 502, description = "The provider failed", body = ErrorBody), (status = 503, description = "Unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn responses() {}

    /// A stored response (`store` is true unless the request said false), the key's own only:
    /// another key's id is not found.
    #[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai",
        params(("id" = String, Path, description = "The response's id (`resp_…`)")),
        responses(
            (status = 200, description = "The `response` object as it was answered", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
            (status = 503, description = "The response store (Redis) is unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn responses_get() {}

    /// The input items of a stored response: the whole conversation it answered (earlier
    /// turns' included), newest first unless `order=asc`.
    #[utoipa::path(get, path = "/v1/responses/{id}/input_items", tag = "openai",
        params(
            ("id" = String, Path, description = "The response's id"),
            ("limit" = Option<u32>, Query, description = "1 to 100 (20)"),
            ("order" = Option<String>, Query, description = "`desc` (the default) or `asc`"),
            ("after" = Option<String>, Query, description = "An item id: the page after it"),
        ),
        responses(
            (status = 200, description = "`{\"object\": \"list\", \"data\", \"first_id\", \"last_id\", \"has_more\"}`", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
            (status = 503, description = "The response store (Redis) is unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn responses_input_items() {}

    /// Deletes a stored response (the key's own).
    #[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai",
        params(("id" = String, Path, description = "The response's id")),
        responses(
            (status = 200, description = "`{\"id\", \"object\": \"response\", \"deleted\": true}`", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody),
            (status = 404, description = "Unknown, expired, deleted, or another key's", body = ErrorBody),
            (status = 503, description = "The response store (Redis) is unavailable", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn responses_delete() {}

    /// The token count of a Responses request (an estimate from its text: about four
    /// characters a token, plus each message's framing and the tools' definitions). Routed
    /// and limited like the request; never forwarded.
    #[utoipa::path(post, path = "/v1/responses/input_tokens", tag = "openai", request_body = ResponsesRequest,
        responses(
            (status = 200, description = "`{\"object\": \"response.input_tokens\", \"input_tokens\"}`", body = Object),
            (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No key, or an unknown one", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody),
            (status = 429, description = "Rate limited (see Retry-After)", body = ErrorBody),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn responses_input_tokens() {}

    /// Anthropic's Messages API: translated to chat completions for the route's targets, the
    /// answer (or the stream, event by event: `message_start`, `content_block_*`,
    /// `message_delta`, `message_stop`) translated back. Errors in Anthropic's shape.
    #[utoipa::path(post, path = "/v1/messages", tag = "anthropic", request_body = MessagesRequest,
        params(("anthropic-version" = Option<String>, Header, description = "Accepted and ignored")),
        responses(
            (status = 200, description = "A `message` object, or with `stream: true` the Messages event stream", body = Object),
            (status = 400, description = "Bad request", body = AnthropicError), (status = 401, description = "No key, or an unknown one", body = AnthropicError), (status = 404, description = "Not found", body = AnthropicError),
            (status = 429, description = "Rate limited (see Retry-After)", body = AnthropicError), (status = 502, description = "The provider failed", body = AnthropicError), (status = 503, description = "Unavailable", body = AnthropicError),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn messages() {}

    /// The token count of a Messages request (an estimate, as for the Responses API).
    #[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic", request_body = MessagesRequest,
        responses(
            (status = 200, description = "`{\"input_tokens\"}`", body = Object),
            (status = 400, description = "Bad request", body = AnthropicError), (status = 401, description = "No key, or an unknown one", body = AnthropicError), (status = 404, description = "Not found", body = AnthropicError),
            (status = 429, description = "Rate limited (see Retry-After)", body = AnthropicError),
        ),
        security(("bearer" = []), ("x_api_key" = [])))]
    fn messages_count_tokens() {}

    // ---- Admin (admin listener; the admin key when one is configured) ----

    /// Prometheus metrics (text exposition format).
    #[utoipa::path(get, path = "/metrics", tag = "admin",
        responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn metrics() {}

    /// The essentials of `/metrics` as compact JSON.
    #[utoipa::path(get, path = "/metrics/summary", tag = "admin",
        responses((status = 200, description = "OK", body = Summary), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn metrics_summary() {}

    /// The active config (hash, load time) and the last reload's outcome.
    #[utoipa::path(get, path = "/admin/config", tag = "admin",
        responses((status = 200, description = "OK", body = ConfigReport), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_config() {}

    /// Every provider: probe, circuit per model, latency, in flight, quota, last error, today's
    /// usage.
    #[utoipa::path(get, path = "/admin/providers", tag = "admin",
        responses((status = 200, description = "OK", body = ProvidersReport), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_providers() {}

    /// The routing table: each model name's strategy and targets.
    #[utoipa::path(get, path = "/admin/routes", tag = "admin",
        responses((status = 200, description = "OK", body = RoutesReport), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_routes() {}

    /// The fleet's Redis as this node sees it: whether it answers, its servers (which are
    /// primaries, which are up) and the failovers seen. `configured: false` without `redis:`.
    #[utoipa::path(get, path = "/admin/redis", tag = "admin",
        responses((status = 200, description = "OK", body = RedisHealth), (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_redis() {}

    /// Usage per day, key (and tenant), provider and model: requests, tokens, errors, cache
    /// hits and cost in USD.
    #[utoipa::path(get, path = "/admin/usage", tag = "admin",
        params(
            ("key" = Option<String>, Query, description = "A key's id"),
            ("tenant" = Option<String>, Query, description = "A tenant's name"),
            ("provider" = Option<String>, Query),
            ("model" = Option<String>, Query),
            ("from" = Option<String>, Query, format = Date, description = "First day (UTC), default `to`"),
            ("to" = Option<String>, Query, format = Date, description = "Last day (UTC), default today"),
        ),
        responses((status = 200, description = "OK", body = UsageReport),
            (status = 400, description = "A bad filter", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_usage() {}

    /// Every dollar budget: each window's limit, what is spent, what requests in flight hold,
    /// what is left and when it resets (fleet-wide with Redis).
    #[utoipa::path(get, path = "/admin/budgets", tag = "admin",
        responses((status = 200, description = "OK", body = BudgetsReport),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_budgets() {}

    /// The last 15 minutes of traffic, one point per interval, for the console's charts.
    #[utoipa::path(get, path = "/admin/timeseries", tag = "admin",
        params(("since" = Option<u64>, Query, description = "Only points after this time (Unix ms)")),
        responses((status = 200, description = "OK", body = Timeseries),
            (status = 400, description = "Bad request", body = ErrorBody),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn admin_timeseries() {}

    /// This document.
    #[utoipa::path(get, path = "/openapi.json", tag = "admin",
        responses((status = 200, description = "OpenAPI 3.1", body = Object),
            (status = 401, description = "No key, or an unknown one", body = ErrorBody)),
        security((), ("admin_bearer" = []), ("admin_basic" = [])))]
    fn openapi_json() {}
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = || {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key or a JWT, as `Authorization: Bearer …`"))
                    .build(),
            )
        };
        components.add_security_scheme("bearer", bearer());
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme("admin_bearer", bearer());
        components.add_security_scheme(
            "admin_basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Lumen",
        description = "An OpenAI-compatible LLM gateway. The OpenAI endpoints, the Batch API, the jobs API and the probes are on the main listener; the admin API on the admin listener (loopback by default).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        operations::files_upload,
        operations::files_list,
        operations::files_get,
        operations::files_content,
        operations::files_delete,
        operations::batches_create,
        operations::batches_list,
        operations::batches_get,
        operations::batches_cancel,
        operations::submit_job,
        operations::get_job,
        operations::cancel_job,
        operations::job_events,
        operations::generate,
        operations::chat_completion,
        operations::task_status,
        operations::task_result,
        operations::task_stream,
        operations::healthz,
        operations::readyz,
        operations::health,
        operations::models,
        operations::model,
        operations::chat_completions,
        operations::completions,
        operations::embeddings,
        operations::rerank,
        operations::responses,
        operations::responses_input_tokens,
        operations::responses_get,
        operations::responses_input_items,
        operations::responses_delete,
        operations::messages,
        operations::messages_count_tokens,
        operations::metrics,
        operations::metrics_summary,
        operations::admin_config,
        operations::admin_providers,
        operations::admin_routes,
        operations::admin_redis,
        operations::admin_usage,
        operations::admin_budgets,
        operations::admin_timeseries,
        operations::openapi_json,
    ),
    components(schemas(
        FileUpload, BatchCreate,
        SubmitJob, JobEndpoint, JobObject, Status, JobMetrics, ErrorBody, ErrorDetail,
        GenerateBody, GenerateTask, GenerateJob, JobMeta, StopWords, ChatJob, Generated, StillRunning,
        JobFailed, TaskStatus, TaskState, TaskAnswer, TaskResult, TaskError, GenerateAccepted,
        Alive, Ready, HealthReport, RouteCounts, RedisHealth, ProviderHealth, JobsHealth,
        ModelList, Model, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
        RerankRequest, ResponsesRequest, MessagesRequest, AnthropicError, AnthropicErrorDetail, Summary, RequestSummary, Quantiles, UpstreamSummary, ConfigReport,
        ReloadReport, ProvidersReport, ProviderReport, ProbeReport, QuotaReport, LastError,
        ModelReport, CircuitReport, Counts, RoutesReport, RouteReport, TargetReport,
        UsageReport, UsageRow, UsageTotal, BudgetsReport, BudgetEntry, BudgetWindow, Timeseries, Point, JobEvent, JobEventKind, TaskEvent,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "jobs", description = "Async jobs: submit now, collect later"),
        (name = "batches", description = "OpenAI's Batch API: files and batches, run on the job engine for every provider"),
        (name = "job shapes", description = "The request shapes of two queue-based LLM APIs (`jobs.compat_prefix`)"),
        (name = "health", description = "Probes for load balancers (no auth)"),
        (name = "openai", description = "OpenAI-compatible endpoints"),
        (name = "anthropic", description = "Anthropic's Messages API, translated for every provider"),
        (name = "admin", description = "The admin listener"),
    )
)]
struct ApiDoc;

/// The document as compiled: every operation, before it is fitted to a config.
pub static BASE: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
});

/// Paths of the compatible job shapes, and which shape each belongs to.
const SHAPE_PATHS: &[(&str, bool, bool)] = &[
    // (path, served by shape A, served by shape B)
    ("/generate", true, true),
    ("/chat_completion", false, true),
    ("/status/{task_id}", true, false),
    ("/result/{task_id}", true, false),
    ("/stream/{task_id}", true, false),
];

const ADMIN_PATHS: &[&str] = &[
    "/metrics",
    "/metrics/summary",
    "/admin/config",
    "/admin/providers",
    "/admin/routes",
    "/admin/usage",
    "/admin/budgets",
    "/admin/redis",
    "/admin/timeseries",
    "/openapi.json",
];

/// The document for this config: job shape paths under `jobs.compat_prefix` (shapes switched
/// off left out), the main listener as the server, the admin listener for admin paths. `host`
/// (the request's Host) names the machine when a listener is bound to every address.
pub fn document(config: &Snapshot, host: Option<&str>) -> utoipa::openapi::OpenApi {
    let mut doc = BASE.clone();
    let jobs = &config.jobs;
    for (path, a, b) in SHAPE_PATHS {
        let Some(item) = doc.paths.paths.remove(*path) else {
            continue;
        };
        if (*a && jobs.shape_a) || (*b && jobs.shape_b) {
            doc.paths
                .paths
                .insert(format!("{}{path}", jobs.compat_prefix), item);
        }
    }
    let host_name = host.map(|h| match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    });
    let url = |addr: &str, tls: bool| {
        let scheme = if tls { "https" } else { "http" };
        match addr.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.ip().is_unspecified() => {
                format!(
                    "{scheme}://{}:{}",
                    host_name.unwrap_or("localhost"),
                    sa.port()
                )
            }
            _ => format!("{scheme}://{addr}"),
        }
    };
    doc.servers = Some(
        config
            .listeners
            .iter()
            .map(|l| {
                let mut s = Server::new(url(&l.addr, l.tls.is_some()));
                s.description = Some("main listener".into());
                s
            })
            .collect(),
    );
    let mut admin = Server::new(url(&config.admin_listen, false));
    admin.description = Some("admin listener".into());
    for path in ADMIN_PATHS {
        if let Some(item) = doc.paths.paths.get_mut(*path) {
            item.servers = Some(vec![admin.clone()]);
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Value {
        serde_json::to_value(&*BASE).unwrap()
    }

    #[test]
    fn is_openapi_3_1_with_every_endpoint_lumen_answers() {
        let v = spec();
        assert_eq!(v["openapi"], "3.1.0");
        let paths = v["paths"].as_object().unwrap();
        for p in [
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/generate",
            "/chat_completion",
            "/status/{task_id}",
            "/result/{task_id}",
            "/stream/{task_id}",
            "/healthz",
            "/readyz",
            "/health",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/embeddings",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        for p in ADMIN_PATHS {
            assert!(paths.contains_key(*p), "{p} missing");
        }
    }

    #[test]
    fn generate_takes_either_shape_untagged() {
        // Either body as it is sent, not wrapped in a variant name.
        let v = spec();
        let one_of = v["components"]["schemas"]["GenerateBody"]["oneOf"]
            .as_array()
            .unwrap()
            .clone();
        let refs: Vec<&str> = one_of.iter().filter_map(|s| s["$ref"].as_str()).collect();
        assert_eq!(
            refs,
            [
                "#/components/schemas/GenerateJob",
                "#/components/schemas/GenerateTask"
            ]
        );
    }

    #[test]
    fn every_response_is_described() {
        // OpenAPI requires a description on each response object.
        let v = spec();
        for (path, item) in v["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, response) in op["responses"].as_object().unwrap() {
                    assert!(
                        response["description"]
                            .as_str()
                            .is_some_and(|d| !d.is_empty()),
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn forwarded_request_schemas_require_what_the_parser_requires() {
        use crate::openai::Endpoint;
        let v = spec();
        for (schema, endpoint) in [
            ("ChatCompletionRequest", Endpoint::ChatCompletions),
            ("CompletionRequest", Endpoint::Completions),
            ("EmbeddingRequest", Endpoint::Embeddings),
            ("RerankRequest", Endpoint::Rerank),
            ("ResponsesRequest", Endpoint::Responses),
            ("MessagesRequest", Endpoint::Messages),
        ] {
            let required = &v["components"]["schemas"][schema]["required"];
            let required: Vec<&str> = required
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(required.contains(&"model"), "{schema}");
            assert!(
                required.contains(&endpoint.required_field()),
                "{schema} must require {}",
                endpoint.required_field()
            );
        }
    }

    #[test]
    fn error_bodies_match_their_schema() {
        let body = lumen_plugins::error_body("m", "invalid_request_error", "c");
        let parsed: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.error.code.as_deref(), Some("c"));
        let v = spec();
        let detail = &v["components"]["schemas"]["ErrorDetail"]["required"];
        assert_eq!(detail, &serde_json::json!(["message", "type"]));
    }
}
