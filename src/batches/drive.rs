//! The batch driver: feeds each batch's lines to the job engine, a few at a time, records each
//! line's outcome once, and writes the output and error files at the end.
//!
//! Every node runs one. In process it drives the batches made here; with Redis a node drives
//! the batches whose lease it holds (taken when free, renewed every few seconds, so a dead
//! node's batches move on within [`LEASE`]). A line runs as the job `<batch id>-<line>`: a
//! driver that takes over submits the lines without an outcome again under the same ids, and
//! the job engine answers with the job already there (queued, running or finished), so a line
//! never runs twice because its driver changed.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;

use super::files::FileMeta;
use super::input::{self, Line};
use super::store::{Outcome, Record};
use super::{now_secs, BatchError, Batches};
use crate::config::Snapshot;
use crate::jobs::{JobView, Status, SubmitError};

/// How long a driver's lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a driver renews its lease: three times a lease, so one slow call never loses it.
const RENEW: Duration = Duration::from_millis(3300);
/// How often a node looks for batches to drive.
const SCAN: Duration = Duration::from_millis(500);
/// How often what is past `batches.retention` is removed (in process and on disk).
const SWEEP: Duration = Duration::from_secs(60);

/// The background service driving batches on this node.
pub struct Driver {
    pub batches: Arc<Batches>,
    pub config: Arc<ArcSwap<Snapshot>>,
}

#[async_trait]
impl BackgroundService for Driver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let node = format!("lumen-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let driving: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut swept = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SCAN) => {}
                _ = shutdown.changed() => return,
            }
            if swept.elapsed() >= SWEEP {
                swept = Instant::now();
                self.batches.sweep().await;
            }
            let Ok(active) = self.batches.store.active().await else {
                continue;
            };
            for id in active {
                if driving
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
                {
                    continue;
                }
                if !matches!(self.batches.store.lease(&id, &node, LEASE).await, Ok(true)) {
                    continue;
                }
                driving
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone());
                let (batches, config, node) =
                    (self.batches.clone(), self.config.clone(), node.clone());
                let (driving, stop) = (driving.clone(), shutdown.clone());
                tokio::spawn(async move {
                    // The lease is renewed beside the driving, however long one of its steps
                    // takes; lost (another node took the batch over), the driving stops at
                    // once, wherever it was: every step is safe to do again.
                    tokio::select! {
                        driven = drive(&batches, &config, &id, &node, stop) => {
                            if let Err(e) = driven {
                                tracing::warn!(batch = %id, error = %e, "batches: driver stopped; the batch is taken up again");
                            }
                        }
                        () = keep_lease(&batches, &id, &node) => {
                            tracing::info!(batch = %id, "batches: lease lost; another node drives the batch");
                        }
                    }
                    batches.store.release(&id, &node).await;
                    driving
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                });
            }
        }
    }
}

/// Renews this node's lease on a batch until it is lost (returns then). A renewal that fails
/// for Redis being unreachable is tried again; the lease may then lapse, and a node that can
/// reach Redis takes over.
async fn keep_lease(batches: &Batches, id: &str, node: &str) {
    loop {
        tokio::time::sleep(RENEW).await;
        if let Ok(false) = batches.store.renew(id, node, LEASE).await {
            return;
        }
    }
}

/// The job id of a batch's line (batch ids start with the job engine's
/// [`crate::jobs::BATCH_LINE_PREFIX`], so their lines run at the lowest priority).
pub fn job_id(batch: &str, index: usize) -> String {
    format!("{batch}-{index}")
}

/// Drives one batch until it is final, this node stops, or its lease is lost.
async fn drive(
    batches: &Batches,
    config: &ArcSwap<Snapshot>,
    id: &str,
    node: &str,
    mut stop: ShutdownWatch,
) -> Result<(), BatchError> {
    let store = &batches.store;
    let rec = store.get(id).await?;
    let Some(mut rec) = rec.filter(|r| !r.is_final()) else {
        // Finished (or expired) already, its final save cut short before it left the index:
        // it leaves now, or every node would look at it forever.
        return store.deactivate(id).await;
    };
    let principal = match crate::jobs::redis::principal_of(&rec.principal, &config.load().auth) {
        Ok(p) => p,
        Err(e) => return stop_short(batches, &mut rec, node, "invalid_api_key", &e.message).await,
    };
    let Some(data) = batches
        .files
        .content(&rec.owner, &rec.input_file_id)
        .await?
    else {
        let message = format!("the input file {} is gone", rec.input_file_id);
        return stop_short(batches, &mut rec, node, "input_file_missing", &message).await;
    };
    let (lines, endpoint) = match (
        input::lines(&data, usize::MAX),
        input::endpoint(&rec.endpoint),
    ) {
        (Ok(lines), Some(endpoint)) => (lines, endpoint),
        (Err(e), _) => return fail(batches, &mut rec, node, "invalid_file", &e).await,
        (_, None) => {
            let endpoint = rec.endpoint.clone();
            return fail(batches, &mut rec, node, "invalid_endpoint", &endpoint).await;
        }
    };
    let done = store.done(id).await?;
    let mut pending: VecDeque<usize> = (0..lines.len()).filter(|i| !done.contains(i)).collect();
    let mut running: Vec<(usize, String)> = Vec::new();
    let tick = store.tick();
    let owner = principal.key_id.clone();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let cancel = store.cancel_asked(id).await?;
        let expired = now_secs() >= rec.expires_at;
        if cancel.is_some() || expired {
            for (_, job) in &running {
                let _ = batches.jobs.cancel(&owner, job).await;
            }
            settle_stopped(batches, id, &lines, &owner, &mut running).await;
            let status = if cancel.is_some() {
                "cancelled"
            } else {
                "expired"
            };
            if expired && cancel.is_none() {
                // OpenAI's way: every line without an outcome (never started, or stopped
                // now) is in the error file.
                let done = store.done(id).await?;
                for (i, line) in lines.iter().enumerate().filter(|(i, _)| !done.contains(i)) {
                    let outcome = not_run(
                        id,
                        i,
                        line,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    );
                    record(batches, id, i, outcome).await?;
                }
            }
            rec.cancelling_at = rec.cancelling_at.or(cancel);
            return finalize(batches, &mut rec, node, status).await;
        }
        while running.len() < batches.settings.concurrency {
            let Some(i) = pending.pop_front() else { break };
            let Some(line) = lines.get(i) else { continue };
            match batches
                .jobs
                .submit(
                    &principal,
                    endpoint,
                    line.body.clone(),
                    Some(job_id(id, i)),
                    None,
                )
                .await
            {
                Ok((view, _)) => running.push((i, view.id)),
                // The queue (or this key's share of it) is full, or the store is down: the
                // line waits its turn.
                Err(SubmitError::QueueFull(_) | SubmitError::KeyFull(_))
                | Err(SubmitError::Unavailable(_))
                | Err(SubmitError::ShuttingDown) => {
                    pending.push_front(i);
                    break;
                }
            }
        }
        let mut still = Vec::with_capacity(running.len());
        for (i, job) in running.drain(..) {
            match batches.jobs.get(&owner, &job).await {
                Ok(Some(view)) if view.status.is_final() => {
                    if let Some(line) = lines.get(i) {
                        record(batches, id, i, outcome_of(id, i, line, &view)).await?;
                    }
                }
                // Gone (its result expired before it was read): submitted again.
                Ok(None) => pending.push_back(i),
                _ => still.push((i, job)),
            }
        }
        running = still;
        if pending.is_empty() && running.is_empty() {
            return finalize(batches, &mut rec, node, "completed").await;
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => {}
        }
    }
}

/// After a cancel: waits (a bounded while) for the lines that were running to stop, and
/// records those that finished anyway.
async fn settle_stopped(
    batches: &Batches,
    id: &str,
    lines: &[Line],
    owner: &str,
    running: &mut Vec<(usize, String)>,
) {
    let deadline = Instant::now()
        .checked_add(Duration::from_secs(30))
        .unwrap_or_else(Instant::now);
    while !running.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (i, job) in running.drain(..) {
            match batches.jobs.get(owner, &job).await {
                Ok(Some(view)) if view.status.is_final() => {
                    if view.status != Status::Cancelled {
                        if let Some(line) = lines.get(i) {
                            let _ = record(batches, id, i, outcome_of(id, i, line, &view)).await;
                        }
                    }
                }
                Ok(None) => {}
                _ => still.push((i, job)),
            }
        }
        *running = still;
        if !running.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Records a line's outcome (once) and counts it.
async fn record(
    batches: &Batches,
    id: &str,
    index: usize,
    outcome: Outcome,
) -> Result<(), BatchError> {
    let label = if outcome.ok { "completed" } else { "failed" };
    if batches.store.record(id, index, outcome).await? {
        batches
            .jobs
            .metrics
            .batch_requests
            .with_label_values(&[label])
            .inc();
    }
    Ok(())
}

/// The output or error file line of a finished line's job.
fn outcome_of(batch: &str, index: usize, line: &Line, view: &JobView) -> Outcome {
    let id = request_id(batch, index);
    match (view.status, &view.result, &view.error) {
        (Status::Completed, Some(body), _) => Outcome {
            ok: true,
            line: json!({
                "id": id,
                "custom_id": line.custom_id,
                "response": {"status_code": 200, "request_id": view.id, "body": body},
                "error": null,
            })
            .to_string(),
        },
        (_, _, Some(e)) if e.status.is_some() => Outcome {
            ok: false,
            line: json!({
                "id": id,
                "custom_id": line.custom_id,
                "response": {
                    "status_code": e.status,
                    "request_id": view.id,
                    "body": {"error": {"message": e.message, "type": e.kind, "code": e.code}},
                },
                "error": null,
            })
            .to_string(),
        },
        (_, _, error) => {
            let (code, message) = error
                .as_ref()
                .map_or(("failed", "the request failed"), |e| {
                    (
                        e.code.as_deref().unwrap_or(e.kind.as_str()),
                        e.message.as_str(),
                    )
                });
            not_run(batch, index, line, code, message)
        }
    }
}

/// An error file line for a request that got no answer.
fn not_run(batch: &str, index: usize, line: &Line, code: &str, message: &str) -> Outcome {
    Outcome {
        ok: false,
        line: json!({
            "id": request_id(batch, index),
            "custom_id": line.custom_id,
            "response": null,
            "error": {"code": code, "message": message},
        })
        .to_string(),
    }
}

/// `batch_req_<batch>_<line>`: the same for a line however often its driver changed.
fn request_id(batch: &str, index: usize) -> String {
    format!(
        "batch_req_{}_{index}",
        batch.strip_prefix("batch_").unwrap_or(batch)
    )
}

/// The ids of a batch's output and error files: made from the batch's, so a driver that
/// finalizes again (after a takeover) writes the same files, not new ones.
fn file_ids(batch: &str) -> (String, String) {
    let suffix = batch.strip_prefix("batch_").unwrap_or(batch);
    let stem = suffix.get(..23).unwrap_or(suffix);
    (format!("file-{stem}o"), format!("file-{stem}e"))
}

/// Writes the batch's record while this node holds its lease and the stored record is not
/// final; otherwise another node drives it (or finished it) and this driver stops.
async fn save(batches: &Batches, rec: &Record, node: &str) -> Result<(), BatchError> {
    if batches
        .store
        .save(rec, node, batches.settings.retention)
        .await?
    {
        Ok(())
    } else {
        Err(BatchError::Store(format!(
            "batch {} is driven by another node now",
            rec.id
        )))
    }
}

/// The batch cannot go on (its key is gone, or its input): it fails, keeping in its output and
/// error files what its lines did so far.
async fn stop_short(
    batches: &Batches,
    rec: &mut Record,
    node: &str,
    code: &str,
    message: &str,
) -> Result<(), BatchError> {
    if batches.store.done(&rec.id).await?.is_empty() {
        return fail(batches, rec, node, code, message).await;
    }
    rec.errors = Some(vec![whole_batch_error(code, message)]);
    finalize(batches, rec, node, "failed").await
}

/// An error of the whole batch, not of one line (OpenAI's `errors.data` item).
fn whole_batch_error(code: &str, message: &str) -> serde_json::Value {
    json!({"code": code, "message": message, "line": null, "param": null})
}

/// The batch failed before any line ran.
async fn fail(
    batches: &Batches,
    rec: &mut Record,
    node: &str,
    code: &str,
    message: &str,
) -> Result<(), BatchError> {
    rec.errors = Some(vec![whole_batch_error(code, message)]);
    rec.status = "failed".into();
    rec.failed_at = Some(now_secs());
    save(batches, rec, node).await?;
    batches
        .jobs
        .metrics
        .batches
        .with_label_values(&["failed"])
        .inc();
    Ok(())
}

/// Writes the output and error files and makes the batch final (`status`).
async fn finalize(
    batches: &Batches,
    rec: &mut Record,
    node: &str,
    status: &str,
) -> Result<(), BatchError> {
    let now = now_secs();
    rec.status = "finalizing".into();
    rec.finalizing_at.get_or_insert(now);
    save(batches, rec, node).await?;
    let results = batches.store.results(&rec.id).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for outcome in results.values() {
        let file = if outcome.ok { &mut out } else { &mut err };
        file.extend_from_slice(outcome.line.as_bytes());
        file.push(b'\n');
    }
    let (out_id, err_id) = file_ids(&rec.id);
    let expires_at = Some(now.saturating_add(batches.settings.retention.as_secs()));
    for (data, file_id, kind, slot) in [
        (out, out_id, "output", &mut rec.output_file_id),
        (err, err_id, "error", &mut rec.error_file_id),
    ] {
        if data.is_empty() {
            continue;
        }
        let meta = FileMeta {
            id: file_id.clone(),
            owner: rec.owner.clone(),
            bytes: data.len() as u64,
            created_at: now,
            filename: format!("{}_{kind}.jsonl", rec.id),
            purpose: "batch_output".into(),
            expires_at,
        };
        batches.files.put(&meta, &Bytes::from(data)).await?;
        *slot = Some(file_id);
    }
    let at = Some(now_secs());
    match status {
        "cancelled" => rec.cancelled_at = at,
        "expired" => rec.expired_at = at,
        "failed" => rec.failed_at = at,
        _ => rec.completed_at = at,
    }
    rec.status = status.into();
    save(batches, rec, node).await?;
    batches
        .jobs
        .metrics
        .batches
        .with_label_values(&[status])
        .inc();
    tracing::info!(batch = %rec.id, status, "batches: batch finished");
    Ok(())
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
    use crate::jobs::JobError;
    use serde_json::Value;

    fn line() -> Line {
        Line {
            custom_id: "c1".into(),
            url: "/v1/chat/completions".into(),
            body: json!({"model": "m"}),
        }
    }

    fn view(status: Status) -> JobView {
        let mut v = JobView::queued("batch_x-3".into(), 1);
        v.status = status;
        v
    }

    #[test]
    fn outcomes_have_openais_shape() {
        let mut done = view(Status::Completed);
        done.result = Some(json!({"choices": []}));
        let ok: Value =
            serde_json::from_str(&outcome_of("batch_x", 3, &line(), &done).line).unwrap();
        assert_eq!(ok["id"], "batch_req_x_3");
        assert_eq!(ok["custom_id"], "c1");
        assert_eq!(ok["response"]["status_code"], 200);
        assert_eq!(ok["response"]["request_id"], "batch_x-3");
        assert_eq!(ok["response"]["body"], json!({"choices": []}));
        assert!(ok["error"].is_null());

        let mut refused = view(Status::Failed);
        refused.error = Some(JobError {
            message: "no such model".into(),
            kind: "invalid_request_error".into(),
            code: Some("model_not_found".into()),
            status: Some(404),
        });
        let o = outcome_of("batch_x", 3, &line(), &refused);
        assert!(!o.ok);
        let v: Value = serde_json::from_str(&o.line).unwrap();
        assert_eq!(v["response"]["status_code"], 404);
        assert_eq!(v["response"]["body"]["error"]["code"], "model_not_found");

        let mut broke = view(Status::Failed);
        broke.error = Some(JobError {
            message: "the stream broke".into(),
            kind: "api_error".into(),
            code: Some("upstream_error".into()),
            status: None,
        });
        let v: Value =
            serde_json::from_str(&outcome_of("batch_x", 3, &line(), &broke).line).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "upstream_error");
    }

    #[test]
    fn output_file_ids_are_the_batchs_own_and_well_formed() {
        let batch = super::super::new_id("batch_");
        let (out, err) = file_ids(&batch);
        assert!(super::super::well_formed(&out, "file-"), "{out}");
        assert!(super::super::well_formed(&err, "file-"), "{err}");
        assert_ne!(out, err);
        assert_eq!(file_ids(&batch), (out, err));
    }
}
