//! Where the ledger's counts go: a JSON file under the state directory, or Redis hashes (one
//! per day) shared by the fleet. Both only ever add: a flush is "add this batch".

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::day::Day;
use super::row::{Batch, Counts, RowKey};
use lumen_plugins::redis_link::RedisLink;

const FILE: &str = "usage.json";
const SPOOL: &str = "usage-spool.json";
const LOCK: &str = "usage.lock";
/// A flush may carry many rows: a longer budget than a request-path Redis call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Separates key, provider, model and counter in a Redis hash field (none of them contains it:
/// it is a control character).
const SEP: char = '\u{1f}';

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("usage state directory {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
    #[error("usage file {path} is not a usage ledger: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("redis: {0}")]
    Redis(String),
}

pub enum Store {
    Off,
    File {
        dir: PathBuf,
    },
    Redis {
        link: Arc<RedisLink>,
        /// `{prefix:usage}`: one hash tag, so a batch's keys share a cluster slot.
        tag: String,
        spool_dir: PathBuf,
        script: redis::Script,
    },
}

/// The file's layout: a flat list of rows, readable with `jq`.
#[derive(Serialize, Deserialize)]
struct FileRows {
    version: u32,
    rows: Vec<FileRow>,
}

#[derive(Serialize, Deserialize)]
struct FileRow {
    day: String,
    key: String,
    /// Absent in files written before tenants were counted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    tenant: String,
    provider: String,
    model: String,
    #[serde(flatten)]
    counts: Counts,
}

/// Adds a batch once: `KEYS[1]` marks the batch as applied (a retry after a lost reply is a
/// no-op), `KEYS[2..]` are the day hashes; `ARGV` is the TTL, then (key index, field, delta)
/// triples.
const ADD_BATCH: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then return 0 end
local ttl = tonumber(ARGV[1])
local i = 2
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
return 1
";

impl Store {
    pub fn file(dir: &Path) -> Store {
        Store::File {
            dir: dir.to_path_buf(),
        }
    }

    pub fn redis(link: Arc<RedisLink>, prefix: &str, dir: &Path) -> Store {
        Store::Redis {
            link,
            tag: format!("{{{prefix}:usage}}"),
            spool_dir: dir.to_path_buf(),
            script: redis::Script::new(ADD_BATCH),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Store::Off => "off",
            Store::File { .. } => "file",
            Store::Redis { .. } => "redis",
        }
    }

    fn dir(&self) -> Option<&Path> {
        match self {
            Store::Off => None,
            Store::File { dir } => Some(dir),
            Store::Redis { spool_dir, .. } => Some(spool_dir),
        }
    }

    /// Whether the state directory can be written (file mode needs it for every flush).
    pub fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::File { dir } => {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                open_lock(dir).map(drop)
            }
            _ => Ok(()),
        }
    }

    /// Adds `batch` (identified by `id`, so a retried batch counts once in Redis).
    pub async fn add(&self, id: u64, batch: &Batch, retention_days: u32) -> Result<(), StoreError> {
        match self {
            Store::Off => Ok(()),
            Store::File { dir } => {
                let dir = dir.clone();
                let batch = batch.clone();
                blocking(move || add_to_file(&dir, FILE, batch, Some(retention_days))).await
            }
            Store::Redis {
                link, tag, script, ..
            } => {
                let mut days: Vec<Day> = batch.keys().map(|k| k.day).collect();
                days.sort();
                days.dedup();
                let mut invocation = script.prepare_invoke();
                invocation.key(format!("{tag}:batch:{id:016x}"));
                for day in &days {
                    invocation.key(format!("{tag}:{day}"));
                }
                invocation.arg(u64::from(retention_days) * 86_400 + 86_400);
                for (row, counts) in batch {
                    let index = days.binary_search(&row.day).unwrap_or(0) + 2;
                    for (field, value) in counts.fields() {
                        if value > 0 {
                            invocation
                                .arg(index)
                                .arg(redis_field(row, field))
                                .arg(value);
                        }
                    }
                }
                let mut conn = link
                    .connection("ledger")
                    .await
                    .map_err(|e| StoreError::Redis(e.to_string()))?;
                let _: i64 =
                    tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
                        .await
                        .map_err(|_| {
                            StoreError::Redis(format!("no answer within {REDIS_TIMEOUT:?}"))
                        })?
                        .map_err(|e| StoreError::Redis(e.to_string()))?;
                Ok(())
            }
        }
    }

    /// Everything stored for days `from..=to`.
    pub async fn read(&self, from: Day, to: Day) -> Result<Batch, StoreError> {
        match self {
            Store::Off => Ok(Batch::new()),
            Store::File { dir } => {
                let path = dir.join(FILE);
                let mut rows = blocking(move || read_file(&path)).await?;
                rows.retain(|k, _| k.day >= from && k.day <= to);
                Ok(rows)
            }
            Store::Redis { link, tag, .. } => {
                let mut pipe = redis::pipe();
                let mut day = from;
                while day <= to {
                    pipe.hgetall(format!("{tag}:{day}"));
                    day = Day(day.0 + 1);
                }
                let mut conn = link
                    .connection("ledger")
                    .await
                    .map_err(|e| StoreError::Redis(e.to_string()))?;
                let hashes: Vec<HashMap<String, u64>> =
                    tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn))
                        .await
                        .map_err(|_| {
                            StoreError::Redis(format!("no answer within {REDIS_TIMEOUT:?}"))
                        })?
                        .map_err(|e| StoreError::Redis(e.to_string()))?;
                let mut rows = Batch::new();
                for (i, hash) in hashes.into_iter().enumerate() {
                    let day = Day(from.0 + i as i64);
                    for (field, value) in hash {
                        // key, provider, model, counter[, tenant] (fields written before
                        // tenants were counted have none).
                        let mut parts = field.split(SEP);
                        let (Some(key), Some(provider), Some(model), Some(counter)) =
                            (parts.next(), parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        let tenant = parts.next().unwrap_or("");
                        let row = RowKey {
                            day,
                            key: key.into(),
                            tenant: tenant.into(),
                            provider: provider.into(),
                            model: model.into(),
                        };
                        rows.entry(row).or_default().set(counter, value);
                    }
                }
                Ok(rows)
            }
        }
    }

    /// Saves a batch the store would not take, to be added at the next start.
    pub fn spool(&self, batch: &Batch) -> Result<(), StoreError> {
        match self.dir() {
            None => Ok(()),
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                add_to_file(dir, SPOOL, batch.clone(), None)
            }
        }
    }

    /// A spool left by an earlier run, removed from disk.
    pub fn take_spool(&self) -> Result<Option<Batch>, StoreError> {
        let Some(dir) = self.dir() else {
            return Ok(None);
        };
        let path = dir.join(SPOOL);
        if !path.exists() {
            return Ok(None);
        }
        let _lock = open_lock(dir)?;
        let rows = read_file(&path)?;
        std::fs::remove_file(&path).map_err(|e| io(dir, e))?;
        Ok(Some(rows))
    }
}

fn io(dir: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

fn sanitize(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains(SEP) {
        part.replace(SEP, "_").into()
    } else {
        part.into()
    }
}

fn redis_field(row: &RowKey, counter: &str) -> String {
    let mut field = format!(
        "{}{SEP}{}{SEP}{}{SEP}{counter}",
        sanitize(&row.key),
        sanitize(&row.provider),
        sanitize(&row.model)
    );
    if !row.tenant.is_empty() {
        field.push(SEP);
        field.push_str(&sanitize(&row.tenant));
    }
    field
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(StoreError::Redis(format!("flush task failed: {e}"))))
}

/// An exclusive advisory lock on the state directory, held while the guard lives: two
/// processes sharing it (an upgrade's old and new) take turns.
struct DirLock(std::fs::File);

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is owned by self.0 and still open.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn open_lock(dir: &Path) -> Result<DirLock, StoreError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .map_err(|e| io(dir, e))?;
    // SAFETY: a valid open descriptor; flock blocks until the other holder releases it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(dir, std::io::Error::last_os_error()));
    }
    Ok(DirLock(file))
}

fn read_file(path: &Path) -> Result<Batch, StoreError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Batch::new()),
        Err(e) => return Err(io(path.parent().unwrap_or(path), e)),
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    let file: FileRows = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    let mut rows = Batch::with_capacity(file.rows.len());
    for r in file.rows {
        let day = Day::parse(&r.day).ok_or_else(|| corrupt(format!("bad day `{}`", r.day)))?;
        let key = RowKey {
            day,
            key: r.key.into(),
            tenant: r.tenant.into(),
            provider: r.provider.into(),
            model: r.model.into(),
        };
        rows.entry(key).or_default().add(&r.counts);
    }
    Ok(rows)
}

/// Most rows one day may hold in the usage file. Clients choose model names (pass-through
/// routes): past this, new (key, provider, model) rows of that day are counted under one
/// `_other` row, so the file cannot grow without bound however many names are sent.
const MAX_FILE_ROWS_PER_DAY: usize = 100_000;

/// Adds `batch` to `rows`; a row new to a day that already holds `cap` rows goes to `_other`.
fn merge_capped(rows: &mut Batch, batch: Batch, cap: usize) {
    let mut per_day: HashMap<Day, usize> = HashMap::new();
    for k in rows.keys() {
        let n = per_day.entry(k.day).or_default();
        *n = n.saturating_add(1);
    }
    for (k, v) in batch {
        let k = if rows.contains_key(&k) {
            k
        } else {
            let n = per_day.entry(k.day).or_default();
            if *n >= cap {
                RowKey::other(k.day)
            } else {
                *n = n.saturating_add(1);
                k
            }
        };
        rows.entry(k).or_default().add(&v);
    }
}

/// Reads `name`, adds `batch`, drops days past retention, and replaces the file atomically
/// (write a temporary file, fsync, rename), all under the directory lock.
fn add_to_file(
    dir: &Path,
    name: &str,
    batch: Batch,
    retention_days: Option<u32>,
) -> Result<(), StoreError> {
    let _lock = open_lock(dir)?;
    let path = dir.join(name);
    let mut rows = read_file(&path)?;
    merge_capped(&mut rows, batch, MAX_FILE_ROWS_PER_DAY);
    if let Some(days) = retention_days {
        let oldest = Day::today().minus(i64::from(days) - 1);
        rows.retain(|k, _| k.day >= oldest);
    }
    let mut sorted: Vec<(RowKey, Counts)> = rows.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let file = FileRows {
        version: 1,
        rows: sorted
            .into_iter()
            .map(|(k, counts)| FileRow {
                day: k.day.to_string(),
                key: k.key.into(),
                tenant: k.tenant.into(),
                provider: k.provider.into(),
                model: k.model.into(),
                counts,
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(dir, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str) -> RowKey {
        RowKey {
            day: Day::today(),
            key: "k".into(),
            tenant: "".into(),
            provider: "p".into(),
            model: model.into(),
        }
    }

    fn one() -> Counts {
        Counts {
            requests: 1,
            ..Counts::default()
        }
    }

    #[test]
    fn client_chosen_model_names_cannot_grow_a_day_past_its_cap() {
        let mut rows = Batch::new();
        rows.insert(row("a"), one());
        let mut batch = Batch::new();
        for model in ["a", "b", "c", "d"] {
            batch.insert(row(model), one());
        }
        merge_capped(&mut rows, batch, 2);
        assert_eq!(rows.len(), 3, "a, b, and _other: {rows:?}");
        assert_eq!(rows[&row("a")].requests, 2, "known rows keep counting");
        let other = RowKey::other(Day::today());
        assert_eq!(rows[&other].requests, 2, "c and d");
        assert_eq!(
            rows.values().map(|c| c.requests).sum::<u64>(),
            5,
            "nothing lost"
        );
    }
}
