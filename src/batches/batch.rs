//! What a batch is, for every part of the Batch API: the validated `batches:` settings, the
//! errors of its calls, ids, and time. A leaf: the stores, the driver and the HTTP shapes all
//! read it; it imports nothing of its parent.

use std::time::{Duration, SystemTime};

use lumen_plugins::auth::Principal;

use crate::config::problem::Problem;
use crate::config::raw::{BatchScope, RawBatches};
use crate::jobs::JobSettings;

/// The validated `batches:` section.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_file_bytes: usize,
    pub max_requests: usize,
    pub concurrency: usize,
    pub capacity_share: f64,
    pub scope: BatchScope,
    pub retention: Duration,
}

impl BatchSettings {
    pub fn build(raw: &RawBatches, jobs: &JobSettings, problems: &mut Vec<Problem>) -> Self {
        if raw.concurrency == 0 {
            problems.push(Problem::at("batches.concurrency", "must be at least 1"));
        }
        if raw.concurrency > jobs.max_queued_per_key {
            problems.push(Problem::at(
                "batches.concurrency",
                format!(
                    "must not exceed jobs.max_queued_per_key ({}): a batch's lines are that key's jobs",
                    jobs.max_queued_per_key
                ),
            ));
        }
        if !(raw.capacity_share > 0.0 && raw.capacity_share <= 1.0) {
            problems.push(Problem::at(
                "batches.capacity_share",
                "must be above 0 and at most 1",
            ));
        }
        if raw.max_requests == 0 {
            problems.push(Problem::at("batches.max_requests", "must be at least 1"));
        }
        // A batch runs for up to its 24 h window after its input was uploaded, and the input
        // must outlive it: a day at least.
        if raw.retention < Duration::from_secs(86_400) {
            problems.push(Problem::at("batches.retention", "must be at least 1d"));
        }
        BatchSettings {
            max_file_bytes: raw.max_file_bytes.0,
            max_requests: raw.max_requests.max(1),
            concurrency: raw.concurrency.max(1),
            capacity_share: raw.capacity_share.clamp(f64::MIN_POSITIVE, 1.0),
            scope: raw.scope,
            retention: raw.retention,
        }
    }

    /// Who owns what `principal` makes, and may see it: `key:<id>`, or `tenant:<name>` when
    /// files are shared by a tenant's keys (a key without a tenant keeps its own). The two
    /// namespaces never meet.
    pub fn owner(&self, principal: &Principal) -> String {
        match (&self.scope, &principal.tenant) {
            (BatchScope::Tenant, Some(tenant)) => format!("tenant:{tenant}"),
            _ => format!("key:{}", principal.key_id),
        }
    }
}

/// Why a files or batches call could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("No such {0} object: {1}")]
    NotFound(&'static str, String),
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    #[error(
        "the file is larger than the {limit} bytes this gateway takes (batches.max_file_bytes)"
    )]
    FileTooLarge { limit: usize },
    #[error("{0}")]
    Conflict(String),
    #[error("the batch store is unavailable: {0}")]
    Store(String),
}

impl BatchError {
    pub fn invalid(message: impl Into<String>, param: &'static str) -> BatchError {
        BatchError::Invalid {
            message: message.into(),
            param: Some(param),
        }
    }
}

/// An owner's index in Redis (a sorted set of ids, oldest first), each id read with `fetch`;
/// ids whose value is gone (expired, or deleted halfway) leave the index as it is read.
pub async fn read_index<T, F, Fut>(
    link: &lumen_plugins::redis_link::RedisLink,
    index: &str,
    mut fetch: F,
) -> Result<Vec<T>, BatchError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, BatchError>>,
{
    let store_error = |e: lumen_plugins::redis_link::SharedError| BatchError::Store(e.to_string());
    let mut conn = link
        .connection("batches")
        .await
        .map_err(|e| BatchError::Store(e.to_string()))?;
    let ids: Vec<String> = link
        .within(
            redis::cmd("ZRANGE")
                .arg(index)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn),
        )
        .await
        .map_err(store_error)?;
    let mut found = Vec::with_capacity(ids.len());
    let mut gone = Vec::new();
    for id in ids {
        match fetch(id.clone()).await? {
            Some(item) => found.push(item),
            None => gone.push(id),
        }
    }
    if !gone.is_empty() {
        let _ = link
            .within(
                redis::cmd("ZREM")
                    .arg(index)
                    .arg(&gone)
                    .query_async::<()>(&mut conn),
            )
            .await;
    }
    Ok(found)
}

/// Unix seconds (what OpenAI's `created_at` and friends are).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix` and 24 random base32 characters, as the job engine makes its ids.
pub use crate::jobs::new_id;

/// Whether `id` is one this gateway could have made with `prefix` (checked before it names a
/// key or a path).
pub fn well_formed(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 24
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
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
    fn ids_are_well_formed_and_others_are_not() {
        let id = new_id("file-");
        assert!(well_formed(&id, "file-"), "{id}");
        assert!(!well_formed(&id, "batch_"));
        assert!(!well_formed("file-../../etc/passwd", "file-"));
        assert!(!well_formed("file-ABCDEFGHIJKLMNOPQRSTUVWX", "file-"));
        assert_ne!(new_id("file-"), new_id("file-"));
    }

    #[test]
    fn owners_of_keys_and_tenants_never_meet() {
        let raw = RawBatches::default();
        let jobs = crate::jobs::JobSettings::build(&Default::default(), &mut Vec::new());
        let mut s = BatchSettings::build(&raw, &jobs, &mut Vec::new());
        let p = Principal::new("acme", Some("acme".into()), None);
        assert_eq!(s.owner(&p), "key:acme");
        s.scope = BatchScope::Tenant;
        assert_eq!(s.owner(&p), "tenant:acme");
        let lone = Principal::new("solo", None, None);
        assert_eq!(s.owner(&lone), "key:solo");
    }
}
