//! The embedding loop: one request at a time, its inputs packed into as few decode calls as the
//! slots (sequences per call) and the batch size allow, one pooled vector read per sequence.
//!
//! Pooling happens inside llama.cpp (mean, cls, last, or rank through the classification head);
//! normalising and truncating are the HTTP side's business.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::job::{Event, Job};
use crate::metrics::ModelMetrics;

/// Runs until the job channel is closed.
pub(super) fn run(
    ctx: &mut LlamaContext<'_>,
    jobs: &mut mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    slots: usize,
    n_batch: usize,
) {
    let mut batch = LlamaBatch::new(n_batch, 1);
    while let Some(job) = jobs.blocking_recv() {
        metrics.queue_depth.fetch_sub(1, Relaxed);
        if job.abandoned() {
            metrics.cancelled_total.fetch_add(1, Relaxed);
            continue;
        }
        match job {
            Job::Embed(e) => {
                metrics.slots_busy.store(1, Relaxed);
                let result = embed_all(ctx, &mut batch, &e.inputs, slots, n_batch, metrics);
                metrics.slots_busy.store(0, Relaxed);
                let _ = e.reply.send(result);
            }
            Job::Generate(g) => {
                let _ = g.events.try_send(Event::Failed(
                    "this model is loaded for embeddings, not generation".into(),
                ));
            }
        }
    }
}

fn embed_all(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    inputs: &[Vec<LlamaToken>],
    slots: usize,
    n_batch: usize,
    metrics: &ModelMetrics,
) -> Result<Vec<Vec<f32>>, String> {
    let mut out = Vec::with_capacity(inputs.len());
    let mut next = 0;
    while next < inputs.len() {
        batch.clear();
        ctx.clear_kv_cache();
        let first = next;
        let mut tokens = 0;
        while next < inputs.len() && next - first < slots && tokens + inputs[next].len() <= n_batch
        {
            let seq_id = (next - first) as i32;
            batch
                .add_sequence(&inputs[next], seq_id, true)
                .map_err(|e| format!("batching input {next}: {e}"))?;
            tokens += inputs[next].len();
            next += 1;
        }
        if next == first {
            return Err(format!(
                "input {next} has {} tokens, more than the batch size {n_batch}",
                inputs[next].len()
            ));
        }
        let started = Instant::now();
        ctx.decode(batch)
            .map_err(|e| format!("decode failed: {e}"))?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        metrics.record_batch((next - first) as u64, tokens as u64);
        metrics.record_step_time(micros, tokens as u64, 0);
        metrics
            .prompt_tokens_total
            .fetch_add(tokens as u64, Relaxed);
        for seq in 0..(next - first) {
            let pooled = ctx
                .embeddings_seq_ith(seq as i32)
                .map_err(|e| format!("reading pooled output of input {}: {e}", first + seq))?;
            out.push(pooled.to_vec());
        }
    }
    ctx.clear_kv_cache();
    Ok(out)
}
