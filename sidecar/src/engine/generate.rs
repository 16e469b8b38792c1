//! The generation loop: N sequence slots over one llama context, continuously batched.
//!
//! Each step builds one `llama_batch` with a token from every slot that is generating plus a
//! chunk of any prompt still being read, decodes it once, and samples each generating slot at
//! its own row. New requests join between steps; finished ones leave between steps. So
//! requests never wait for each other to finish, only for a free slot.
//!
//! Slot `i` is llama.cpp sequence id `i`. Its KV cells are removed the moment it is freed.
//! A slot whose client reads slowly keeps its undelivered events in a small outbox and sits out
//! steps until the client catches up (backpressure without blocking the other slots); a slot
//! whose client is gone is freed on the next step.
//!
//! A client that keeps its connection open but stops reading would otherwise hold its slot (and
//! KV cells) forever, and a few such clients would take every slot. So a slot whose client has
//! accepted nothing for [`DEFAULT_STALL_LIMIT`] while events wait is freed exactly as if the
//! client had gone, counted in `lumen_llama_requests_stalled_total`. The environment variable
//! `LUMEN_LLAMA_STALL_TIMEOUT_MS`, read when the engine starts, overrides the limit (tests use
//! it to make the limit short).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::job::{Event, Finish, GenerateJob, Job, Sampling};
use super::text::{Pushed, TextAssembler};
use crate::metrics::ModelMetrics;

/// How long to wait when every busy slot is held up by a slow client.
const PAUSED_POLL: Duration = Duration::from_millis(2);

/// How long a slot may wait on a client that reads nothing before the request is ended.
const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(30);
/// Overrides [`DEFAULT_STALL_LIMIT`], in milliseconds.
const STALL_LIMIT_ENV: &str = "LUMEN_LLAMA_STALL_TIMEOUT_MS";

/// The stall limit: `LUMEN_LLAMA_STALL_TIMEOUT_MS` if set to a number, else the default.
fn stall_limit() -> Duration {
    std::env::var(STALL_LIMIT_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(DEFAULT_STALL_LIMIT, Duration::from_millis)
}

/// One request in a slot.
struct Sequence {
    prompt: Vec<LlamaToken>,
    /// Tokens already in the KV cache (prompt and generated): the next token's position.
    n_past: usize,
    /// The last sampled token, to be fed on the next step.
    next: Option<LlamaToken>,
    max_tokens: u32,
    completion_tokens: u32,
    sampler: LlamaSampler,
    text: TextAssembler,
    events: mpsc::Sender<Event>,
    /// Events the client's channel had no room for yet, oldest first.
    outbox: VecDeque<Event>,
    /// Set once `Done` or `Failed` is in the outbox: the slot is freed after delivery.
    finished: bool,
    /// Since when the client has accepted nothing while the outbox waits; `None` when the
    /// outbox is empty or the client took an event on the last delivery attempt.
    stalled_since: Option<Instant>,
}

/// Whether the client still listens after a delivery attempt.
enum Delivery {
    Open,
    Gone,
    /// Still connected, but has read nothing for longer than the stall limit.
    Stalled,
}

impl Sequence {
    fn new(model: &LlamaModel, job: GenerateJob) -> Result<Self, (mpsc::Sender<Event>, String)> {
        let sampler = match build_sampler(model, &job.sampling) {
            Ok(s) => s,
            Err(e) => return Err((job.events, e)),
        };
        Ok(Self {
            prompt: job.prompt,
            n_past: 0,
            next: None,
            max_tokens: job.max_tokens,
            completion_tokens: 0,
            sampler,
            text: TextAssembler::new(job.stop),
            events: job.events,
            outbox: VecDeque::new(),
            finished: false,
            stalled_since: None,
        })
    }

    fn deliver(&mut self, stall_limit: Duration) -> Delivery {
        while let Some(event) = self.outbox.pop_front() {
            match self.events.try_send(event) {
                // The client is reading: whatever pause there was is over.
                Ok(()) => self.stalled_since = None,
                Err(TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    let since = *self.stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > stall_limit {
                        return Delivery::Stalled;
                    }
                    return Delivery::Open;
                }
                Err(TrySendError::Closed(_)) => return Delivery::Gone,
            }
        }
        if self.events.is_closed() && !self.finished {
            return Delivery::Gone;
        }
        Delivery::Open
    }

    fn paused(&self) -> bool {
        !self.outbox.is_empty()
    }

    fn finish(&mut self, finish: Finish) {
        let (Pushed::Text(rest) | Pushed::Stopped(rest)) = self.text.finish();
        if !rest.is_empty() {
            self.outbox.push_back(Event::Text(rest));
        }
        self.outbox.push_back(Event::Done {
            finish,
            completion_tokens: self.completion_tokens,
        });
        self.finished = true;
    }

    fn fail(&mut self, message: String) {
        self.outbox.push_back(Event::Failed(message));
        self.finished = true;
    }

    /// Handles one sampled token: end of generation, a stop string, the token limit, or text.
    fn accept(
        &mut self,
        token: LlamaToken,
        model: &LlamaModel,
        ctx_per_seq: usize,
        metrics: &ModelMetrics,
    ) {
        let vocab = model.vocab();
        if vocab.is_eog(token) {
            self.finish(Finish::Stop);
            return;
        }
        self.completion_tokens += 1;
        metrics.completion_tokens_total.fetch_add(1, Relaxed);
        let piece = vocab.token_to_piece(token, false, None);
        match self.text.push(&piece) {
            Pushed::Stopped(t) => {
                if !t.is_empty() {
                    self.outbox.push_back(Event::Text(t));
                }
                // Finishing flushes nothing more: the assembler was cleared at the stop.
                self.finish(Finish::Stop);
                return;
            }
            Pushed::Text(t) => {
                if !t.is_empty() {
                    self.outbox.push_back(Event::Text(t));
                }
            }
        }
        if self.completion_tokens >= self.max_tokens || self.n_past + 1 > ctx_per_seq {
            self.finish(Finish::Length);
        } else {
            self.next = Some(token);
        }
    }
}

/// The sampler chain for one request: the grammar first (it masks what may come next), then the
/// usual cuts, then greedy or seeded random choice.
fn build_sampler(model: &LlamaModel, s: &Sampling) -> Result<LlamaSampler, String> {
    let mut chain = Vec::new();
    if let Some(grammar) = &s.grammar {
        chain.push(
            LlamaSampler::grammar(model, grammar, "root")
                .map_err(|e| format!("invalid grammar: {e}"))?,
        );
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

/// Runs until the job channel is closed and every slot is empty.
pub(super) fn run(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    jobs: &mut mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    slots: usize,
    ctx_per_seq: u32,
) {
    let stall_limit = stall_limit();
    let n_batch = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let mut seqs: Vec<Option<Sequence>> = (0..slots).map(|_| None).collect();
    let ctx_per_seq = ctx_per_seq as usize;

    loop {
        if !admit(model, jobs, metrics, &mut seqs) {
            return;
        }
        retire(ctx, metrics, &mut seqs, stall_limit);
        if !step(
            ctx,
            model,
            &mut batch,
            metrics,
            &mut seqs,
            n_batch,
            ctx_per_seq,
        ) {
            if seqs.iter().any(Option::is_some) {
                std::thread::sleep(PAUSED_POLL);
            }
            continue;
        }
        retire(ctx, metrics, &mut seqs, stall_limit);
    }
}

/// Fills free slots from the queue. Blocks only when no slot is busy. Returns false when the
/// channel is closed and nothing is left to do.
fn admit(
    model: &LlamaModel,
    jobs: &mut mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
) -> bool {
    while let Some(free) = seqs.iter().position(Option::is_none) {
        let idle = seqs.iter().all(Option::is_none);
        let job = if idle {
            match jobs.blocking_recv() {
                Some(job) => job,
                None => return false,
            }
        } else {
            match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
            }
        };
        metrics.queue_depth.fetch_sub(1, Relaxed);
        if job.abandoned() {
            metrics.cancelled_total.fetch_add(1, Relaxed);
            continue;
        }
        match job {
            Job::Generate(g) => match Sequence::new(model, g) {
                Ok(seq) => {
                    metrics.slots_busy.fetch_add(1, Relaxed);
                    seqs[free] = Some(seq);
                }
                Err((events, message)) => {
                    let _ = events.try_send(Event::Failed(message));
                }
            },
            Job::Embed(e) => {
                let _ = e.reply.send(Err(
                    "this model is loaded for generation, not embeddings".into()
                ));
            }
        }
    }
    true
}

/// Delivers outboxes and frees slots whose request is finished and delivered, abandoned, or
/// stalled (its client stopped reading for longer than `stall_limit`; see the module docs).
fn retire(
    ctx: &mut LlamaContext<'_>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
    stall_limit: Duration,
) {
    for (id, slot) in seqs.iter_mut().enumerate() {
        let Some(seq) = slot else { continue };
        let delivery = seq.deliver(stall_limit);
        let gone = matches!(delivery, Delivery::Gone);
        let stalled = matches!(delivery, Delivery::Stalled);
        if stalled {
            tracing::warn!(
                slot = id,
                limit_ms = u64::try_from(stall_limit.as_millis()).unwrap_or(u64::MAX),
                "client stopped reading its stream; ending the request and freeing its slot"
            );
            metrics.stalled_total.fetch_add(1, Relaxed);
        }
        if gone || stalled || (seq.finished && seq.outbox.is_empty()) {
            if gone && !seq.finished {
                metrics.cancelled_total.fetch_add(1, Relaxed);
            }
            // Sequence ids are slot indices, far below u32::MAX.
            let _ = ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            *slot = None;
            metrics.slots_busy.fetch_sub(1, Relaxed);
        }
    }
}

/// One decode step over every slot that can advance. Returns false if there was nothing to do.
fn step(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    batch: &mut LlamaBatch<'_>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
    n_batch: usize,
    ctx_per_seq: usize,
) -> bool {
    batch.clear();
    let mut budget = n_batch;
    // (slot, batch row whose logits to sample)
    let mut to_sample: Vec<(usize, i32)> = Vec::new();
    let mut in_batch: Vec<usize> = Vec::new();
    let (mut prompt_tokens, mut generated_tokens) = (0u64, 0u64);

    // Generating slots first (one token each), so a long prompt never starves them; prompts
    // share what is left of the step's budget.
    for (id, slot) in seqs.iter_mut().enumerate() {
        let Some(seq) = slot else { continue };
        if seq.finished || seq.paused() || budget == 0 {
            continue;
        }
        let Some(token) = seq.next.take() else {
            continue;
        };
        if batch
            .add(token, seq.n_past as i32, &[id as i32], true)
            .is_err()
        {
            seq.next = Some(token);
            continue;
        }
        seq.n_past += 1;
        budget -= 1;
        generated_tokens += 1;
        to_sample.push((id, batch.n_tokens() - 1));
        in_batch.push(id);
    }
    for (id, slot) in seqs.iter_mut().enumerate() {
        let Some(seq) = slot else { continue };
        if seq.finished || seq.paused() || budget == 0 || seq.n_past >= seq.prompt.len() {
            continue;
        }
        let take = (seq.prompt.len() - seq.n_past).min(budget);
        let mut added = 0;
        for k in 0..take {
            let pos = seq.n_past + k;
            let last = pos + 1 == seq.prompt.len();
            if batch
                .add(seq.prompt[pos], pos as i32, &[id as i32], last)
                .is_err()
            {
                break;
            }
            added += 1;
            if last {
                to_sample.push((id, batch.n_tokens() - 1));
            }
        }
        seq.n_past += added;
        budget -= added;
        prompt_tokens += added as u64;
        if added > 0 {
            in_batch.push(id);
        }
    }
    if batch.n_tokens() == 0 {
        return false;
    }

    let started = Instant::now();
    let result = ctx.decode(batch);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    metrics.record_batch(in_batch.len() as u64, prompt_tokens + generated_tokens);
    metrics.record_step_time(micros, prompt_tokens, generated_tokens);
    metrics
        .prompt_tokens_total
        .fetch_add(prompt_tokens, Relaxed);

    if let Err(e) = result {
        tracing::error!(error = %e, "llama_decode failed; failing the requests in this batch");
        for id in in_batch {
            if let Some(seq) = seqs[id].as_mut() {
                seq.fail(format!("decode failed: {e}"));
            }
        }
        return true;
    }
    for (id, row) in to_sample {
        if let Some(seq) = seqs[id].as_mut() {
            let token = seq.sampler.sample(ctx, row);
            seq.accept(token, model, ctx_per_seq, metrics);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence with `events` queued in its outbox, sending into `tx`.
    fn waiting(tx: mpsc::Sender<Event>, events: usize) -> Sequence {
        Sequence {
            prompt: Vec::new(),
            n_past: 0,
            next: None,
            max_tokens: 1,
            completion_tokens: 0,
            sampler: LlamaSampler::greedy(),
            text: TextAssembler::new(Vec::new()),
            events: tx,
            outbox: (0..events).map(|i| Event::Text(i.to_string())).collect(),
            finished: false,
            stalled_since: None,
        }
    }

    #[test]
    fn a_stall_ends_a_request_only_if_the_client_reads_nothing_for_the_whole_limit() {
        let limit = Duration::from_millis(100);
        let (tx, mut rx) = mpsc::channel(1);
        let mut seq = waiting(tx, 10);
        assert!(matches!(seq.deliver(limit), Delivery::Open));
        assert!(seq.stalled_since.is_some());

        // The client reads one event now and then, each time within the limit: never stalled,
        // though far more than the limit passes in all.
        for _ in 0..4 {
            std::thread::sleep(limit / 2);
            assert!(rx.try_recv().is_ok());
            assert!(matches!(seq.deliver(limit), Delivery::Open));
        }

        // Then it reads nothing for longer than the limit.
        std::thread::sleep(limit * 2);
        assert!(matches!(seq.deliver(limit), Delivery::Stalled));

        // A client that catches up clears the timer.
        while !seq.outbox.is_empty() {
            let _ = rx.try_recv();
            seq.deliver(limit);
        }
        assert!(seq.stalled_since.is_none());
    }
}
