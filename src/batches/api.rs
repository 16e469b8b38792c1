//! The HTTP shapes of the Batch API, as OpenAI answers them (the official SDKs' `files` and
//! `batches` resources work unchanged):
//!
//! - `POST /v1/files` (multipart: `purpose=batch`, `file`), `GET /v1/files`,
//!   `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`;
//! - `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
//!   `POST /v1/batches/{id}/cancel`.
//!
//! Files and batches are their owner's (`batches.scope`): others get 404, as for an id that
//! never existed.

use bytes::Bytes;
use http::{Method, StatusCode};
use lumen_plugins::auth::Principal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::files::FileMeta;
use super::store::Record;
use super::{input, multipart, new_id, now_secs, BatchError, Batches};
use crate::error::GatewayError;

/// A call of the Batch API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Upload,
    ListFiles,
    GetFile(String),
    Content(String),
    DeleteFile(String),
    Create,
    List,
    Get(String),
    Cancel(String),
}

impl Call {
    /// Calls that create or change something count against the key's request limit; reads
    /// (an SDK polling a batch) do not.
    pub fn counts(&self) -> bool {
        matches!(
            self,
            Call::Upload | Call::Create | Call::Cancel(_) | Call::DeleteFile(_)
        )
    }

    /// The upload is the one call whose body may be a file (`batches.max_file_bytes`).
    pub fn is_upload(&self) -> bool {
        *self == Call::Upload
    }
}

/// Whether `path` belongs to the Batch API, and which call it is.
pub fn route(method: &Method, path: &str) -> Option<Result<Call, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let wrong = || {
        Some(Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
        }))
    };
    let one = |rest: &str| (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string());
    let is = |m: Method, call: Call| {
        if *method == m {
            Some(Ok(call))
        } else {
            wrong()
        }
    };
    match path {
        "/v1/files" => {
            return match *method {
                Method::POST => Some(Ok(Call::Upload)),
                Method::GET => Some(Ok(Call::ListFiles)),
                _ => wrong(),
            }
        }
        "/v1/batches" => {
            return match *method {
                Method::POST => Some(Ok(Call::Create)),
                Method::GET => Some(Ok(Call::List)),
                _ => wrong(),
            }
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/files/") {
        if let Some(id) = rest.strip_suffix("/content").and_then(one) {
            return is(Method::GET, Call::Content(id));
        }
        let id = one(rest)?;
        return match *method {
            Method::GET => Some(Ok(Call::GetFile(id))),
            Method::DELETE => Some(Ok(Call::DeleteFile(id))),
            _ => wrong(),
        };
    }
    let rest = path.strip_prefix("/v1/batches/")?;
    if let Some(id) = rest.strip_suffix("/cancel").and_then(one) {
        return is(Method::POST, Call::Cancel(id));
    }
    is(Method::GET, Call::Get(one(rest)?))
}

/// What the gateway writes back.
pub enum Answer {
    Json(StatusCode, Value),
    /// A file's bytes.
    Content(Bytes),
}

/// The request a call came with: its body (POST) and what the answer depends on.
pub struct Request<'a> {
    pub body: Option<Bytes>,
    pub content_type: Option<&'a str>,
    pub query: Option<&'a str>,
}

/// Answers a Batch API call for `principal`.
pub async fn answer(
    call: Call,
    req: Request<'_>,
    principal: &Principal,
    batches: &Batches,
) -> Result<Answer, GatewayError> {
    let owner = batches.settings.owner(principal);
    let ok = |v: Value| Ok(Answer::Json(StatusCode::OK, v));
    match call {
        Call::Upload => ok(upload(req, &owner, batches).await?.openai()),
        Call::ListFiles => {
            let page = Page::of(req.query, 10_000, 10_000)?;
            let purpose = param(req.query, "purpose");
            let mut files = batches.files.list(&owner).await?;
            files.retain(|f| purpose.as_deref().is_none_or(|p| f.purpose == p));
            if page.ascending {
                files.reverse();
            }
            ok(page.list(files.iter().map(|f| (f.id.as_str(), f.openai()))))
        }
        Call::GetFile(id) => ok(file(batches, &owner, &id).await?.openai()),
        Call::Content(id) => match batches.files.content(&owner, &id).await? {
            Some(bytes) => Ok(Answer::Content(bytes)),
            None => Err(BatchError::NotFound("File", id).into()),
        },
        Call::DeleteFile(id) => {
            // A running batch reads its input again when another node takes it over.
            let running = batches.store.list(&owner).await?;
            if let Some(user) = running
                .iter()
                .find(|b| !b.is_final() && b.input_file_id == id)
            {
                return Err(BatchError::Conflict(format!(
                    "file {id} is the input of batch {}, which has not finished; cancel it first",
                    user.id
                ))
                .into());
            }
            if batches.files.delete(&owner, &id).await? {
                ok(json!({"id": id, "object": "file", "deleted": true}))
            } else {
                Err(BatchError::NotFound("File", id).into())
            }
        }
        Call::Create => {
            let rec = create(req, principal, &owner, batches).await?;
            ok(rec.openai((0, 0), None))
        }
        Call::List => {
            let page = Page::of(req.query, 20, 100)?;
            let records = batches.store.list(&owner).await?;
            let (page, more) = page.window(records.iter().map(|r| (r.id.as_str(), r)));
            let mut shown = Vec::with_capacity(page.len());
            for (id, rec) in page {
                shown.push((id, view(batches, rec).await?));
            }
            ok(list_of(shown, more))
        }
        Call::Get(id) => {
            let rec = batch(batches, &owner, &id).await?;
            ok(view(batches, &rec).await?)
        }
        Call::Cancel(id) => {
            let rec = batch(batches, &owner, &id).await?;
            if rec.is_final() {
                return Err(BatchError::Conflict(format!(
                    "Cannot cancel a batch with status `{}`",
                    rec.status
                ))
                .into());
            }
            batches.store.ask_cancel(&id, now_secs()).await?;
            ok(view(batches, &rec).await?)
        }
    }
}

async fn view(batches: &Batches, rec: &Record) -> Result<Value, BatchError> {
    let counts = batches.store.counts(&rec.id).await?;
    let cancel = if rec.is_final() {
        None
    } else {
        batches.store.cancel_asked(&rec.id).await?
    };
    Ok(rec.openai(counts, cancel))
}

async fn file(batches: &Batches, owner: &str, id: &str) -> Result<FileMeta, BatchError> {
    batches
        .files
        .meta(owner, id)
        .await?
        .ok_or_else(|| BatchError::NotFound("File", id.to_string()))
}

async fn batch(batches: &Batches, owner: &str, id: &str) -> Result<Record, BatchError> {
    batches
        .store
        .get(id)
        .await?
        .filter(|r| r.owner == owner)
        .ok_or_else(|| BatchError::NotFound("Batch", id.to_string()))
}

/// `POST /v1/files`: the multipart body's `purpose` and `file`; a batch file's lines are all
/// checked now.
async fn upload(req: Request<'_>, owner: &str, batches: &Batches) -> Result<FileMeta, BatchError> {
    let body = req.body.unwrap_or_default();
    let boundary = req
        .content_type
        .and_then(multipart::boundary)
        .ok_or_else(|| {
            BatchError::invalid(
                "POST /v1/files takes multipart/form-data with the fields `purpose` and `file`",
                "file",
            )
        })?;
    let parts = multipart::parts(&body, &boundary).map_err(|e| BatchError::invalid(e, "file"))?;
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(&p.data).trim().to_string())
        .ok_or_else(|| BatchError::invalid("the field `purpose` is missing", "purpose"))?;
    if purpose != "batch" {
        return Err(BatchError::invalid(
            format!(
                "purpose `{purpose}` is not supported here; this gateway stores files for `batch`"
            ),
            "purpose",
        ));
    }
    let file = parts
        .into_iter()
        .find(|p| p.name == "file")
        .ok_or_else(|| BatchError::invalid("the field `file` is missing", "file"))?;
    input::lines(&file.data, batches.settings.max_requests).map_err(|e| {
        BatchError::invalid(format!("the file is not a valid batch file: {e}"), "file")
    })?;
    let now = now_secs();
    let meta = FileMeta {
        id: new_id("file-"),
        owner: owner.to_string(),
        bytes: file.data.len() as u64,
        created_at: now,
        filename: file
            .filename
            .filter(|n| !n.is_empty())
            .map(|n| n.chars().take(256).collect())
            .unwrap_or_else(|| "upload.jsonl".into()),
        purpose,
        expires_at: Some(now.saturating_add(batches.settings.retention.as_secs())),
    };
    batches.files.put(&meta, &file.data).await?;
    Ok(meta)
}

/// `POST /v1/batches`.
#[derive(Debug, Deserialize)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

async fn create(
    req: Request<'_>,
    principal: &Principal,
    owner: &str,
    batches: &Batches,
) -> Result<Record, BatchError> {
    let body = req.body.unwrap_or_default();
    let create: CreateBatch = serde_json::from_slice(&body).map_err(|e| BatchError::Invalid {
        message: format!(
            "POST /v1/batches takes {{\"input_file_id\", \"endpoint\", \"completion_window\": \"24h\", \"metadata\"?}}: {e}"
        ),
        param: None,
    })?;
    if input::endpoint(&create.endpoint).is_none() {
        return Err(BatchError::invalid(
            format!(
                "endpoint `{}` is not one a batch runs ({})",
                create.endpoint,
                input::ENDPOINTS.join(", ")
            ),
            "endpoint",
        ));
    }
    if create.completion_window != "24h" {
        return Err(BatchError::invalid(
            "completion_window must be \"24h\"",
            "completion_window",
        ));
    }
    if let Some(m) = &create.metadata {
        let fits = m.len() <= 16
            && m.iter().all(|(k, v)| {
                k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512)
            });
        if !fits {
            return Err(BatchError::invalid(
                "metadata holds at most 16 string values, keys up to 64 and values up to 512 characters",
                "metadata",
            ));
        }
    }
    let meta = file(batches, owner, &create.input_file_id).await?;
    if meta.purpose != "batch" {
        return Err(BatchError::invalid(
            format!("file {} was not uploaded with purpose `batch`", meta.id),
            "input_file_id",
        ));
    }
    let data = batches
        .files
        .content(owner, &meta.id)
        .await?
        .ok_or_else(|| BatchError::NotFound("File", meta.id.clone()))?;
    let lines = input::lines(&data, batches.settings.max_requests)
        .map_err(|e| BatchError::invalid(e, "input_file_id"))?;
    // Every line must ask for the batch's endpoint (as OpenAI checks): else the batch fails
    // validation, listing the lines.
    let errors: Vec<Value> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.url != create.endpoint)
        .take(100)
        .map(|(i, l)| {
            json!({
                "code": "mismatched_endpoint",
                "message": format!("the url `{}` does not match the batch's endpoint `{}`", l.url, create.endpoint),
                "line": i.saturating_add(1),
                "param": "url",
            })
        })
        .collect();
    let now = now_secs();
    let valid = errors.is_empty();
    let rec = Record {
        id: new_id("batch_"),
        owner: owner.to_string(),
        // As the job engine records a job's submitter: the lines run as it.
        principal: crate::jobs::redis::recorded(principal),
        endpoint: create.endpoint,
        input_file_id: meta.id,
        completion_window: create.completion_window,
        metadata: create.metadata.map(Value::Object),
        status: if valid { "in_progress" } else { "failed" }.into(),
        total: lines.len() as u64,
        created_at: now,
        expires_at: now.saturating_add(24 * 3600),
        in_progress_at: valid.then_some(now),
        finalizing_at: None,
        completed_at: None,
        failed_at: (!valid).then_some(now),
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        output_file_id: None,
        error_file_id: None,
        errors: (!valid).then_some(errors),
    };
    batches
        .store
        .create(&rec, valid, batches.settings.retention)
        .await?;
    Ok(rec)
}

/// A list's page: `limit`, `after` (an id), and for files `order`.
struct Page {
    limit: usize,
    after: Option<String>,
    ascending: bool,
}

/// A query parameter (ids, numbers and words here: nothing needs percent-decoding).
fn param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

impl Page {
    fn of(query: Option<&str>, default: usize, max: usize) -> Result<Page, BatchError> {
        let limit = match param(query, "limit") {
            None => default,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=max).contains(l))
                .ok_or_else(|| BatchError::invalid(format!("limit must be 1 to {max}"), "limit"))?,
        };
        Ok(Page {
            limit,
            after: param(query, "after"),
            ascending: param(query, "order").as_deref() == Some("asc"),
        })
    }

    /// The items after `after`, `limit` of them, and whether more follow (an unknown `after`
    /// gives an empty page).
    fn window<'a, T>(
        &self,
        items: impl Iterator<Item = (&'a str, T)>,
    ) -> (Vec<(&'a str, T)>, bool) {
        let mut items = items;
        if let Some(after) = &self.after {
            if !items.by_ref().any(|(id, _)| id == after) {
                return (Vec::new(), false);
            }
        }
        let shown: Vec<_> = items.by_ref().take(self.limit).collect();
        let more = items.next().is_some();
        (shown, more)
    }

    fn list<'a>(&self, items: impl Iterator<Item = (&'a str, Value)>) -> Value {
        let (shown, more) = self.window(items);
        list_of(shown, more)
    }
}

/// OpenAI's list object.
fn list_of(shown: Vec<(&str, Value)>, has_more: bool) -> Value {
    json!({
        "object": "list",
        "first_id": shown.first().map(|(id, _)| id.to_string()),
        "last_id": shown.last().map(|(id, _)| id.to_string()),
        "has_more": has_more,
        "data": shown.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_calls() {
        let r = |m: Method, p: &str| route(&m, p).map(|c| c.ok());
        assert_eq!(r(Method::POST, "/v1/files"), Some(Some(Call::Upload)));
        assert_eq!(r(Method::GET, "/v1/files/"), Some(Some(Call::ListFiles)));
        assert_eq!(
            r(Method::GET, "/v1/files/file-a"),
            Some(Some(Call::GetFile("file-a".into())))
        );
        assert_eq!(
            r(Method::GET, "/v1/files/file-a/content"),
            Some(Some(Call::Content("file-a".into())))
        );
        assert_eq!(
            r(Method::DELETE, "/v1/files/file-a"),
            Some(Some(Call::DeleteFile("file-a".into())))
        );
        assert_eq!(r(Method::POST, "/v1/batches"), Some(Some(Call::Create)));
        assert_eq!(r(Method::GET, "/v1/batches"), Some(Some(Call::List)));
        assert_eq!(
            r(Method::GET, "/v1/batches/batch_a"),
            Some(Some(Call::Get("batch_a".into())))
        );
        assert_eq!(
            r(Method::POST, "/v1/batches/batch_a/cancel"),
            Some(Some(Call::Cancel("batch_a".into())))
        );
        assert_eq!(r(Method::PUT, "/v1/files"), Some(None), "405");
        assert_eq!(
            r(Method::GET, "/v1/batches/batch_a/cancel"),
            Some(None),
            "405"
        );
        assert_eq!(r(Method::GET, "/v1/files/a/b/c"), None);
        assert_eq!(r(Method::GET, "/v1/chat/completions"), None);
    }

    #[test]
    fn pages_follow_after_and_limit() {
        let page = Page::of(Some("limit=2&after=b"), 20, 100).unwrap();
        let items = ["a", "b", "c", "d", "e"].map(|id| (id, json!(id)));
        let v = page.list(items.clone().into_iter());
        assert_eq!(v["data"], json!(["c", "d"]));
        assert_eq!(v["first_id"], "c");
        assert_eq!(v["last_id"], "d");
        assert_eq!(v["has_more"], true);
        let last = Page::of(Some("limit=2&after=d"), 20, 100)
            .unwrap()
            .list(items.clone().into_iter());
        assert_eq!(last["data"], json!(["e"]));
        assert_eq!(last["has_more"], false);
        assert!(Page::of(Some("limit=0"), 20, 100).is_err());
        assert!(Page::of(Some("limit=x"), 20, 100).is_err());
        assert!(Page::of(Some("limit=101"), 20, 100).is_err());
        assert_eq!(Page::of(None, 20, 100).unwrap().limit, 20);
        let unknown = Page::of(Some("after=zz"), 20, 100)
            .unwrap()
            .list(items.into_iter());
        assert_eq!(unknown["data"], json!([]));
    }
}
