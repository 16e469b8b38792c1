//! The Redis job backend, shared by every node of a fleet.
//!
//! Keys (one hash tag, so every script's keys share a cluster slot):
//! - `{prefix:jobs}:queue`: a stream with the consumer group `workers`; an entry per job
//!   waiting or running, acknowledged and deleted when the job ends;
//! - `{prefix:jobs}:job:<len>:<owner>:<id>`: the job (request, owner, status, result), kept
//!   `result_ttl` after it ends;
//! - `{prefix:jobs}:ev:<len>:<owner>:<id>`: a stream of the job's status changes and text
//!   deltas, for `/events` on any node;
//! - `{prefix:jobs}:depth` and `{prefix:jobs}:queued:<owner>`: waiting jobs, in all and per
//!   key (the queue and per-key caps).
//!
//! Every state change is one script, so two workers that both believe they run a job (one
//! was presumed dead) record one result: the first `finish` wins, the other is ignored.
//!
//! Over 600 lines on purpose: each Lua script sits next to the one method that runs it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lumen_plugins::auth::Principal;
use lumen_plugins::redis_link::{RedisConn, RedisLink};
use redis::Value as R;
use serde_json::{json, Value};

use super::job::{now_us, JobError, JobSettings, JobView, Status, SubmitError, Update};
use crate::openai::Endpoint;

/// Longest wait for one Redis call of the jobs API (a submit fails with 503 after it).
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// A queued or running job's keys live at least this long.
const OPEN_TTL_SECS: u64 = 7 * 86_400;
const GROUP: &str = "workers";

const SUBMIT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local mine = tonumber(redis.call('GET', KEYS[3]) or '0')
if mine >= tonumber(ARGV[1]) then return {-1, mine} end
local depth = tonumber(redis.call('GET', KEYS[4]) or '0')
if depth >= tonumber(ARGV[2]) then return {-2, depth} end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('INCR', KEYS[4])
local entry = redis.call('XADD', KEYS[2], '*', 'job', KEYS[1], 'ev', KEYS[5], 'owner', ARGV[4])
redis.call('HSET', KEYS[1], 'entry', entry)
redis.call('XADD', KEYS[5], '*', 't', 'status', 'v', 'queued')
redis.call('EXPIRE', KEYS[5], ARGV[3])
return {1}
";

/// KEYS: job, queue, queued-by-owner, depth, events. ARGV: entry, max attempts, now, ttl.
const CLAIM: &str = r"
local st = redis.call('HGET', KEYS[1], 'status')
local function done()
  redis.call('XACK', KEYS[2], 'workers', ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
end
if not st then done() return {0} end
if st == 'queued' then
  redis.call('DECR', KEYS[3])
  redis.call('DECR', KEYS[4])
end
if st == 'completed' or st == 'failed' or st == 'cancelled' then done() return {0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished', ARGV[3], 'error',
    cjson.encode({message = 'the job was started ' .. (attempts - 1) .. ' times and its worker stopped each time', type = 'api_error', code = 'worker_lost'}))
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('XADD', KEYS[5], '*', 't', 'status', 'v', 'failed')
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  done()
  return {0}
end
redis.call('HSET', KEYS[1], 'status', 'processing', 'started', ARGV[3])
redis.call('XADD', KEYS[5], '*', 't', 'status', 'v', 'processing')
local h = redis.call('HMGET', KEYS[1], 'endpoint', 'body', 'principal', 'created', 'trace')
return {1, h[1], h[2], h[3], h[4], h[5]}
";

/// KEYS: job, events. ARGV: text. Returns whether the job was asked to stop.
const DELTA: &str = r"
redis.call('XADD', KEYS[2], '*', 't', 'delta', 'v', ARGV[1])
return redis.call('HGET', KEYS[1], 'cancel') or ''
";

/// KEYS: job, queue, events. ARGV: entry, status, field (result|error), value, now, ttl.
const FINISH: &str = r"
local st = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if st ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4], 'finished', ARGV[5])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'cost', ARGV[7]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('XADD', KEYS[3], '*', 't', 'status', 'v', ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 1
";

/// KEYS: job, queued-by-owner, depth, events. ARGV: now, ttl, error.
const CANCEL: &str = r"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return -1 end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[1], 'error', ARGV[3])
  redis.call('DECR', KEYS[2])
  redis.call('DECR', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('XADD', KEYS[4], '*', 't', 'status', 'v', 'cancelled')
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  return 1
end
if st == 'processing' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 2
end
return 0
";

pub struct RedisJobs {
    link: Arc<RedisLink>,
    tag: String,
    submit: redis::Script,
    claim: redis::Script,
    delta: redis::Script,
    finish: redis::Script,
    cancel: redis::Script,
    queue_size: usize,
    max_per_key: usize,
    result_ttl_secs: u64,
    max_attempts: u32,
    visibility: Duration,
    group_ready: AtomicBool,
}

fn unavailable(e: impl std::fmt::Display) -> SubmitError {
    SubmitError::Unavailable(e.to_string())
}

/// A job a worker took: what it needs to run it and to report on it.
pub struct RedisClaim {
    job_key: String,
    ev_key: String,
    entry: String,
    /// The job's id (its owner's name for it).
    pub id: String,
    pub endpoint: Endpoint,
    pub body: Value,
    /// The submitting key, as recorded at submit.
    pub principal: Value,
    pub created_us: u64,
    /// The submitting request's `traceparent`, when it was traced.
    pub trace: Option<String>,
}

impl RedisJobs {
    pub fn new(link: Arc<RedisLink>, prefix: &str, s: &JobSettings) -> RedisJobs {
        RedisJobs {
            link,
            tag: format!("{{{prefix}:jobs}}"),
            submit: redis::Script::new(SUBMIT),
            claim: redis::Script::new(CLAIM),
            delta: redis::Script::new(DELTA),
            finish: redis::Script::new(FINISH),
            cancel: redis::Script::new(CANCEL),
            queue_size: s.queue_size,
            max_per_key: s.max_queued_per_key,
            result_ttl_secs: s.result_ttl.as_secs().max(1),
            max_attempts: s.max_attempts,
            visibility: s.visibility_timeout,
            group_ready: AtomicBool::new(false),
        }
    }

    fn keys(&self, owner: &str, id: &str) -> (String, String) {
        (
            format!("{}:job:{}:{owner}:{id}", self.tag, owner.len()),
            format!("{}:ev:{}:{owner}:{id}", self.tag, owner.len()),
        )
    }

    fn queue(&self) -> String {
        format!("{}:queue", self.tag)
    }

    fn depth_key(&self) -> String {
        format!("{}:depth", self.tag)
    }

    fn queued_key(&self, owner: &str) -> String {
        format!("{}:queued:{owner}", self.tag)
    }

    async fn conn(&self) -> Result<RedisConn, SubmitError> {
        self.link.connection("jobs").await.map_err(unavailable)
    }

    async fn timed<T>(
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SubmitError> {
        tokio::time::timeout(OP_TIMEOUT, call)
            .await
            .map_err(|_| unavailable(format!("no answer within {OP_TIMEOUT:?}")))?
            .map_err(unavailable)
    }

    pub async fn submit(
        &self,
        owner: &Arc<Principal>,
        endpoint: Endpoint,
        body: Value,
        id: String,
        trace: Option<String>,
    ) -> Result<(JobView, bool), SubmitError> {
        let mut conn = self.conn().await?;
        let (job_key, ev_key) = self.keys(&owner.key_id, &id);
        let principal = recorded(owner);
        let created = now_us();
        let mut inv = self.submit.prepare_invoke();
        inv.key(&job_key)
            .key(self.queue())
            .key(self.queued_key(&owner.key_id))
            .key(self.depth_key())
            .key(&ev_key)
            .arg(self.max_per_key)
            .arg(self.queue_size)
            .arg(OPEN_TTL_SECS)
            .arg(&owner.key_id);
        for (k, v) in [
            ("id", id.clone()),
            ("owner", owner.key_id.clone()),
            ("endpoint", endpoint.suffix().to_string()),
            ("body", body.to_string()),
            ("principal", principal.to_string()),
            ("created", created.to_string()),
            ("status", "queued".to_string()),
            ("attempts", "0".to_string()),
        ]
        .into_iter()
        .chain(trace.map(|t| ("trace", t)))
        {
            inv.arg(k).arg(v);
        }
        let reply: Vec<i64> = Self::timed(inv.invoke_async(&mut conn)).await?;
        match reply.first().copied() {
            Some(1) => Ok((JobView::queued(id, created), true)),
            Some(0) => match self.get(&owner.key_id, &id).await? {
                Some(view) => Ok((view, false)),
                None => Err(unavailable("the job vanished while being read")),
            },
            Some(-1) => Err(SubmitError::KeyFull(
                reply.get(1).copied().unwrap_or(0) as usize
            )),
            _ => Err(SubmitError::QueueFull(self.queue_size)),
        }
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<JobView>, SubmitError> {
        let mut conn = self.conn().await?;
        let (job_key, _) = self.keys(owner, id);
        let hash: std::collections::HashMap<String, String> =
            Self::timed(redis::cmd("HGETALL").arg(&job_key).query_async(&mut conn)).await?;
        Ok(view_of(&hash))
    }

    pub async fn cancel(&self, owner: &str, id: &str) -> Result<Option<JobView>, SubmitError> {
        let mut conn = self.conn().await?;
        let (job_key, ev_key) = self.keys(owner, id);
        let error = serde_json::to_string(&JobError::cancelled("cancelled before it started"))
            .unwrap_or_default();
        let mut inv = self.cancel.prepare_invoke();
        inv.key(&job_key)
            .key(self.queued_key(owner))
            .key(self.depth_key())
            .key(&ev_key)
            .arg(now_us())
            .arg(self.result_ttl_secs)
            .arg(error);
        let _: i64 = Self::timed(inv.invoke_async(&mut conn)).await?;
        self.get(owner, id).await
    }

    pub async fn subscribe(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<Option<(JobView, String, RedisSub)>, SubmitError> {
        let Some(mut view) = self.get(owner, id).await? else {
            return Ok(None);
        };
        let (job_key, ev_key) = self.keys(owner, id);
        let mut conn = self.conn().await?;
        let history: R = Self::timed(
            redis::cmd("XRANGE")
                .arg(&ev_key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn),
        )
        .await?;
        // The text and status as the event stream has them: nothing between this read and
        // the first blocking read can be lost or sent twice.
        let mut text = String::new();
        let mut last = "0-0".to_string();
        let mut status = view.status;
        for (entry, fields) in entries(&history) {
            last = entry;
            match (field(&fields, "t").as_deref(), field(&fields, "v")) {
                (Some("delta"), Some(v)) => text.push_str(&v),
                (Some("status"), Some(v)) => status = Status::parse(&v).unwrap_or(status),
                _ => {}
            }
        }
        if status != view.status {
            view = self.get(owner, id).await?.unwrap_or(view);
        }
        let dedicated = self.link.dedicated("jobs").await.map_err(unavailable)?;
        let sub = RedisSub {
            conn: dedicated,
            ev_key,
            _job_key: job_key,
            last,
            pending: VecDeque::new(),
            ended: view.status.is_final(),
        };
        Ok(Some((view, text, sub)))
    }

    /// Waiting jobs, fleet-wide.
    pub async fn depth(&self) -> Result<i64, SubmitError> {
        let mut conn = self.conn().await?;
        let depth: Option<i64> = Self::timed(
            redis::cmd("GET")
                .arg(self.depth_key())
                .query_async(&mut conn),
        )
        .await?;
        Ok(depth.unwrap_or(0).max(0))
    }

    async fn ensure_group(&self, conn: &mut RedisConn) -> redis::RedisResult<()> {
        if self.group_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.queue())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.group_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The next job for `consumer`: one a dead worker left (idle past the visibility
    /// timeout), else a new one (waiting up to a second). `Ok(None)`: none now.
    pub async fn take(
        &self,
        conn: &mut RedisConn,
        consumer: &str,
    ) -> redis::RedisResult<Option<RedisClaim>> {
        let taken = self.try_take(conn, consumer).await;
        if taken.is_err() {
            // A Redis that restarted empty has lost the consumer group too: make it again.
            self.group_ready.store(false, Ordering::Relaxed);
        }
        taken
    }

    async fn try_take(
        &self,
        conn: &mut RedisConn,
        consumer: &str,
    ) -> redis::RedisResult<Option<RedisClaim>> {
        self.ensure_group(conn).await?;
        let reclaimed: R = redis::cmd("XAUTOCLAIM")
            .arg(self.queue())
            .arg(GROUP)
            .arg(consumer)
            .arg(self.visibility.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let mut found = match &reclaimed {
            R::Array(parts) if parts.len() >= 2 => entries(&parts[1]),
            _ => Vec::new(),
        };
        if found.is_empty() {
            let read: R = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(self.queue())
                .arg(">")
                .query_async(conn)
                .await?;
            found = stream_entries(&read);
        }
        let Some((entry, fields)) = found.into_iter().next() else {
            return Ok(None);
        };
        let (Some(job_key), Some(ev_key), Some(owner)) = (
            field(&fields, "job"),
            field(&fields, "ev"),
            field(&fields, "owner"),
        ) else {
            return Ok(None);
        };
        let mut inv = self.claim.prepare_invoke();
        inv.key(&job_key)
            .key(self.queue())
            .key(self.queued_key(&owner))
            .key(self.depth_key())
            .key(&ev_key)
            .arg(&entry)
            .arg(self.max_attempts)
            .arg(now_us())
            .arg(self.result_ttl_secs);
        let reply: Vec<R> = inv.invoke_async(conn).await?;
        if reply.first().map(int) != Some(1) || reply.len() < 5 {
            return Ok(None);
        }
        let text = |i: usize| string(&reply[i]).unwrap_or_default();
        let endpoint =
            Endpoint::from_path(&format!("/v1{}", text(1))).unwrap_or(Endpoint::ChatCompletions);
        let id = job_key
            .strip_prefix(&format!("{}:job:{}:{owner}:", self.tag, owner.len()))
            .unwrap_or_default()
            .to_string();
        Ok(Some(RedisClaim {
            id,
            job_key,
            ev_key,
            entry,
            endpoint,
            body: serde_json::from_str(&text(2)).unwrap_or(Value::Null),
            principal: serde_json::from_str(&text(3)).unwrap_or(Value::Null),
            created_us: text(4).parse().unwrap_or(0),
            trace: reply.get(5).and_then(string).filter(|t| !t.is_empty()),
        }))
    }

    /// Records text generated; `true` when the job was asked to stop.
    pub async fn delta(&self, claim: &RedisClaim, text: &str) -> bool {
        let Ok(mut conn) = self.conn().await else {
            return false;
        };
        let mut inv = self.delta.prepare_invoke();
        inv.key(&claim.job_key).key(&claim.ev_key).arg(text);
        let cancel: redis::RedisResult<String> =
            tokio::time::timeout(OP_TIMEOUT, inv.invoke_async(&mut conn))
                .await
                .unwrap_or(Ok(String::new()));
        cancel.is_ok_and(|c| c == "1")
    }

    /// Keeps the job ours (resets its idle time); `true` when it was asked to stop.
    pub async fn heartbeat(&self, claim: &RedisClaim, consumer: &str) -> bool {
        let Ok(mut conn) = self.conn().await else {
            return false;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XCLAIM")
            .arg(self.queue())
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(&claim.entry)
            .arg("JUSTID")
            .ignore()
            .cmd("HGET")
            .arg(&claim.job_key)
            .arg("cancel");
        let reply: redis::RedisResult<(Option<String>,)> =
            tokio::time::timeout(OP_TIMEOUT, pipe.query_async(&mut conn))
                .await
                .unwrap_or(Ok((None,)));
        reply.is_ok_and(|(c,)| c.as_deref() == Some("1"))
    }

    /// Records the outcome; `false` when another worker had already recorded one.
    pub async fn finish(
        &self,
        claim: &RedisClaim,
        status: Status,
        outcome: &Result<Value, JobError>,
        cost_micros: Option<u64>,
    ) -> Result<bool, SubmitError> {
        let mut conn = self.conn().await?;
        let (field, value) = match outcome {
            Ok(result) => ("result", result.to_string()),
            Err(e) => ("error", serde_json::to_string(e).unwrap_or_default()),
        };
        let mut inv = self.finish.prepare_invoke();
        inv.key(&claim.job_key)
            .key(self.queue())
            .key(&claim.ev_key)
            .arg(&claim.entry)
            .arg(status.label())
            .arg(field)
            .arg(value)
            .arg(now_us())
            .arg(self.result_ttl_secs)
            .arg(cost_micros.map_or(String::new(), |c| c.to_string()));
        let recorded: i64 = Self::timed(inv.invoke_async(&mut conn)).await?;
        Ok(recorded == 1)
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    pub fn visibility(&self) -> Duration {
        self.visibility
    }
}

fn view_of(hash: &std::collections::HashMap<String, String>) -> Option<JobView> {
    let num = |k: &str| hash.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(JobView {
        id: hash.get("id")?.clone(),
        status: Status::parse(hash.get("status")?)?,
        created_us: num("created").unwrap_or(0),
        started_us: num("started"),
        finished_us: num("finished"),
        result: hash
            .get("result")
            .and_then(|r| serde_json::from_str(r).ok()),
        error: hash.get("error").and_then(|e| serde_json::from_str(e).ok()),
        cost_micros: num("cost"),
    })
}

/// A watcher of one job, reading its event stream on a connection of its own.
pub struct RedisSub {
    conn: RedisConn,
    ev_key: String,
    _job_key: String,
    last: String,
    pending: VecDeque<Update>,
    ended: bool,
}

impl RedisSub {
    pub async fn next(&mut self, idle: Duration) -> Option<Option<Update>> {
        loop {
            if let Some(update) = self.pending.pop_front() {
                if let Update::Status(s) = &update {
                    self.ended = s.is_final();
                }
                return Some(Some(update));
            }
            if self.ended {
                return None;
            }
            let read: redis::RedisResult<R> = tokio::time::timeout(
                idle + OP_TIMEOUT,
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(256)
                    .arg("BLOCK")
                    .arg(idle.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&self.ev_key)
                    .arg(&self.last)
                    .query_async(&mut self.conn),
            )
            .await
            .unwrap_or(Ok(R::Nil));
            let Ok(read) = read else {
                // Redis went away: the watcher ends; the client may reconnect.
                return None;
            };
            let found = stream_entries(&read);
            if found.is_empty() {
                return Some(None);
            }
            for (entry, fields) in found {
                self.last = entry;
                match (field(&fields, "t").as_deref(), field(&fields, "v")) {
                    (Some("delta"), Some(v)) => self.pending.push_back(Update::Delta(v)),
                    (Some("status"), Some(v)) => {
                        if let Some(s) = Status::parse(&v) {
                            self.pending.push_back(Update::Status(s));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A submitter as a job records it: a configured key by its id (looked up again when the job
/// runs), a token caller with its tenant and models. [`principal_of`] reads it back.
pub fn recorded(principal: &Principal) -> Value {
    json!({
        "key_id": principal.key_id,
        "tenant": principal.tenant,
        "models": principal.models(),
        "configured": principal.configured,
    })
}

/// The principal a claimed job runs as: the configured key as it is now (its current limits;
/// gone or disabled: the job fails), or the token's recorded identity for JWT callers.
pub fn principal_of(
    recorded: &Value,
    auth: &lumen_plugins::auth::Authenticator,
) -> Result<Arc<Principal>, JobError> {
    let key_id = recorded["key_id"].as_str().unwrap_or("");
    if recorded["configured"] == Value::Bool(true) {
        return auth
            .principal_by_id(key_id, std::time::SystemTime::now())
            .ok_or_else(|| JobError {
                message: format!("the key `{key_id}` that submitted this job is no longer usable"),
                kind: "invalid_request_error".into(),
                code: Some("invalid_api_key".into()),
                status: None,
            });
    }
    let models = recorded["models"].as_array().map(|m| {
        m.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect::<Vec<_>>()
    });
    Ok(Arc::new(Principal::new(
        key_id,
        recorded["tenant"].as_str().map(str::to_string),
        models,
    )))
}

fn int(v: &R) -> i64 {
    match v {
        R::Int(i) => *i,
        other => string(other).and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

fn string(v: &R) -> Option<String> {
    match v {
        R::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        R::SimpleString(s) => Some(s.clone()),
        R::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `[[id, [k, v, …]], …]` → (id, fields).
fn entries(v: &R) -> Vec<(String, Vec<(String, String)>)> {
    let R::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let R::Array(pair) = item else { return None };
            let id = string(pair.first()?)?;
            let R::Array(kv) = pair.get(1)? else {
                return None;
            };
            let fields = kv
                .chunks(2)
                .filter_map(|c| Some((string(c.first()?)?, string(c.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// `XREAD`/`XREADGROUP`'s `[[stream, entries]]` (or a RESP3 map) → the one stream's entries.
fn stream_entries(v: &R) -> Vec<(String, Vec<(String, String)>)> {
    match v {
        R::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                R::Array(pair) if pair.len() == 2 => entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        R::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}
