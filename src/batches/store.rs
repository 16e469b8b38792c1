//! Batches: their records, their lines' outcomes (each recorded exactly once), cancel
//! requests, and which node drives each.
//!
//! In process (no `redis:`), or in Redis, where a batch's keys share one hash tag
//! (`{prefix:batch:<id>}`: `:rec` its record, `:res` its lines' outcomes by line with the
//! counts, `:cancel` a cancel request, `:lease` the driving node), and two indexes sit apart:
//! `{prefix:batches}:active` (batches to drive) and `{prefix:batches}:own:<len>:<owner>`.
//! Only the lease holder writes a record; a cancel request is a key of its own, so the client's
//! cancel and the driver's progress never overwrite each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lumen_plugins::redis_link::{RedisConn, RedisLink};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::batch::BatchError;

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// `key:<id>` or `tenant:<name>`: who may see it.
    pub owner: String,
    /// The key that made it, as the job engine records a job's submitter: its lines run as
    /// this key (`jobs::redis::principal_of`).
    pub principal: Value,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
    pub status: String,
    pub total: u64,
    pub created_at: u64,
    pub expires_at: u64,
    pub in_progress_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Why validation failed: `[{code, message, line, param}]`.
    pub errors: Option<Vec<Value>>,
}

impl Record {
    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// OpenAI's batch object, with the lines' counts so far; a batch asked to stop shows
    /// `cancelling` until its driver has stopped it.
    pub fn openai(&self, counts: (u64, u64), cancel_asked: Option<u64>) -> Value {
        let (status, cancelling_at) = match cancel_asked {
            Some(at) if !self.is_final() => ("cancelling", self.cancelling_at.or(Some(at))),
            _ => (self.status.as_str(), self.cancelling_at),
        };
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors.as_ref().map(|data| json!({"object": "list", "data": data})),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": counts.0,
                "failed": counts.1,
            },
            "metadata": self.metadata,
        })
    }
}

/// One line's outcome: whether it succeeded, and its output (or error) file line.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    pub line: String,
}

/// A batch kept in process.
#[derive(Default)]
pub struct MemBatch {
    record: Option<Record>,
    results: BTreeMap<usize, Outcome>,
    counts: (u64, u64),
    cancel: Option<u64>,
    /// When it became final (the retention counts from then).
    finished: Option<std::time::Instant>,
}

pub enum BatchStore {
    Memory(Mutex<HashMap<String, MemBatch>>),
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
        record_result: redis::Script,
        renew: redis::Script,
        save: redis::Script,
    },
}

/// Records a line's outcome unless it has one, and counts it: the first outcome is the only
/// one, so a line run again after its driver died is recorded once.
const RECORD_RESULT: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
  return 1
end
return 0
";

/// Writes a batch's record only while this node holds its lease and the stored record is not
/// final (a node that lost its lease must not undo the next one's work); a final record
/// expires after the retention (ARGV[3] seconds), with its outcomes, and its cancel request
/// goes.
const SAVE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local current = redis.call('GET', KEYS[2])
if current then
  local ok, rec = pcall(cjson.decode, current)
  if ok and type(rec) == 'table' then
    local s = rec['status']
    if s == 'completed' or s == 'failed' or s == 'expired' or s == 'cancelled' then return 0 end
  end
end
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('DEL', KEYS[4])
end
return 1
";

/// Extends a lease only while this node holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

fn store_error(e: impl std::fmt::Display) -> BatchError {
    BatchError::Store(e.to_string())
}

fn lock(
    m: &Mutex<HashMap<String, MemBatch>>,
) -> std::sync::MutexGuard<'_, HashMap<String, MemBatch>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fields of the results hash that are counts, not lines.
const OK: &str = "ok";
const ERR: &str = "err";

impl BatchStore {
    pub fn memory() -> BatchStore {
        BatchStore::Memory(Mutex::new(HashMap::new()))
    }

    pub fn redis(link: Arc<RedisLink>, prefix: &str) -> BatchStore {
        BatchStore::Redis {
            link,
            prefix: prefix.to_string(),
            record_result: redis::Script::new(RECORD_RESULT),
            renew: redis::Script::new(RENEW),
            save: redis::Script::new(SAVE),
        }
    }

    fn key(prefix: &str, id: &str, what: &str) -> String {
        format!("{{{prefix}:batch:{id}}}:{what}")
    }

    fn active_key(prefix: &str) -> String {
        format!("{{{prefix}:batches}}:active")
    }

    fn owned_key(prefix: &str, owner: &str) -> String {
        format!("{{{prefix}:batches}}:own:{}:{owner}", owner.len())
    }

    async fn conn(link: &RedisLink) -> Result<RedisConn, BatchError> {
        link.connection("batches").await.map_err(store_error)
    }

    /// Stores a new batch; `active` ones are then driven, final ones (that failed validation)
    /// expire after `retention`.
    pub async fn create(
        &self,
        record: &Record,
        active: bool,
        retention: Duration,
    ) -> Result<(), BatchError> {
        match self {
            BatchStore::Memory(m) => {
                lock(m).insert(
                    record.id.clone(),
                    MemBatch {
                        record: Some(record.clone()),
                        // One that failed validation is final from the start.
                        finished: record.is_final().then(std::time::Instant::now),
                        ..MemBatch::default()
                    },
                );
                Ok(())
            }
            BatchStore::Redis { link, prefix, .. } => {
                let json = serde_json::to_string(record).map_err(store_error)?;
                let mut conn = Self::conn(link).await?;
                // The record first, then the indexes (their own slot: a Cluster refuses a
                // pipeline across slots). An index never names a record that is not there.
                let mut set = redis::cmd("SET");
                set.arg(Self::key(prefix, &record.id, "rec")).arg(json);
                if !active {
                    set.arg("EX").arg(retention.as_secs().max(1));
                }
                link.within(set.query_async::<()>(&mut conn))
                    .await
                    .map_err(store_error)?;
                let mut pipe = redis::pipe();
                pipe.zadd(
                    Self::owned_key(prefix, &record.owner),
                    &record.id,
                    record.created_at,
                )
                .ignore();
                if active {
                    pipe.zadd(Self::active_key(prefix), &record.id, record.created_at)
                        .ignore();
                }
                link.within(pipe.query_async::<()>(&mut conn))
                    .await
                    .map_err(store_error)
            }
        }
    }

    /// A batch's record, whoever owns it (callers check the owner).
    pub async fn get(&self, id: &str) -> Result<Option<Record>, BatchError> {
        if !super::batch::well_formed(id, "batch_") {
            return Ok(None);
        }
        match self {
            BatchStore::Memory(m) => Ok(lock(m).get(id).and_then(|b| b.record.clone())),
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                let raw: Option<String> = link
                    .within(
                        redis::cmd("GET")
                            .arg(Self::key(prefix, id, "rec"))
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(store_error)?;
                Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
            }
        }
    }

    /// Writes a batch's record, if `node` still holds its lease and the stored record is not
    /// final: `false` when it was not written (another node drives the batch now, or has
    /// finished it). A final one stops being driven and expires after `retention`.
    pub async fn save(
        &self,
        record: &Record,
        node: &str,
        retention: Duration,
    ) -> Result<bool, BatchError> {
        match self {
            BatchStore::Memory(m) => {
                let mut all = lock(m);
                let Some(b) = all.get_mut(&record.id) else {
                    return Ok(false);
                };
                if b.record.as_ref().is_some_and(Record::is_final) {
                    return Ok(false);
                }
                b.record = Some(record.clone());
                if record.is_final() {
                    b.finished = Some(std::time::Instant::now());
                }
                Ok(true)
            }
            BatchStore::Redis {
                link, prefix, save, ..
            } => {
                let json = serde_json::to_string(record).map_err(store_error)?;
                let mut conn = Self::conn(link).await?;
                let ttl = if record.is_final() {
                    retention.as_secs().max(1)
                } else {
                    0
                };
                let mut inv = save.prepare_invoke();
                inv.key(Self::key(prefix, &record.id, "lease"))
                    .key(Self::key(prefix, &record.id, "rec"))
                    .key(Self::key(prefix, &record.id, "res"))
                    .key(Self::key(prefix, &record.id, "cancel"))
                    .arg(node)
                    .arg(json)
                    .arg(ttl);
                let written: i64 = link
                    .within(inv.invoke_async(&mut conn))
                    .await
                    .map_err(store_error)?;
                if written == 1 && record.is_final() {
                    // The index lives under another hash tag: a second call.
                    link.within(
                        redis::cmd("ZREM")
                            .arg(Self::active_key(prefix))
                            .arg(&record.id)
                            .query_async::<()>(&mut conn),
                    )
                    .await
                    .map_err(store_error)?;
                }
                Ok(written == 1)
            }
        }
    }

    /// Takes a batch out of the ones to drive (Redis: its index; in process, a final record
    /// is not driven anyway).
    pub async fn deactivate(&self, id: &str) -> Result<(), BatchError> {
        let BatchStore::Redis { link, prefix, .. } = self else {
            return Ok(());
        };
        let mut conn = Self::conn(link).await?;
        link.within(
            redis::cmd("ZREM")
                .arg(Self::active_key(prefix))
                .arg(id)
                .query_async::<()>(&mut conn),
        )
        .await
        .map_err(store_error)
    }

    /// Forgets, in process, the batches final for longer than `retention` (Redis expires its
    /// own).
    pub fn sweep(&self, retention: Duration) {
        if let BatchStore::Memory(m) = self {
            lock(m).retain(|_, b| b.finished.is_none_or(|at| at.elapsed() < retention));
        }
    }

    /// `owner`'s batches, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<Record>, BatchError> {
        let mut records = match self {
            BatchStore::Memory(m) => lock(m)
                .values()
                .filter_map(|b| b.record.clone())
                .filter(|r| r.owner == owner)
                .collect::<Vec<_>>(),
            BatchStore::Redis { link, prefix, .. } => {
                let owned = Self::owned_key(prefix, owner);
                super::batch::read_index(link, &owned, |id| async move { self.get(&id).await })
                    .await?
            }
        };
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(records)
    }

    /// Asks a batch to stop (at `now`); its driver cancels what runs and finalizes it.
    pub async fn ask_cancel(&self, id: &str, now: u64) -> Result<(), BatchError> {
        match self {
            BatchStore::Memory(m) => {
                if let Some(b) = lock(m).get_mut(id) {
                    b.cancel.get_or_insert(now);
                }
                Ok(())
            }
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                link.within(
                    redis::cmd("SET")
                        .arg(Self::key(prefix, id, "cancel"))
                        .arg(now)
                        .arg("NX")
                        .arg("EX")
                        .arg(48 * 3600)
                        .query_async::<()>(&mut conn),
                )
                .await
                .map_err(store_error)
            }
        }
    }

    /// When a batch was asked to stop, if it was.
    pub async fn cancel_asked(&self, id: &str) -> Result<Option<u64>, BatchError> {
        match self {
            BatchStore::Memory(m) => Ok(lock(m).get(id).and_then(|b| b.cancel)),
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                let at: Option<u64> = link
                    .within(
                        redis::cmd("GET")
                            .arg(Self::key(prefix, id, "cancel"))
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(store_error)?;
                Ok(at)
            }
        }
    }

    /// Records line `index`'s outcome unless it has one; `true` when this call recorded it.
    pub async fn record(
        &self,
        id: &str,
        index: usize,
        outcome: Outcome,
    ) -> Result<bool, BatchError> {
        match self {
            BatchStore::Memory(m) => {
                let mut all = lock(m);
                let Some(b) = all.get_mut(id) else {
                    return Ok(false);
                };
                if b.results.contains_key(&index) {
                    return Ok(false);
                }
                if outcome.ok {
                    b.counts.0 = b.counts.0.saturating_add(1);
                } else {
                    b.counts.1 = b.counts.1.saturating_add(1);
                }
                b.results.insert(index, outcome);
                Ok(true)
            }
            BatchStore::Redis {
                link,
                prefix,
                record_result,
                ..
            } => {
                let mut conn = Self::conn(link).await?;
                let mut inv = record_result.prepare_invoke();
                inv.key(Self::key(prefix, id, "res"))
                    .arg(index)
                    .arg(format!(
                        "{}{}",
                        if outcome.ok { 'o' } else { 'e' },
                        outcome.line
                    ))
                    .arg(if outcome.ok { OK } else { ERR });
                let fresh: i64 = link
                    .within(inv.invoke_async(&mut conn))
                    .await
                    .map_err(store_error)?;
                Ok(fresh == 1)
            }
        }
    }

    /// Lines recorded so far: (succeeded, failed).
    pub async fn counts(&self, id: &str) -> Result<(u64, u64), BatchError> {
        match self {
            BatchStore::Memory(m) => Ok(lock(m).get(id).map_or((0, 0), |b| b.counts)),
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                let (ok, err): (Option<u64>, Option<u64>) = link
                    .within(
                        redis::cmd("HMGET")
                            .arg(Self::key(prefix, id, "res"))
                            .arg(OK)
                            .arg(ERR)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(store_error)?;
                Ok((ok.unwrap_or(0), err.unwrap_or(0)))
            }
        }
    }

    /// Every recorded outcome, by line.
    pub async fn results(&self, id: &str) -> Result<BTreeMap<usize, Outcome>, BatchError> {
        match self {
            BatchStore::Memory(m) => Ok(lock(m)
                .get(id)
                .map(|b| b.results.clone())
                .unwrap_or_default()),
            BatchStore::Redis { link, prefix, .. } => {
                // Read once per batch (when its driver starts and when it finalizes), not
                // per poll; a dedicated connection, as a big batch's hash is big.
                let mut conn = link.dedicated("batches").await.map_err(store_error)?;
                let all: HashMap<String, String> = tokio::time::timeout(
                    Duration::from_secs(30),
                    redis::cmd("HGETALL")
                        .arg(Self::key(prefix, id, "res"))
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| store_error("no answer in time"))?
                .map_err(store_error)?;
                Ok(all
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let index = k.parse::<usize>().ok()?;
                        let ok = v.starts_with('o');
                        Some((
                            index,
                            Outcome {
                                ok,
                                line: v.get(1..)?.to_string(),
                            },
                        ))
                    })
                    .collect())
            }
        }
    }

    /// Lines that have an outcome.
    pub async fn done(&self, id: &str) -> Result<HashSet<usize>, BatchError> {
        match self {
            BatchStore::Memory(_) => Ok(self.results(id).await?.into_keys().collect()),
            BatchStore::Redis { link, prefix, .. } => {
                // The line numbers only, not the outcomes.
                let mut conn = link.dedicated("batches").await.map_err(store_error)?;
                let keys: Vec<String> = tokio::time::timeout(
                    Duration::from_secs(30),
                    redis::cmd("HKEYS")
                        .arg(Self::key(prefix, id, "res"))
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| store_error("no answer in time"))?
                .map_err(store_error)?;
                Ok(keys.iter().filter_map(|k| k.parse().ok()).collect())
            }
        }
    }

    /// How often a driver looks at its running lines: in process it costs nothing; in Redis
    /// each look is a call per line.
    pub fn tick(&self) -> Duration {
        match self {
            BatchStore::Memory(_) => Duration::from_millis(20),
            BatchStore::Redis { .. } => Duration::from_millis(100),
        }
    }

    /// Batches to drive: in process, those not final; in Redis, the active index.
    pub async fn active(&self) -> Result<Vec<String>, BatchError> {
        match self {
            BatchStore::Memory(m) => Ok(lock(m)
                .iter()
                .filter(|(_, b)| b.record.as_ref().is_some_and(|r| !r.is_final()))
                .map(|(id, _)| id.clone())
                .collect()),
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                link.within(
                    redis::cmd("ZRANGE")
                        .arg(Self::active_key(prefix))
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn),
                )
                .await
                .map_err(store_error)
            }
        }
    }

    /// Takes the lease on driving a batch for `ttl`; `false` when another node holds it. In
    /// process the driver's own bookkeeping is the lease.
    pub async fn lease(&self, id: &str, node: &str, ttl: Duration) -> Result<bool, BatchError> {
        match self {
            BatchStore::Memory(_) => Ok(true),
            BatchStore::Redis { link, prefix, .. } => {
                let mut conn = Self::conn(link).await?;
                let taken: Option<String> = link
                    .within(
                        redis::cmd("SET")
                            .arg(Self::key(prefix, id, "lease"))
                            .arg(node)
                            .arg("NX")
                            .arg("PX")
                            .arg(ttl.as_millis() as u64)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(store_error)?;
                Ok(taken.is_some())
            }
        }
    }

    /// Extends this node's lease; `false` when it was lost (another node drives the batch).
    pub async fn renew(&self, id: &str, node: &str, ttl: Duration) -> Result<bool, BatchError> {
        match self {
            BatchStore::Memory(_) => Ok(true),
            BatchStore::Redis {
                link,
                prefix,
                renew,
                ..
            } => {
                let mut conn = Self::conn(link).await?;
                let mut inv = renew.prepare_invoke();
                inv.key(Self::key(prefix, id, "lease"))
                    .arg(node)
                    .arg(ttl.as_millis() as u64);
                let held: i64 = link
                    .within(inv.invoke_async(&mut conn))
                    .await
                    .map_err(store_error)?;
                Ok(held == 1)
            }
        }
    }

    /// Gives a lease up (the batch is final, or this node is stopping).
    pub async fn release(&self, id: &str, node: &str) {
        if let BatchStore::Redis { link, prefix, .. } = self {
            if let Ok(mut conn) = Self::conn(link).await {
                let _ = link
                    .within(
                        redis::Script::new(
                            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 0",
                        )
                        .key(Self::key(prefix, id, "lease"))
                        .arg(node)
                        .invoke_async::<i64>(&mut conn),
                    )
                    .await;
            }
        }
    }
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

    fn record(id: &str, owner: &str) -> Record {
        Record {
            id: id.into(),
            owner: owner.into(),
            principal: json!({"key_id": "a"}),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-x".into(),
            completion_window: "24h".into(),
            metadata: None,
            status: "in_progress".into(),
            total: 2,
            created_at: 1,
            expires_at: 2,
            in_progress_at: Some(1),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            output_file_id: None,
            error_file_id: None,
            errors: None,
        }
    }

    #[tokio::test]
    async fn a_line_is_recorded_once_and_counted_once() {
        let store = BatchStore::memory();
        let id = super::super::batch::new_id("batch_");
        let day = Duration::from_secs(86_400);
        store
            .create(&record(&id, "key:a"), true, day)
            .await
            .unwrap();
        let ok = |line: &str| Outcome {
            ok: true,
            line: line.into(),
        };
        assert!(store.record(&id, 0, ok("first")).await.unwrap());
        assert!(!store.record(&id, 0, ok("again")).await.unwrap());
        assert!(store
            .record(
                &id,
                1,
                Outcome {
                    ok: false,
                    line: "bad".into()
                }
            )
            .await
            .unwrap());
        assert_eq!(store.counts(&id).await.unwrap(), (1, 1));
        assert_eq!(store.results(&id).await.unwrap()[&0].line, "first");
        assert_eq!(store.done(&id).await.unwrap().len(), 2);
        assert_eq!(store.active().await.unwrap(), vec![id.clone()]);
        let mut done = record(&id, "key:a");
        done.status = "completed".into();
        assert!(store.save(&done, "node", day).await.unwrap());
        assert!(store.active().await.unwrap().is_empty());
        // Final is final: a driver that lost its lease cannot undo it.
        done.status = "finalizing".into();
        assert!(!store.save(&done, "node", day).await.unwrap());
        assert_eq!(store.get(&id).await.unwrap().unwrap().status, "completed");
        store.sweep(day);
        assert_eq!(
            store.list("key:a").await.unwrap().len(),
            1,
            "kept for the retention"
        );
        store.sweep(Duration::ZERO);
        assert!(
            store.list("key:a").await.unwrap().is_empty(),
            "gone after it"
        );
    }

    #[test]
    fn a_batch_asked_to_stop_shows_cancelling_until_it_is_final() {
        let mut r = record("batch_x", "key:a");
        assert_eq!(r.openai((0, 0), Some(5))["status"], "cancelling");
        assert_eq!(r.openai((0, 0), Some(5))["cancelling_at"], 5);
        r.status = "cancelled".into();
        assert_eq!(r.openai((0, 0), Some(5))["status"], "cancelled");
        assert_eq!(
            r.openai((1, 2), None)["request_counts"],
            json!({"total": 2, "completed": 1, "failed": 2})
        );
    }
}
