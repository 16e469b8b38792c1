//! Per-model counters, updated by the engine thread and the HTTP handlers, rendered as Prometheus
//! text at `/metrics`.
//!
//! Plain atomics: each update is one relaxed add on a hot path shared by two kinds of thread,
//! and a scrape that sees counters a few nanoseconds apart is fine. Durations are kept in
//! microseconds and rendered in seconds.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds of the "sequences per decode step" histogram.
pub const BATCH_BUCKETS: [u64; 6] = [1, 2, 4, 8, 16, 32];

/// Everything counted about one model.
#[derive(Debug, Default)]
pub struct ModelMetrics {
    /// Set once the model is loaded and its engine is taking requests.
    pub loaded: AtomicBool,
    /// Sequence slots configured (fixed after load) and currently holding a request.
    pub slots_total: AtomicU64,
    pub slots_busy: AtomicU64,
    /// Requests accepted into the queue and not yet picked up by the engine.
    pub queue_depth: AtomicU64,
    pub requests_total: AtomicU64,
    /// Requests turned away with 503 because the queue was full.
    pub rejected_total: AtomicU64,
    /// Requests whose client went away before they finished (their slot was freed at once).
    pub cancelled_total: AtomicU64,
    /// Requests ended because their client stopped reading for longer than the stall limit
    /// (their slot was freed as for a disconnect).
    pub stalled_total: AtomicU64,
    /// Prompt tokens decoded, and prompt tokens taken from a slot's cache instead.
    pub prompt_tokens_total: AtomicU64,
    pub prompt_tokens_cached_total: AtomicU64,
    /// Times a slot's cache was copied into an empty slot for a request sharing its prefix.
    pub prompt_cache_copies_total: AtomicU64,
    /// Answer tokens read again into a free slot's cache while the engine was idle.
    pub prompt_cache_refilled_total: AtomicU64,
    /// Answer tokens waiting to be read again (a gauge).
    pub prompt_cache_refill_pending: AtomicU64,
    /// Evicted slot caches saved to host memory (`prompt_cache_ram`), and saved caches put
    /// back into a slot for a request that continues them.
    pub prompt_cache_saves_total: AtomicU64,
    pub prompt_cache_restores_total: AtomicU64,
    /// Bytes and entries the host-memory prompt cache holds now.
    pub prompt_cache_ram_bytes: AtomicU64,
    pub prompt_cache_ram_entries: AtomicU64,
    pub completion_tokens_total: AtomicU64,
    /// Engine time spent on prompt tokens and on generated tokens; a decode step that carries
    /// both is split in proportion to its token counts.
    pub prompt_micros_total: AtomicU64,
    pub generation_micros_total: AtomicU64,
    /// Decode steps, and how many sequences each carried (the continuous-batching evidence).
    pub batches_total: AtomicU64,
    pub batch_sequences_total: AtomicU64,
    pub batch_sequences_bucket: [AtomicU64; BATCH_BUCKETS.len()],
    pub batch_tokens_total: AtomicU64,
    /// The conversation prefixes the slots' caches hold (`affinity`), sorted, for `/health`.
    /// Replaced by the engine thread when a slot takes a request; read by `/health`.
    pub cached_prefixes: Mutex<Vec<u64>>,
}

impl ModelMetrics {
    /// Records one decode step carrying `sequences` sequences and `tokens` tokens.
    pub fn record_batch(&self, sequences: u64, tokens: u64) {
        self.batches_total.fetch_add(1, Relaxed);
        self.batch_sequences_total.fetch_add(sequences, Relaxed);
        self.batch_tokens_total.fetch_add(tokens, Relaxed);
        for (bucket, le) in self.batch_sequences_bucket.iter().zip(BATCH_BUCKETS) {
            if sequences <= le {
                bucket.fetch_add(1, Relaxed);
            }
        }
    }

    /// Splits one step's duration between prompt and generated tokens.
    pub fn record_step_time(&self, micros: u64, prompt_tokens: u64, generated_tokens: u64) {
        let total = prompt_tokens + generated_tokens;
        if total == 0 {
            return;
        }
        let prompt_share = micros * prompt_tokens / total;
        self.prompt_micros_total.fetch_add(prompt_share, Relaxed);
        self.generation_micros_total
            .fetch_add(micros - prompt_share, Relaxed);
    }
}

fn per_second(tokens: u64, micros: u64) -> f64 {
    if micros == 0 {
        0.0
    } else {
        tokens as f64 * 1e6 / micros as f64
    }
}

/// Renders all models' metrics in Prometheus text format (version 0.0.4).
pub fn render<'a>(models: impl Iterator<Item = (&'a str, &'a ModelMetrics)> + Clone) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&ModelMetrics) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (alias, m) in models.clone() {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(alias), value(m));
        }
    };
    let get = |a: &AtomicU64| a.load(Relaxed) as f64;
    family(
        "lumen_llama_model_loaded",
        "gauge",
        "1 once the model is loaded and serving.",
        &|m| f64::from(u8::from(m.loaded.load(Relaxed))),
    );
    family(
        "lumen_llama_slots",
        "gauge",
        "Parallel sequence slots configured.",
        &|m| get(&m.slots_total),
    );
    family(
        "lumen_llama_slots_busy",
        "gauge",
        "Slots currently serving a request.",
        &|m| get(&m.slots_busy),
    );
    family(
        "lumen_llama_queue_depth",
        "gauge",
        "Requests waiting for a free slot.",
        &|m| get(&m.queue_depth),
    );
    family(
        "lumen_llama_requests_total",
        "counter",
        "Requests accepted.",
        &|m| get(&m.requests_total),
    );
    family(
        "lumen_llama_requests_rejected_total",
        "counter",
        "Requests answered 503 because the queue was full.",
        &|m| get(&m.rejected_total),
    );
    family(
        "lumen_llama_requests_cancelled_total",
        "counter",
        "Requests abandoned by their client; their slots were freed.",
        &|m| get(&m.cancelled_total),
    );
    family(
        "lumen_llama_requests_stalled_total",
        "counter",
        "Requests ended because their client read nothing for too long; their slots were freed.",
        &|m| get(&m.stalled_total),
    );
    family(
        "lumen_llama_prompt_tokens_total",
        "counter",
        "Prompt tokens processed (decoded).",
        &|m| get(&m.prompt_tokens_total),
    );
    family(
        "lumen_llama_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens reused from a slot's KV cache instead of being processed.",
        &|m| get(&m.prompt_tokens_cached_total),
    );
    family(
        "lumen_llama_prompt_cache_copies_total",
        "counter",
        "Slot caches copied into an empty slot for a request sharing their prefix.",
        &|m| get(&m.prompt_cache_copies_total),
    );
    family(
        "lumen_llama_prompt_cache_refilled_total",
        "counter",
        "Answer tokens read again into a free slot's cache while idle, for the next turn.",
        &|m| get(&m.prompt_cache_refilled_total),
    );
    family(
        "lumen_llama_prompt_cache_refill_pending",
        "gauge",
        "Answer tokens waiting to be read again while idle.",
        &|m| get(&m.prompt_cache_refill_pending),
    );
    family(
        "lumen_llama_prompt_cache_saves_total",
        "counter",
        "Evicted slot caches saved to host memory (prompt_cache_ram).",
        &|m| get(&m.prompt_cache_saves_total),
    );
    family(
        "lumen_llama_prompt_cache_restores_total",
        "counter",
        "Slot caches restored from host memory for a request continuing them.",
        &|m| get(&m.prompt_cache_restores_total),
    );
    family(
        "lumen_llama_prompt_cache_ram_bytes",
        "gauge",
        "Bytes of KV cache held in host memory (prompt_cache_ram).",
        &|m| get(&m.prompt_cache_ram_bytes),
    );
    family(
        "lumen_llama_prompt_cache_ram_entries",
        "gauge",
        "Evicted prompts held in host memory (prompt_cache_ram).",
        &|m| get(&m.prompt_cache_ram_entries),
    );
    family(
        "lumen_llama_completion_tokens_total",
        "counter",
        "Tokens generated.",
        &|m| get(&m.completion_tokens_total),
    );
    family(
        "lumen_llama_prompt_seconds_total",
        "counter",
        "Engine time spent on prompt tokens.",
        &|m| get(&m.prompt_micros_total) / 1e6,
    );
    family(
        "lumen_llama_generation_seconds_total",
        "counter",
        "Engine time spent generating tokens.",
        &|m| get(&m.generation_micros_total) / 1e6,
    );
    family(
        "lumen_llama_prompt_tokens_per_second",
        "gauge",
        "Prompt tokens per second of engine time, since start.",
        &|m| {
            per_second(
                m.prompt_tokens_total.load(Relaxed),
                m.prompt_micros_total.load(Relaxed),
            )
        },
    );
    family(
        "lumen_llama_generation_tokens_per_second",
        "gauge",
        "Generated tokens per second of engine time (all slots together), since start.",
        &|m| {
            per_second(
                m.completion_tokens_total.load(Relaxed),
                m.generation_micros_total.load(Relaxed),
            )
        },
    );
    family(
        "lumen_llama_batch_tokens_total",
        "counter",
        "Tokens submitted to llama_decode.",
        &|m| get(&m.batch_tokens_total),
    );

    let name = "lumen_llama_batch_sequences";
    let _ = writeln!(
        out,
        "# HELP {name} Sequences carried by each decode step (more than 1: continuous batching)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (alias, m) in models {
        let alias = escape(alias);
        for (bucket, le) in m.batch_sequences_bucket.iter().zip(BATCH_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{model=\"{alias}\",le=\"{le}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = m.batches_total.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{alias}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{model=\"{alias}\"}} {}",
            m.batch_sequences_total.load(Relaxed)
        );
        let _ = writeln!(out, "{name}_count{{model=\"{alias}\"}} {count}");
    }
    out
}

/// Label values escape backslash, quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_histogram_is_cumulative() {
        let m = ModelMetrics::default();
        m.record_batch(1, 10);
        m.record_batch(3, 3);
        m.record_batch(40, 40);
        let text = render([("tiny", &m)].into_iter());
        assert!(text.contains("lumen_llama_batch_sequences_bucket{model=\"tiny\",le=\"1\"} 1"));
        assert!(text.contains("lumen_llama_batch_sequences_bucket{model=\"tiny\",le=\"4\"} 2"));
        assert!(text.contains("lumen_llama_batch_sequences_bucket{model=\"tiny\",le=\"32\"} 2"));
        assert!(text.contains("lumen_llama_batch_sequences_bucket{model=\"tiny\",le=\"+Inf\"} 3"));
        assert!(text.contains("lumen_llama_batch_sequences_sum{model=\"tiny\"} 44"));
    }

    #[test]
    fn step_time_is_split_by_token_share() {
        let m = ModelMetrics::default();
        m.record_step_time(1000, 3, 1);
        assert_eq!(m.prompt_micros_total.load(Relaxed), 750);
        assert_eq!(m.generation_micros_total.load(Relaxed), 250);
        m.completion_tokens_total.store(5, Relaxed);
        let text = render([("a\"b", &m)].into_iter());
        assert!(text.contains("lumen_llama_generation_tokens_per_second{model=\"a\\\"b\"} 20000"));
    }
}
