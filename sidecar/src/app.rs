//! The state shared by the HTTP handlers ([`App`]: the served models, response ids, seeds) and
//! how they run blocking work ([`blocking`]: tokenizing, prompt rendering and other CPU work go
//! to tokio's blocking pool, never onto the async workers).
//!
//! Imports only `engine`, `error` and the standard library: `server` and the endpoint modules
//! (`completions`, `embeddings`) import this one, never the other way round.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::{Capability, Loaded, ModelHandle};
use crate::error::ApiError;

/// State shared by all handlers.
#[derive(Debug)]
pub struct App {
    /// Served models by alias, in a stable order for `/v1/models` and `/metrics`.
    pub models: BTreeMap<String, ModelHandle>,
    /// Unix time the process started: the `created` of every model, and part of response ids.
    started: u64,
    /// Makes response ids unique within this process.
    counter: AtomicU64,
}

impl App {
    pub fn new(models: Vec<ModelHandle>) -> Self {
        Self {
            models: models.into_iter().map(|m| (m.alias.clone(), m)).collect(),
            started: unix_now(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn model(&self, name: &str) -> Result<&ModelHandle, ApiError> {
        self.models
            .get(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// The loaded model behind a handle, or 503 while it is still loading.
    pub fn loaded<'a>(&self, handle: &'a ModelHandle) -> Result<&'a Loaded, ApiError> {
        handle
            .loaded()
            .ok_or_else(|| ApiError::Loading(handle.alias.clone()))
    }

    /// A model that can generate text: 404 if unknown, 400 if it is an embedding model.
    pub fn generation_model(&self, name: &str) -> Result<(&ModelHandle, &Loaded), ApiError> {
        let handle = self.model(name)?;
        if let Capability::Embed(_) = handle.capability {
            return Err(ApiError::WrongModelKind {
                message: format!(
                    "model `{name}` is loaded for embeddings or reranking; it cannot generate text"
                ),
            });
        }
        Ok((handle, self.loaded(handle)?))
    }

    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started)
    }

    /// Unix time (seconds) at which this process started.
    pub fn started(&self) -> u64 {
        self.started
    }

    pub fn now(&self) -> u64 {
        unix_now()
    }

    /// A seed for requests that give none: different per request, as OpenAI's sampling is.
    pub fn fresh_seed(&self) -> u32 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        nanos ^ (self.counter.fetch_add(1, Relaxed) as u32).wrapping_mul(0x9E37_79B9)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs tokenization or other CPU work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}
