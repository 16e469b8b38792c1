//! The OpenAI Batch API (`/v1/files`, `/v1/batches`) on Lumen's job engine, for every
//! provider (the local sidecar included), not only OpenAI's.
//!
//! A client uploads a JSONL file of requests ([`input`] checks every line on upload), then
//! creates a batch over it. A driver ([`drive`]) feeds the batch's lines to the job engine a
//! few at a time (`batches.concurrency`), so each line runs through the normal pipeline as the
//! key that made the batch (routing, fallback, cache, limits, budgets, usage), and records each
//! line's outcome exactly once; when every line has one, it writes the output and error files.
//! Batch lines are the lowest priority traffic: the pipeline lets one go to a target only while
//! that target has room beyond what is kept for interactive requests (`capacity_share`).
//!
//! Where things live:
//! - without `redis:`, files under `usage.state_dir`/`files` on this node and batches in this
//!   process (a restart loses running batches, as it loses in-memory jobs);
//! - with `redis:`, files (in 1 MiB chunks) and batches in Redis, so any node answers; every
//!   node runs a driver, and a batch is driven by the node holding its lease. A node that dies
//!   loses its lease within seconds; the next driver resubmits the batch's lines under the
//!   same job ids, which the job engine answers with the jobs already there, so no line runs
//!   twice and each is recorded once.
//!
//! Imports: `config`, `jobs`, `openai`, `error`; never `proxy` (the gateway calls in).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod api;
pub mod batch;
pub mod drive;
pub mod files;
pub mod input;
pub mod multipart;
pub mod store;

use std::sync::Arc;

use lumen_plugins::redis_link::RedisLink;

use crate::jobs::Jobs;
pub use batch::{new_id, now_secs, well_formed, BatchError, BatchSettings};

/// The node's files and batches.
pub struct Batches {
    pub settings: BatchSettings,
    pub files: files::FileStore,
    pub store: store::BatchStore,
    pub jobs: Arc<Jobs>,
}

impl Batches {
    /// On disk and in process, or in Redis (`link`, key prefix) when `redis:` is configured.
    pub fn new(
        settings: BatchSettings,
        state_dir: &std::path::Path,
        redis: Option<(Arc<RedisLink>, String)>,
        jobs: Arc<Jobs>,
    ) -> Batches {
        let (files, store) = match redis {
            Some((link, prefix)) => (
                files::FileStore::redis(link.clone(), &prefix),
                store::BatchStore::redis(link, &prefix),
            ),
            None => (
                files::FileStore::disk(state_dir.join("files")),
                store::BatchStore::memory(),
            ),
        };
        Batches {
            settings,
            files,
            store,
            jobs,
        }
    }

    /// Removes what is past `batches.retention`: finished batches kept in process, expired
    /// files on disk (Redis expires its own).
    pub async fn sweep(&self) {
        self.store.sweep(self.settings.retention);
        self.files.sweep().await;
    }
}
