//! llama.cpp on its own threads: one engine thread per model owns the llama context.
//!
//! The HTTP side never touches a context. It tokenizes with the shared, read-only model (in
//! `spawn_blocking`), then hands a [`Job`] to the engine over a bounded channel whose capacity
//! is the model's queue: a full channel is a 503 at once, never a wait. Results come back over
//! a bounded channel per request; when that request's receiver is dropped (the client went
//! away) the engine frees the slot and its KV cache on its next step.
//!
//! * `job`: the [`Job`]s sent to the engine and the [`Event`]s a generation sends back.
//! * `generate`: chat/completion models, N slots decoded together (continuous batching).
//! * `embed`: embedding and reranking models, one request at a time, its inputs batched.
//! * `ram_cache`: evicted slot caches kept in host memory (`prompt_cache_ram`).
//! * `text`: UTF-8 assembly and stop strings for generated text.

mod embed;
mod generate;
mod job;
mod ram_cache;
pub mod text;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::mpsc;

use crate::config::{ModelSpec, Pooling, DEFAULT_MIN_PREFIX, DEFAULT_QUEUE, DEFAULT_SLOTS};
use crate::fetch;
use crate::metrics::ModelMetrics;

pub use self::job::{EmbedJob, Event, Finish, GenerateJob, Job, Sampling, TokenLogprob};

/// Default context per slot when the spec gives none (capped by what the model was trained on).
const DEFAULT_CHAT_CTX: u32 = 4096;
const DEFAULT_EMBED_CTX: u32 = 512;
/// Most tokens one decode step may carry; prompts longer than this are fed over several steps,
/// interleaved with the other slots' generation.
const MAX_BATCH_TOKENS: u32 = 512;

/// What a model is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Chat,
    Embed(Pooling),
}

/// What handlers need from a loaded model.
#[derive(Debug)]
pub struct Loaded {
    /// Shared read-only for tokenizing and chat templates; the engine thread owns the context.
    pub model: Arc<LlamaModel>,
    /// Tokens one request may use (prompt plus completion).
    pub ctx_per_seq: u32,
    /// Length of an embedding vector (embedding models).
    pub n_embd: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue for model {0} is full")]
    QueueFull(String),
    #[error("the engine for model {0} has stopped")]
    Stopped(String),
}

/// A model as the HTTP side sees it.
#[derive(Debug)]
pub struct ModelHandle {
    pub alias: String,
    pub capability: Capability,
    pub metrics: Arc<ModelMetrics>,
    loaded: Arc<OnceLock<Loaded>>,
    jobs: mpsc::Sender<Job>,
}

impl ModelHandle {
    /// `None` until the engine has loaded the model.
    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    /// Queues a job without waiting: a full queue is an immediate error.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        // Counted before sending so the engine's decrement can never run first.
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.metrics.requests_total.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.metrics.rejected_total.fetch_add(1, Relaxed);
                        Err(SubmitError::QueueFull(self.alias.clone()))
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        Err(SubmitError::Stopped(self.alias.clone()))
                    }
                }
            }
        }
    }
}

/// A model that failed to load or whose engine died; the process exits on it.
#[derive(Debug, thiserror::Error)]
#[error("model {alias}: {message}")]
pub struct EngineFailure {
    pub alias: String,
    pub message: String,
}

/// Starts the engine thread for one model. Loading happens on that thread, after `load_delay`
/// (a testing aid that keeps `/health` in its loading state long enough to observe).
pub fn start(
    backend: Arc<LlamaBackend>,
    spec: ModelSpec,
    load_delay: Duration,
    failures: mpsc::Sender<EngineFailure>,
) -> std::io::Result<ModelHandle> {
    let capability = match spec.pooling {
        Some(p) => Capability::Embed(p),
        None => Capability::Chat,
    };
    let queue = spec.queue.unwrap_or(DEFAULT_QUEUE).max(1) as usize;
    let (tx, rx) = mpsc::channel(queue);
    let metrics = Arc::new(ModelMetrics::default());
    let loaded = Arc::new(OnceLock::new());
    let handle = ModelHandle {
        alias: spec.alias.clone(),
        capability,
        metrics: metrics.clone(),
        loaded: loaded.clone(),
        jobs: tx,
    };
    let alias = spec.alias.clone();
    std::thread::Builder::new()
        .name(format!("engine-{}", spec.alias))
        .spawn(move || {
            std::thread::sleep(load_delay);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve_model(&backend, &spec, rx, &metrics, &loaded)
            }));
            let message = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(message)) => message,
                Err(panic) => format!(
                    "engine panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown cause")
                ),
            };
            metrics.loaded.store(false, Relaxed);
            let _ = failures.blocking_send(EngineFailure { alias, message });
        })?;
    Ok(handle)
}

/// Loads the model, publishes it, and runs the engine loop until the job channel closes.
fn serve_model(
    backend: &LlamaBackend,
    spec: &ModelSpec,
    mut jobs: mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    loaded: &OnceLock<Loaded>,
) -> Result<(), String> {
    if let Some(expected) = &spec.sha256 {
        verify_checksum(&spec.path, expected)?;
    }
    let params = LlamaModelParams::default().with_n_gpu_layers(spec.gpu_layers.unwrap_or(0));
    let model = Arc::new(
        LlamaModel::load_from_file(backend, &spec.path, &params)
            .map_err(|e| format!("loading {}: {e}", spec.path.display()))?,
    );
    let trained = model.n_ctx_train().max(1);
    let default_ctx = match spec.pooling {
        Some(_) => DEFAULT_EMBED_CTX,
        None => DEFAULT_CHAT_CTX,
    };
    let ctx_per_seq = spec.ctx.unwrap_or_else(|| default_ctx.min(trained));
    let slots = spec.slots.unwrap_or(DEFAULT_SLOTS);
    let threads = spec.threads.map_or_else(default_threads, |t| t as i32);
    let n_ctx = ctx_per_seq
        .checked_mul(slots)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("ctx {ctx_per_seq} x slots {slots} is out of range"))?;
    // Embedding inputs must fit whole into one ubatch; generation feeds long prompts in chunks.
    let n_batch = match spec.pooling {
        Some(_) => n_ctx.get(),
        None => MAX_BATCH_TOKENS.min(n_ctx.get()),
    };
    let mut ctx_params = LlamaContextParams::default()
        .with_n_ctx(Some(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(slots)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // One KV stream per slot, each `ctx_per_seq` long: a request that fits its slot can
        // never run out of cache because of its neighbours.
        .with_kv_unified(false)
        // Flash attention off (0 = LLAMA_FLASH_ATTN_TYPE_DISABLED): its CPU kernel rounds
        // differently for a query batch read after a cached prefix than for the same rows in
        // one batch, so a reused prefix would not answer byte for byte as a cold start (measured
        // on SmolLM2; llama-cpp-python leaves it off too).
        .with_flash_attention_policy(0);
    if let Some(pooling) = spec.pooling {
        ctx_params = ctx_params
            .with_embeddings(true)
            .with_pooling_type(match pooling {
                Pooling::Mean => LlamaPoolingType::Mean,
                Pooling::Cls => LlamaPoolingType::Cls,
                Pooling::Last => LlamaPoolingType::Last,
                Pooling::Rank => LlamaPoolingType::Rank,
            });
    }
    let mut ctx = model
        .new_context(backend, ctx_params)
        .map_err(|e| format!("creating context (ctx {n_ctx}): {e}"))?;

    let n_embd = match spec.pooling {
        Some(Pooling::Rank) => 1,
        _ => usize::try_from(model.n_embd()).unwrap_or(0),
    };
    let _ = loaded.set(Loaded {
        model: model.clone(),
        ctx_per_seq,
        n_embd,
    });
    metrics.slots_total.store(u64::from(slots), Relaxed);
    metrics.loaded.store(true, Relaxed);
    let cache = generate::PromptCache {
        enabled: spec.prompt_cache.unwrap_or(true),
        min_prefix: spec.min_prefix.unwrap_or(DEFAULT_MIN_PREFIX).max(1) as usize,
        keep_generated: spec.cache_generated.unwrap_or(false),
        ram_bytes: spec.prompt_cache_ram.map_or(0, |b| b.0),
    };
    tracing::info!(
        model = %spec.alias,
        path = %spec.path.display(),
        ctx_per_seq,
        slots,
        threads,
        prompt_cache = cache.enabled,
        min_prefix = cache.min_prefix,
        prompt_cache_ram = cache.ram_bytes,
        "model loaded"
    );

    match spec.pooling {
        None => generate::run(
            &mut ctx,
            &model,
            &mut jobs,
            metrics,
            slots as usize,
            ctx_per_seq,
            cache,
        ),
        Some(_) => embed::run(
            &mut ctx,
            &mut jobs,
            metrics,
            slots as usize,
            n_batch as usize,
        ),
    }
    Ok(())
}

fn default_threads() -> i32 {
    std::thread::available_parallelism()
        .map(|n| i32::try_from(n.get()).unwrap_or(1))
        .unwrap_or(1)
}

fn verify_checksum(path: &Path, expected: &str) -> Result<(), String> {
    let actual = fetch::sha256_file(path).map_err(|e| e.to_string())?;
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(format!(
            "{} has sha256 {actual}, expected {expected}; refusing to serve it (re-fetch the \
             model, e.g. `lumen-llama fetch-model smollm2`)",
            path.display()
        ))
    }
}
