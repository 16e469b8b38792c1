//! The HTTP shapes of async jobs, on the main listener with the same auth as `/v1/*`:
//!
//! - native: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` (SSE),
//!   `DELETE /v1/jobs/{id}`;
//! - shape A ("LLM inference system"): `POST /generate {prompt…}` → `task_id`, then
//!   `/status/{id}`, `/result/{id}`, `/stream/{id}` (SSE; `?api_key=` accepted, because a
//!   browser's `EventSource` cannot send headers);
//! - shape B ("RabbitMQ + Redis" job API): `POST /generate {job_id, meta, content}` and
//!   `POST /chat_completion {job_id, meta, messages}`, answered `{"content"}` when the job ends
//!   within `jobs.wait_timeout`, else 202 with the job id to poll.
//!
//! The compatible shapes live under `jobs.compat_prefix` and can each be switched off. Every
//! job belongs to the key that submitted it: other keys get 404.

use std::sync::Arc;
use std::time::Duration;

use super::job::{JobError, JobSettings, JobView, Status, Update};
use super::shapes::{
    ChatJob, ErrorDetail, GenerateJob, GenerateTask, Generated, JobEndpoint, JobFailed, JobMeta,
    StillRunning, SubmitJob, TaskAnswer, TaskError, TaskResult, TaskState, TaskStatus,
};
use super::Jobs;
use crate::config::Snapshot;
use crate::error::{GatewayError, RequestError};
use crate::openai::{self, Endpoint};
use crate::session::Session;
use bytes::Bytes;
use http::{Method, StatusCode};
use lumen_plugins::auth::Principal;
use pingora::http::ResponseHeader;
use serde_json::{json, Value};

/// A request the jobs API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Submit,
    Get(String),
    Events(String),
    Cancel(String),
    /// Shape A or B, told apart by the body.
    Generate,
    /// Shape B.
    ChatCompletion,
    /// Shape A.
    Status(String),
    Result(String),
    Stream(String),
}

impl Call {
    /// Submits count against the key's request limit; reads do not.
    pub fn submits(&self) -> bool {
        matches!(self, Call::Submit | Call::Generate | Call::ChatCompletion)
    }
}

/// Whether `path` belongs to the jobs API, and which call it is.
pub fn route(method: &Method, path: &str, s: &JobSettings) -> Option<Result<Call, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let wrong = || {
        Some(Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
        }))
    };
    let id = |rest: &str| (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string());
    if path == "/v1/jobs" {
        return if method == Method::POST {
            Some(Ok(Call::Submit))
        } else {
            wrong()
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/jobs/") {
        if let Some(job) = rest.strip_suffix("/events").and_then(id) {
            return if method == Method::GET {
                Some(Ok(Call::Events(job)))
            } else {
                wrong()
            };
        }
        let job = id(rest)?;
        return match *method {
            Method::GET => Some(Ok(Call::Get(job))),
            Method::DELETE => Some(Ok(Call::Cancel(job))),
            _ => wrong(),
        };
    }
    let rest = path.strip_prefix(s.compat_prefix.as_str())?;
    let post = |call: Call| {
        if method == Method::POST {
            Some(Ok(call))
        } else {
            wrong()
        }
    };
    let get = |call: Call| {
        if method == Method::GET {
            Some(Ok(call))
        } else {
            wrong()
        }
    };
    match rest {
        "/generate" if s.shape_a || s.shape_b => post(Call::Generate),
        "/chat_completion" if s.shape_b => post(Call::ChatCompletion),
        _ if s.shape_a => {
            let (kind, job) = rest.strip_prefix('/')?.split_once('/')?;
            let job = id(job)?;
            match kind {
                "status" => get(Call::Status(job)),
                "result" => get(Call::Result(job)),
                "stream" => get(Call::Stream(job)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// What the pipeline writes back.
pub enum Answer {
    Json(StatusCode, Value),
    /// An SSE stream of the job's progress (job id).
    Events(String, Style),
    /// Shape B: the generated text once the job (id) ends, or 202 after `wait_timeout`.
    Wait(String, Duration),
}

/// How `/events`-like streams are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Named events: `status`, `delta`, `result`.
    Native,
    /// Shape A: data-only `{"status","message","result"?}` objects.
    ShapeA,
}

/// Answers a jobs call. `body` is the request body (POST calls); `trace` the request's own
/// `traceparent` when it is traced (a job queued here carries it to its run).
pub async fn answer(
    call: Call,
    body: Option<Bytes>,
    principal: &Arc<Principal>,
    config: &Snapshot,
    jobs: &Jobs,
    trace: Option<String>,
) -> Result<Answer, GatewayError> {
    let owner = principal.key_id.as_str();
    let find = |id: String| async move {
        jobs.get(owner, &id)
            .await?
            .ok_or(GatewayError::JobNotFound(id))
    };
    match call {
        Call::Submit => {
            let req: SubmitJob = typed_body(body, "POST /v1/jobs takes {\"endpoint\", \"body\", \"job_id\"?} with `endpoint` one of /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/messages")?;
            let endpoint = match req.endpoint {
                JobEndpoint::ChatCompletions => Endpoint::ChatCompletions,
                JobEndpoint::Completions => Endpoint::Completions,
                JobEndpoint::Embeddings => Endpoint::Embeddings,
                JobEndpoint::Responses => Endpoint::Responses,
                JobEndpoint::Messages => Endpoint::Messages,
            };
            let client_id = job_id(req.job_id)?;
            let (view, fresh) = submit(
                jobs, config, principal, endpoint, req.body, client_id, trace,
            )
            .await?;
            Ok(Answer::Json(
                if fresh {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::OK
                },
                to_json(&view.native()),
            ))
        }
        Call::Get(id) => Ok(Answer::Json(
            StatusCode::OK,
            to_json(&find(id).await?.native()),
        )),
        Call::Events(id) => Ok(Answer::Events(find(id).await?.id, Style::Native)),
        Call::Cancel(id) => match jobs.cancel(owner, &id).await? {
            Some(view) => Ok(Answer::Json(StatusCode::OK, to_json(&view.native()))),
            None => Err(GatewayError::JobNotFound(id)),
        },
        Call::ChatCompletion => {
            let req: ChatJob = typed_body(
                body,
                "POST /chat_completion takes {\"job_id\", \"meta\": {…}, \"messages\": [...]}",
            )?;
            let messages = Value::Array(req.messages);
            submit_shape_b(
                jobs, config, principal, messages, req.meta, req.job_id, trace,
            )
            .await
        }
        Call::Generate => {
            let v = json_body(body)?;
            let has = |field: &str| v.get(field).is_some();
            if jobs.settings.shape_b && has("meta") && has("content") {
                let req: GenerateJob = from_value(v, NEITHER_SHAPE)?;
                let messages = json!([{"role": "user", "content": req.content}]);
                submit_shape_b(
                    jobs, config, principal, messages, req.meta, req.job_id, trace,
                )
                .await
            } else if jobs.settings.shape_a && has("prompt") {
                let req: GenerateTask = from_value(v, NEITHER_SHAPE)?;
                submit_shape_a(jobs, config, principal, req, trace).await
            } else {
                Err(GatewayError::BadJob(NEITHER_SHAPE.into()))
            }
        }
        Call::Status(id) => Ok(Answer::Json(
            StatusCode::OK,
            to_json(&shape_a_status(&find(id).await?)),
        )),
        Call::Result(id) => Ok(Answer::Json(
            StatusCode::OK,
            to_json(&shape_a_result(&find(id).await?)),
        )),
        Call::Stream(id) => Ok(Answer::Events(find(id).await?.id, Style::ShapeA)),
    }
}

const NEITHER_SHAPE: &str = "POST /generate takes either {\"prompt\", \"max_tokens\"?, \"temperature\"?, \"top_p\"?, \"user_id\"?, \"model\"?} or {\"job_id\", \"meta\": {…}, \"content\"}";

/// Shape A: queues the prompt as a chat job and answers its `task_id` at once.
async fn submit_shape_a(
    jobs: &Jobs,
    config: &Snapshot,
    principal: &Arc<Principal>,
    req: GenerateTask,
    trace: Option<String>,
) -> Result<Answer, GatewayError> {
    let model = model_of(req.model.as_deref(), &jobs.settings)?;
    let mut chat = json!({
        "model": model,
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens(),
        "temperature": req.temperature(),
        "top_p": req.top_p(),
    });
    if let Some(user) = req.user_id {
        chat["user"] = json!(user);
    }
    let (view, _) = submit(
        jobs,
        config,
        principal,
        Endpoint::ChatCompletions,
        chat,
        None,
        trace,
    )
    .await?;
    Ok(Answer::Json(
        StatusCode::ACCEPTED,
        to_json(&TaskStatus {
            status: TaskState::Queued,
            task_id: view.id,
            message: "Task queued for processing".into(),
        }),
    ))
}

/// Shape B: queues the messages as a chat job; the answer waits for it (`jobs.wait_timeout`).
async fn submit_shape_b(
    jobs: &Jobs,
    config: &Snapshot,
    principal: &Arc<Principal>,
    messages: Value,
    meta: JobMeta,
    client_id: Option<String>,
    trace: Option<String>,
) -> Result<Answer, GatewayError> {
    let model = model_of(meta.model.as_deref(), &jobs.settings)?;
    let mut chat = json!({
        "model": model,
        "messages": messages,
        "temperature": meta.temperature(),
        "max_tokens": meta.tokens_limit(),
    });
    if let Some(stop) = meta.stop_words {
        chat["stop"] = json!(stop);
    }
    let client_id = job_id(client_id)?;
    let (view, _) = submit(
        jobs,
        config,
        principal,
        Endpoint::ChatCompletions,
        chat,
        client_id,
        trace,
    )
    .await?;
    Ok(Answer::Wait(view.id, jobs.settings.wait_timeout))
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The body as `T`: malformed JSON is `invalid_json`; JSON of the wrong shape is a 400 that
/// says what was wrong and which shape is expected.
fn typed_body<T: serde::de::DeserializeOwned>(
    body: Option<Bytes>,
    expected: &str,
) -> Result<T, GatewayError> {
    from_value(json_body(body)?, expected)
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value, expected: &str) -> Result<T, GatewayError> {
    serde_json::from_value(v).map_err(|e| GatewayError::BadJob(format!("{expected}: {e}")))
}

fn json_body(body: Option<Bytes>) -> Result<Value, GatewayError> {
    let body = body.unwrap_or_default();
    match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(RequestError::NotAnObject.into()),
        Err(e) => Err(RequestError::InvalidJson(e.to_string()).into()),
    }
}

/// A client-chosen id: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
fn job_id(id: Option<String>) -> Result<Option<String>, GatewayError> {
    match id {
        None => Ok(None),
        Some(s) if s.starts_with(super::BATCH_LINE_PREFIX) => Err(GatewayError::BadJob(
            "`job_id` may not start with `batch_`: those name the lines of batches".into(),
        )),
        Some(s)
            if !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)) =>
        {
            Ok(Some(s))
        }
        Some(_) => Err(GatewayError::BadJob(
            "`job_id` must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'".into(),
        )),
    }
}

fn model_of(given: Option<&str>, s: &JobSettings) -> Result<String, GatewayError> {
    given
        .map(str::to_string)
        .or_else(|| s.default_model.clone())
        .ok_or_else(|| {
            GatewayError::BadJob(
                "no `model` given and `jobs.default_model` is not configured".into(),
            )
        })
}

/// Validates the OpenAI request as the synchronous endpoint would (fields, model, allow-list),
/// so a bad job fails at submit, then queues it.
async fn submit(
    jobs: &Jobs,
    config: &Snapshot,
    principal: &Arc<Principal>,
    endpoint: Endpoint,
    body: Value,
    client_id: Option<String>,
    trace: Option<String>,
) -> Result<(JobView, bool), GatewayError> {
    if let Some(id) = &client_id {
        // Idempotent: an id seen before answers with its job before anything else is checked.
        if let Some(existing) = jobs.get(&principal.key_id, id).await? {
            return Ok((existing, false));
        }
    }
    if !body.is_object() {
        return Err(GatewayError::BadJob(
            "`body` must be the OpenAI request object".into(),
        ));
    }
    let raw = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let req = openai::parse(endpoint, raw)?;
    if config.routes.resolve(&req.model).is_none() {
        return Err(GatewayError::ModelNotFound(req.model));
    }
    if !principal.may_use(&req.model) {
        return Err(GatewayError::ModelNotAllowed(req.model));
    }
    Ok(jobs
        .submit(principal, endpoint, body, client_id, trace)
        .await?)
}

fn shape_a_default_message(status: Status) -> &'static str {
    match status {
        Status::Queued => "Task is waiting in the queue",
        Status::Processing => "Task is being processed",
        Status::Completed => "Task completed",
        Status::Failed | Status::Cancelled => "Task failed",
    }
}

fn shape_a_message(view: &JobView) -> String {
    match (&view.error, view.status) {
        (Some(e), Status::Failed | Status::Cancelled) => e.message.clone(),
        (_, status) => shape_a_default_message(status).into(),
    }
}

fn shape_a_status(view: &JobView) -> TaskStatus {
    TaskStatus {
        status: view.status.into(),
        task_id: view.id.clone(),
        message: shape_a_message(view),
    }
}

fn shape_a_result(view: &JobView) -> TaskAnswer {
    match view.status {
        Status::Completed => TaskAnswer::Completed(TaskResult {
            status: TaskState::Completed,
            task_id: view.id.clone(),
            result: view.text().unwrap_or_default(),
            metrics: view.metrics(),
        }),
        Status::Failed | Status::Cancelled => TaskAnswer::Error(TaskError {
            status: TaskState::Error,
            task_id: view.id.clone(),
            error_message: view
                .error
                .as_ref()
                .map_or("failed", |e| e.message.as_str())
                .into(),
            error_type: view
                .error
                .as_ref()
                .map_or("api_error", |e| e.kind.as_str())
                .into(),
        }),
        _ => TaskAnswer::Pending(shape_a_status(view)),
    }
}

/// Shape B's answer once the job ended, or 202 with where to poll.
pub async fn wait(jobs: &Jobs, owner: &str, id: &str, timeout: Duration) -> (StatusCode, Value) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut view = None;
    if let Ok(Some((start, _, mut sub))) = jobs.subscribe(owner, id).await {
        let mut ended = start.status.is_final();
        view = Some(start);
        while !ended {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match sub.next(left.min(Duration::from_secs(5))).await {
                Some(Some(Update::Status(s))) if s.is_final() => ended = true,
                Some(_) => {}
                None => ended = true,
            }
        }
        if ended {
            view = jobs.get(owner, id).await.ok().flatten().or(view);
        }
    }
    let Some(view) = view else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            to_json(&JobFailed {
                error: ErrorDetail {
                    message: "the job store is unavailable".into(),
                    kind: "api_error".into(),
                    param: None,
                    code: Some("unavailable".into()),
                },
                job_id: id.into(),
            }),
        );
    };
    match view.status {
        Status::Completed => (
            StatusCode::OK,
            to_json(&Generated {
                content: view.text().unwrap_or_default(),
            }),
        ),
        Status::Failed | Status::Cancelled => {
            let e = view.error.clone().unwrap_or(JobError {
                message: "failed".into(),
                kind: "api_error".into(),
                code: None,
                status: None,
            });
            (
                StatusCode::BAD_GATEWAY,
                to_json(&JobFailed {
                    error: ErrorDetail {
                        message: e.message,
                        kind: e.kind,
                        param: None,
                        code: e.code,
                    },
                    job_id: view.id,
                }),
            )
        }
        _ => (
            StatusCode::ACCEPTED,
            to_json(&StillRunning {
                poll: format!("/v1/jobs/{}", view.id),
                job_id: view.id,
                status: view.status,
            }),
        ),
    }
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    let mut out = String::new();
    if let Some(name) = event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Writes the job's progress as SSE until it ends: the current state first (a late client
/// catches up), then every change.
pub async fn stream(
    s: &mut Session,
    headers: &[(http::HeaderName, http::HeaderValue)],
    jobs: &Jobs,
    owner: &str,
    id: &str,
    style: Style,
) -> pingora::Result<()> {
    let (view, text, mut sub) = match jobs.subscribe(owner, id).await {
        Ok(Some(found)) => found,
        // Gone between the check and now, or the store failed: end cleanly.
        _ => {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "job store unavailable",
            ))
        }
    };
    let mut head = ResponseHeader::build(StatusCode::OK, Some(4 + headers.len()))?;
    head.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
    head.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
    // Chunked, so the connection stays reusable and each event goes out as it happens.
    head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    for (k, v) in headers {
        head.append_header(k.clone(), v.clone())?;
    }
    s.write_response_header(Box::new(head), false).await?;
    let status_event = |id: &str, status: Status, view: Option<&JobView>| match style {
        Style::Native => sse(Some("status"), &json!({"id": id, "status": status.label()})),
        Style::ShapeA => {
            let message = view.map_or_else(
                || shape_a_default_message(status).to_string(),
                shape_a_message,
            );
            sse(
                None,
                &json!({"status": TaskState::from(status), "message": message}),
            )
        }
    };
    let delta_event = |text: &str| match style {
        Style::Native => sse(Some("delta"), &json!({"id": id, "content": text})),
        Style::ShapeA => sse(
            None,
            &json!({"status": "processing", "message": "generating", "delta": text}),
        ),
    };
    let final_event = |view: &JobView| match style {
        Style::Native => sse(Some("result"), &to_json(&view.native())),
        Style::ShapeA => {
            let mut v = to_json(&shape_a_result(view));
            if let Some(obj) = v.as_object_mut() {
                let message = shape_a_message(view);
                obj.entry("message").or_insert(json!(message));
            }
            sse(None, &v)
        }
    };
    s.write_response_body(Some(status_event(id, view.status, Some(&view))), false)
        .await?;
    if !text.is_empty() {
        s.write_response_body(Some(delta_event(&text)), false)
            .await?;
    }
    if view.status.is_final() {
        s.write_response_body(Some(final_event(&view)), false)
            .await?;
        return s.write_response_body(None, true).await;
    }
    loop {
        let chunk = match sub.next(Duration::from_secs(15)).await {
            // A comment keeps proxies and load balancers from closing an idle stream.
            Some(None) => Bytes::from_static(b": keep-alive\n\n"),
            Some(Some(Update::Delta(text))) => delta_event(&text),
            Some(Some(Update::Status(status))) if status.is_final() => {
                if let Ok(Some(view)) = jobs.get(owner, id).await {
                    s.write_response_body(Some(final_event(&view)), false)
                        .await?;
                }
                return s.write_response_body(None, true).await;
            }
            Some(Some(Update::Status(status))) => status_event(id, status, None),
            None => return s.write_response_body(None, true).await,
        };
        s.write_response_body(Some(chunk), false).await?;
    }
}
