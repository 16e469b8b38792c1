//! Files of the Batch API: uploaded inputs and the outputs batches write.
//!
//! On disk (no `redis:`): `<state_dir>/files/<id>.jsonl` and its metadata `<id>.json`, written
//! to a temporary name and renamed, so a crash never leaves half a file under a real name.
//! In Redis: `{prefix:file:<id>}:meta` (the metadata as JSON) and `{prefix:file:<id>}:data`
//! (a list of 1 MiB chunks: no single value grows with the file), both expiring after
//! `batches.retention`, and `{prefix:files}:own:<len>:<owner>`, the owner's files by time.
//! A file's size is bounded by `batches.max_file_bytes` (default 100 MB); in Redis that much
//! memory per file, so size `maxmemory` for the files kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lumen_plugins::redis_link::{RedisConn, RedisLink};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::batch::{now_secs, BatchError};

/// Redis values of a file's content are at most this long.
const CHUNK: usize = 1 << 20;
/// Longest a Redis call on a file may take (a 100 MB file is a hundred chunks).
const REDIS_FILE_TIMEOUT: Duration = Duration::from_secs(30);

/// What is known of a file besides its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: String,
    /// `key:<id>` or `tenant:<name>` (`BatchSettings::owner`).
    pub owner: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    /// `batch` (uploaded), `batch_output` (written by a batch).
    pub purpose: String,
    pub expires_at: Option<u64>,
}

impl FileMeta {
    /// OpenAI's file object.
    pub fn openai(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }

    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

pub enum FileStore {
    Disk(PathBuf),
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
    },
}

fn store_error(e: impl std::fmt::Display) -> BatchError {
    BatchError::Store(e.to_string())
}

impl FileStore {
    pub fn disk(dir: PathBuf) -> FileStore {
        FileStore::Disk(dir)
    }

    pub fn redis(link: Arc<RedisLink>, prefix: &str) -> FileStore {
        FileStore::Redis {
            link,
            prefix: prefix.to_string(),
        }
    }

    fn keys(prefix: &str, id: &str) -> (String, String) {
        (
            format!("{{{prefix}:file:{id}}}:meta"),
            format!("{{{prefix}:file:{id}}}:data"),
        )
    }

    fn owned_key(prefix: &str, owner: &str) -> String {
        format!("{{{prefix}:files}}:own:{}:{owner}", owner.len())
    }

    async fn redis_conn(link: &RedisLink) -> Result<RedisConn, BatchError> {
        link.connection("files").await.map_err(store_error)
    }

    /// Stores a file (replacing one of the same id: a batch's output written again after a
    /// takeover is the same file).
    pub async fn put(&self, meta: &FileMeta, data: &Bytes) -> Result<(), BatchError> {
        let meta_json = serde_json::to_vec(meta).map_err(store_error)?;
        match self {
            FileStore::Disk(dir) => {
                tokio::fs::create_dir_all(dir).await.map_err(store_error)?;
                let (meta_path, data_path) = disk_paths(dir, &meta.id);
                // Data first: a file's metadata never names bytes not yet there.
                for (path, bytes) in [(data_path, &data[..]), (meta_path, &meta_json[..])] {
                    let tmp = path.with_extension("tmp");
                    tokio::fs::write(&tmp, bytes).await.map_err(store_error)?;
                    tokio::fs::rename(&tmp, &path).await.map_err(store_error)?;
                }
                Ok(())
            }
            FileStore::Redis { link, prefix } => {
                let (meta_key, data_key) = Self::keys(prefix, &meta.id);
                let ttl = meta
                    .expires_at
                    .map_or(0, |at| at.saturating_sub(now_secs()).max(1));
                let mut pipe = redis::pipe();
                pipe.atomic().del(&data_key).ignore();
                for chunk in data.chunks(CHUNK) {
                    pipe.rpush(&data_key, chunk).ignore();
                }
                pipe.set(&meta_key, meta_json).ignore();
                if ttl > 0 {
                    pipe.expire(&data_key, ttl as i64).ignore();
                    pipe.expire(&meta_key, ttl as i64).ignore();
                }
                // A connection of its own: a big file must not wait behind, nor hold up, the
                // node's shared connection (and its short response timeout).
                let mut conn = link.dedicated("files").await.map_err(store_error)?;
                tokio::time::timeout(REDIS_FILE_TIMEOUT, pipe.query_async::<()>(&mut conn))
                    .await
                    .map_err(|_| store_error("no answer in time"))?
                    .map_err(store_error)?;
                // The owner's index has a hash tag of its own (one slot per call, as a
                // cluster wants): listed once the file is whole.
                link.within(
                    redis::cmd("ZADD")
                        .arg(Self::owned_key(prefix, &meta.owner))
                        .arg(meta.created_at)
                        .arg(&meta.id)
                        .query_async::<()>(&mut conn),
                )
                .await
                .map_err(store_error)
            }
        }
    }

    /// A file's metadata, if it exists, has not expired and is `owner`'s.
    pub async fn meta(&self, owner: &str, id: &str) -> Result<Option<FileMeta>, BatchError> {
        if !super::batch::well_formed(id, "file-") {
            return Ok(None);
        }
        let raw = match self {
            FileStore::Disk(dir) => match tokio::fs::read(disk_paths(dir, id).0).await {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(store_error(e)),
            },
            FileStore::Redis { link, prefix } => {
                let mut conn = Self::redis_conn(link).await?;
                let key = Self::keys(prefix, id).0;
                link.within(
                    redis::cmd("GET")
                        .arg(&key)
                        .query_async::<Option<Vec<u8>>>(&mut conn),
                )
                .await
                .map_err(store_error)?
            }
        };
        Ok(raw
            .and_then(|raw| serde_json::from_slice::<FileMeta>(&raw).ok())
            .filter(|m| m.owner == owner && !m.expired(now_secs())))
    }

    /// A file's bytes, if it is `owner`'s.
    pub async fn content(&self, owner: &str, id: &str) -> Result<Option<Bytes>, BatchError> {
        if self.meta(owner, id).await?.is_none() {
            return Ok(None);
        }
        match self {
            FileStore::Disk(dir) => match tokio::fs::read(disk_paths(dir, id).1).await {
                Ok(bytes) => Ok(Some(Bytes::from(bytes))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(store_error(e)),
            },
            FileStore::Redis { link, prefix } => {
                let mut conn = link.dedicated("files").await.map_err(store_error)?;
                let key = Self::keys(prefix, id).1;
                let chunks: Vec<Vec<u8>> = tokio::time::timeout(
                    REDIS_FILE_TIMEOUT,
                    redis::cmd("LRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| store_error("no answer in time"))?
                .map_err(store_error)?;
                Ok(Some(Bytes::from(chunks.concat())))
            }
        }
    }

    /// `owner`'s files, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<FileMeta>, BatchError> {
        let now = now_secs();
        let mut files = match self {
            FileStore::Disk(dir) => {
                let mut files = Vec::new();
                let mut entries = match tokio::fs::read_dir(dir).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
                    Err(e) => return Err(store_error(e)),
                };
                while let Some(entry) = entries.next_entry().await.map_err(store_error)? {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "json") {
                        if let Ok(raw) = tokio::fs::read(&path).await {
                            if let Ok(meta) = serde_json::from_slice::<FileMeta>(&raw) {
                                if meta.owner == owner {
                                    files.push(meta);
                                }
                            }
                        }
                    }
                }
                files
            }
            FileStore::Redis { link, prefix } => {
                let owned = Self::owned_key(prefix, owner);
                super::batch::read_index(link, &owned, |id| async move {
                    let mut conn = Self::redis_conn(link).await?;
                    let raw: Option<Vec<u8>> = link
                        .within(
                            redis::cmd("GET")
                                .arg(Self::keys(prefix, &id).0)
                                .query_async(&mut conn),
                        )
                        .await
                        .map_err(store_error)?;
                    Ok(raw.and_then(|r| serde_json::from_slice::<FileMeta>(&r).ok()))
                })
                .await?
            }
        };
        files.retain(|m| !m.expired(now));
        files.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(files)
    }

    /// Deletes the files on disk whose time has passed (in Redis they expire by themselves).
    pub async fn sweep(&self) {
        let FileStore::Disk(dir) = self else { return };
        let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
            return;
        };
        let now = now_secs();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(raw) = tokio::fs::read(&path).await else {
                continue;
            };
            if let Ok(meta) = serde_json::from_slice::<FileMeta>(&raw) {
                if meta.expired(now) {
                    let (meta_path, data_path) = disk_paths(dir, &meta.id);
                    let _ = tokio::fs::remove_file(data_path).await;
                    let _ = tokio::fs::remove_file(meta_path).await;
                }
            }
        }
    }

    /// Deletes `owner`'s file; `false` when there was none.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<bool, BatchError> {
        let Some(meta) = self.meta(owner, id).await? else {
            return Ok(false);
        };
        match self {
            FileStore::Disk(dir) => {
                let (meta_path, data_path) = disk_paths(dir, &meta.id);
                for path in [meta_path, data_path] {
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(store_error(e)),
                    }
                }
                Ok(true)
            }
            FileStore::Redis { link, prefix } => {
                let (meta_key, data_key) = Self::keys(prefix, &meta.id);
                let mut conn = Self::redis_conn(link).await?;
                // (Not atomic, nor need it be: an index entry whose file is gone is dropped
                // when the list is read.)
                // Two calls: the file's keys share its slot, the owner's index lives in
                // another (a Cluster refuses a pipeline across slots).
                let mut del = redis::cmd("DEL");
                del.arg(&meta_key).arg(&data_key);
                link.within(del.query_async::<()>(&mut conn))
                    .await
                    .map_err(store_error)?;
                let mut unlist = redis::cmd("ZREM");
                unlist.arg(Self::owned_key(prefix, owner)).arg(&meta.id);
                link.within(unlist.query_async::<()>(&mut conn))
                    .await
                    .map_err(store_error)?;
                Ok(true)
            }
        }
    }
}

fn disk_paths(dir: &std::path::Path, id: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{id}.json")),
        dir.join(format!("{id}.jsonl")),
    )
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

    fn meta(id: &str, owner: &str, created_at: u64) -> FileMeta {
        FileMeta {
            id: id.into(),
            owner: owner.into(),
            bytes: 3,
            created_at,
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn a_file_on_disk_is_its_owners_only_and_gone_when_deleted() {
        let dir = std::env::temp_dir().join(super::super::batch::new_id("lumen-files-test-"));
        let store = FileStore::disk(dir.join("files"));
        let (a, b) = (
            super::super::batch::new_id("file-"),
            super::super::batch::new_id("file-"),
        );
        store
            .put(&meta(&a, "key:a", 1), &Bytes::from("abc"))
            .await
            .unwrap();
        store
            .put(&meta(&b, "key:a", 2), &Bytes::from("xyz"))
            .await
            .unwrap();
        assert_eq!(store.content("key:a", &a).await.unwrap().unwrap(), "abc");
        assert!(store.content("key:b", &a).await.unwrap().is_none());
        assert!(store.meta("key:a", "file-../x").await.unwrap().is_none());
        let listed: Vec<String> = store
            .list("key:a")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(listed, vec![b.clone(), a.clone()]);
        assert!(store.list("key:b").await.unwrap().is_empty());
        assert!(!store.delete("key:b", &a).await.unwrap());
        assert!(store.delete("key:a", &a).await.unwrap());
        assert!(store.meta("key:a", &a).await.unwrap().is_none());
        let mut old = meta(&a, "key:a", 1);
        old.expires_at = Some(1);
        store.put(&old, &Bytes::from("abc")).await.unwrap();
        assert!(store.meta("key:a", &a).await.unwrap().is_none(), "expired");
        store.sweep().await;
        assert!(
            !dir.join("files").join(format!("{a}.jsonl")).exists(),
            "swept"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
