//! The generation loop: N sequence slots over one llama context, continuously batched.
//!
//! Each step builds one `llama_batch` with a token from every slot that is generating plus a
//! chunk of any prompt still being read, decodes it once, and samples each generating slot at
//! its own row. New requests join between steps; finished ones leave between steps. So
//! requests never wait for each other to finish, only for a free slot.
//!
//! Slot `i` is llama.cpp sequence id `i`. With the prompt cache on (the default), a slot keeps
//! its prompt's KV cells after its request ends, with the tokens they hold (the generated
//! tokens' cells are dropped: see `retire`). A new request goes to the free slot that best holds
//! its prompt (see [`choose_slot`]: longest shared prefix, a copy into an empty slot, or the
//! least recently used slot); the cells past the shared prefix are removed and only the rest of
//! the prompt is decoded. So a chat that resends its history pays only for the last answer and
//! the new turn, and the answer is byte-identical to a cold start's. A decode failure clears the
//! slots it touched: their cells are not trusted.
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
use llama_cpp_2::LlamaStateSeqFlags;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::job::{Event, Finish, GenerateJob, Job, Sampling, TokenLogprob};
use super::ram_cache::{common_prefix, RamCache, Saved};
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

/// How slots reuse their KV cache between requests (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(super) struct PromptCache {
    pub enabled: bool,
    pub min_prefix: usize,
    /// Keep the generated tokens' cells too (`cache_generated`; see `retire`).
    pub keep_generated: bool,
    /// Bytes of host memory for evicted slot caches (`prompt_cache_ram`; 0: none).
    pub ram_bytes: usize,
}

/// Most answer tokens one idle step reads again (see [`SlotCache::pending`]). Small, because a
/// request that arrives meanwhile waits for the step to end.
const REFILL_CHUNK: usize = 16;

/// What a free slot's KV cache holds, kept between requests.
#[derive(Debug, Default)]
struct SlotCache {
    /// The tokens at positions `0..tokens.len()` of the slot's sequence.
    tokens: Vec<LlamaToken>,
    /// The last answer's tokens, to be read again after `tokens` while the engine is idle.
    /// Generated one at a time, their cells were dropped (see `retire`); read again as a
    /// batch, as a cold start reads them in the next turn's prompt, they give the next turn a
    /// byte-identical answer without paying for them then.
    pending: Vec<LlamaToken>,
    /// When the slot was last given a request (a step counter); 0 for never.
    last_used: u64,
    /// The conversation prefix hashes of the request it last served (`affinity`).
    prefixes: Vec<u64>,
}

/// One request in a slot.
struct Sequence {
    /// The prompt, then each generated token as it is fed back: `tokens[..n_past]` are in the KV
    /// cache.
    tokens: Vec<LlamaToken>,
    prompt_len: usize,
    /// Tokens already in the KV cache (prompt and generated): the next token's position.
    n_past: usize,
    /// Prompt tokens that were already in the slot's cache when the request arrived.
    cached: usize,
    /// `Some(k)`: report each token's log probability and its `k` best alternatives.
    logprobs: Option<u8>,
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
    /// A decode that carried this sequence failed: its KV cells are not kept for reuse.
    poisoned: bool,
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
            prompt_len: job.prompt.len(),
            tokens: job.prompt,
            n_past: 0,
            cached: 0,
            logprobs: job.logprobs,
            next: None,
            max_tokens: job.max_tokens,
            completion_tokens: 0,
            sampler,
            text: TextAssembler::new(job.stop),
            events: job.events,
            outbox: VecDeque::new(),
            finished: false,
            poisoned: false,
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
            cached_tokens: u32::try_from(self.cached).unwrap_or(u32::MAX),
        });
        self.finished = true;
    }

    fn fail(&mut self, message: String) {
        self.outbox.push_back(Event::Failed(message));
        self.finished = true;
    }

    /// Handles one sampled token: end of generation, a stop string, the token limit, or text.
    /// `logprob` is the token's log probability entry, when the request asked for them.
    fn accept(
        &mut self,
        token: LlamaToken,
        logprob: Option<TokenLogprob>,
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
        if let Some(l) = logprob {
            self.outbox.push_back(Event::Logprob(l));
        }
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

/// The sampled token's log probability and the `top` most likely tokens, from the row's raw
/// logits (a log-softmax over the whole vocabulary, as llama-server's `n_probs` reports).
fn token_logprob(logits: &[f32], token: LlamaToken, top: u8, model: &LlamaModel) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_norm = max + sum.ln();
    let logprob_of = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |&l| l - log_norm);
    let vocab = model.vocab();
    let mut best: Vec<usize> = Vec::with_capacity(usize::from(top) + 1);
    if top > 0 {
        // One pass keeping the `top` largest, sorted: top is at most 20.
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == usize::from(top) && logits[best[best.len() - 1]] >= l {
                continue;
            }
            let at = best.partition_point(|&b| logits[b] >= l);
            best.insert(at, i);
            best.truncate(usize::from(top));
        }
    }
    let piece = |i: usize| vocab.token_to_piece(LlamaToken(i as i32), false, None);
    TokenLogprob {
        bytes: vocab.token_to_piece(token, false, None),
        logprob: logprob_of(token.0 as usize),
        top: best
            .into_iter()
            .map(|i| (piece(i), logprob_of(i)))
            .collect(),
    }
}

/// Runs until the job channel is closed and every slot is empty.
pub(super) fn run(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    jobs: &mut mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    slots: usize,
    ctx_per_seq: u32,
    cache: PromptCache,
) {
    let stall_limit = stall_limit();
    let n_batch = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let mut seqs: Vec<Option<Sequence>> = (0..slots).map(|_| None).collect();
    let mut caches: Vec<SlotCache> = (0..slots).map(|_| SlotCache::default()).collect();
    let mut ram = RamCache::new(if cache.enabled { cache.ram_bytes } else { 0 });
    let mut clock = 0u64;
    let ctx_per_seq = ctx_per_seq as usize;

    loop {
        if !admit(
            ctx,
            model,
            jobs,
            metrics,
            &mut seqs,
            &mut caches,
            &mut ram,
            &mut clock,
            cache,
        ) {
            return;
        }
        retire(
            ctx,
            metrics,
            &mut seqs,
            &mut caches,
            &ram,
            cache,
            stall_limit,
        );
        if !step(
            ctx,
            model,
            &mut batch,
            metrics,
            &mut seqs,
            &mut caches,
            n_batch,
            ctx_per_seq,
        ) {
            if seqs.iter().any(Option::is_some) {
                std::thread::sleep(PAUSED_POLL);
            }
            continue;
        }
        retire(
            ctx,
            metrics,
            &mut seqs,
            &mut caches,
            &ram,
            cache,
            stall_limit,
        );
    }
}

/// Where a request goes: its slot, how many of the slot's cached tokens it keeps, and the slot
/// whose cache is copied in first or the host-memory entry restored first, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    slot: usize,
    keep: usize,
    copy_from: Option<usize>,
    restore: Option<usize>,
}

/// Where `prompt` goes among the free slots. The slot sharing the longest prefix (ties: least
/// recently used) is used when the prefix is at least `min_prefix` tokens and:
/// * the prompt extends all that slot holds (a conversation's next turn): it is taken;
/// * else, when a free slot is empty, that slot gets a copy of the matching slot's cache, so a
///   request sharing a system prompt with another conversation does not evict it;
/// * else, when the prefix is at least half of what the slot holds (llama-server's similarity
///   rule), it is taken.
///
/// Otherwise the least recently used free slot is taken, keeping whatever prefix it shares.
///
/// A host-memory entry (`ram`) that shares a longer usable prefix than all that wins: it is
/// restored into an empty free slot, or else into the least recently used one. At least one
/// prompt token is always left to decode: sampling needs the logits of the prompt's last
/// position.
fn choose_slot<S: super::ram_cache::Weighed>(
    seqs: &[Option<Sequence>],
    caches: &[SlotCache],
    ram: &RamCache<S>,
    prompt: &[LlamaToken],
    cache: PromptCache,
) -> Option<Placement> {
    let free = || (0..seqs.len()).filter(|&i| seqs[i].is_none());
    let lru = free().min_by_key(|&i| caches[i].last_used)?;
    let fresh = |slot: usize| Placement {
        slot,
        keep: 0,
        copy_from: None,
        restore: None,
    };
    if !cache.enabled {
        return Some(fresh(lru));
    }
    let usable = |shared: usize| {
        let keep = shared.min(prompt.len().saturating_sub(1));
        if keep >= cache.min_prefix {
            keep
        } else {
            0
        }
    };
    let (best, shared) = free()
        .map(|i| (i, common_prefix(&caches[i].tokens, prompt)))
        // Longest prefix first, then least recently used.
        .min_by_key(|&(i, n)| (std::cmp::Reverse(n), caches[i].last_used))?;
    let from_slots =
        from_slots(caches, best, shared, usable(shared), free).unwrap_or_else(|| Placement {
            keep: usable(common_prefix(&caches[lru].tokens, prompt)),
            ..fresh(lru)
        });
    match ram.best(prompt) {
        Some((entry, shared)) if usable(shared) > from_slots.keep => {
            let slot = free().find(|&i| caches[i].tokens.is_empty()).unwrap_or(lru);
            Some(Placement {
                keep: usable(shared),
                restore: Some(entry),
                ..fresh(slot)
            })
        }
        _ => Some(from_slots),
    }
}

/// The placement on `best`, the free slot sharing the longest prefix (`shared` tokens, `keep`
/// of them usable), if the rules of [`choose_slot`] take it or copy it.
fn from_slots<I: Iterator<Item = usize>>(
    caches: &[SlotCache],
    best: usize,
    shared: usize,
    keep: usize,
    free: impl Fn() -> I,
) -> Option<Placement> {
    if keep == 0 {
        return None;
    }
    let on = |slot, copy_from| Placement {
        slot,
        keep,
        copy_from,
        restore: None,
    };
    let held = caches[best].tokens.len();
    if shared >= held {
        return Some(on(best, None));
    }
    if let Some(empty) = free().find(|&i| i != best && caches[i].tokens.is_empty()) {
        return Some(on(empty, Some(best)));
    }
    (shared.saturating_mul(2) >= held).then(|| on(best, None))
}

/// Fills free slots from the queue, each request into the slot that best holds its prompt
/// (see [`choose_slot`]). Blocks only when no slot is busy. Returns false when the channel is
/// closed and nothing is left to do.
#[allow(clippy::too_many_arguments)]
fn admit(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    jobs: &mut mpsc::Receiver<Job>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
    caches: &mut [SlotCache],
    ram: &mut RamCache,
    clock: &mut u64,
    cache: PromptCache,
) -> bool {
    while seqs.iter().any(Option::is_none) {
        // Idle: nothing to decode, not even an answer to read again; wait for a request.
        let idle = seqs.iter().all(Option::is_none) && caches.iter().all(|c| c.pending.is_empty());
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
        let mut g = match job {
            Job::Generate(g) => g,
            Job::Embed(e) => {
                let _ = e.reply.send(Err(
                    "this model is loaded for generation, not embeddings".into()
                ));
                continue;
            }
        };
        let prefixes = std::mem::take(&mut g.prefixes);
        let mut seq = match Sequence::new(model, g) {
            Ok(seq) => seq,
            Err((events, message)) => {
                let _ = events.try_send(Event::Failed(message));
                continue;
            }
        };
        // There is a free slot: the loop condition says so.
        let Some(place) = choose_slot(seqs, caches, ram, &seq.tokens, cache) else {
            break;
        };
        let slot = place.slot;
        let mut keep = place.keep;
        // Taken out before the slot's own cache is saved: saving may evict entries.
        let restored = place.restore.map(|entry| ram.take(entry));
        // The slot's cache is about to lose tokens that its conversation may come back for:
        // all of them for a restore, those past `keep` otherwise.
        let kept = if restored.is_some() { 0 } else { keep };
        let held = caches[slot].tokens.len();
        if ram.enabled() && held >= cache.min_prefix && held > kept {
            save(ctx, metrics, slot, &caches[slot], ram);
        }
        if let Some(saved) = restored {
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
            match ctx.state_seq_set(&saved.state, slot as i32) {
                Ok(()) => {
                    caches[slot].tokens = saved.tokens;
                    metrics.prompt_cache_restores_total.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tracing::warn!(slot, error = %e, "restoring a saved prompt cache failed");
                    let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
                    caches[slot].tokens.clear();
                    keep = 0;
                }
            }
            record_ram(metrics, ram);
        }
        if let Some(from) = place.copy_from {
            // Slot indices fit an i32. llama.cpp copies across KV streams only whole; the copy
            // is trimmed to the shared prefix just below.
            let _ = ctx.copy_kv_cache_seq(from as i32, slot as i32, None, None);
            metrics.prompt_cache_copies_total.fetch_add(1, Relaxed);
        }
        let keep = reuse(ctx, slot, &mut caches[slot], keep);
        record_pending(metrics, caches);
        *clock += 1;
        caches[slot].last_used = *clock;
        seq.n_past = keep;
        seq.cached = keep;
        metrics
            .prompt_tokens_cached_total
            .fetch_add(keep as u64, Relaxed);
        metrics.slots_busy.fetch_add(1, Relaxed);
        seqs[slot] = Some(seq);
        if cache.enabled {
            caches[slot].prefixes = prefixes;
            publish_prefixes(metrics, caches, ram);
        }
    }
    true
}

/// Copies slot `id`'s cells and tokens into host memory before they are evicted.
fn save(
    ctx: &LlamaContext<'_>,
    metrics: &ModelMetrics,
    id: usize,
    held: &SlotCache,
    ram: &mut RamCache,
) {
    match ctx.state_seq_get(id as i32, LlamaStateSeqFlags::empty()) {
        Ok(state) => {
            let saved = Saved {
                tokens: held.tokens.clone(),
                prefixes: held.prefixes.clone(),
                state,
            };
            if ram.insert(saved) {
                metrics.prompt_cache_saves_total.fetch_add(1, Relaxed);
            }
        }
        Err(e) => tracing::warn!(slot = id, error = %e, "saving a slot's prompt cache failed"),
    }
    record_ram(metrics, ram);
}

fn record_ram(metrics: &ModelMetrics, ram: &RamCache) {
    metrics
        .prompt_cache_ram_bytes
        .store(ram.bytes() as u64, Relaxed);
    metrics
        .prompt_cache_ram_entries
        .store(ram.len() as u64, Relaxed);
}

/// Publishes the conversation prefixes of every slot and host-memory entry for `/health`.
fn publish_prefixes(metrics: &ModelMetrics, caches: &[SlotCache], ram: &RamCache) {
    let mut all: Vec<u64> = caches
        .iter()
        .flat_map(|c| c.prefixes.iter().copied())
        .chain(ram.prefixes())
        .collect();
    all.sort_unstable();
    all.dedup();
    if let Ok(mut published) = metrics.cached_prefixes.lock() {
        *published = all;
    }
}

/// Trims slot `id`'s KV cells to their first `keep` positions (all of them when `keep` is 0)
/// and returns how many were kept: 0 if llama.cpp cannot remove a partial range (recurrent
/// models), in which case the slot is cleared.
fn reuse(ctx: &mut LlamaContext<'_>, id: usize, cached: &mut SlotCache, keep: usize) -> usize {
    // Sequence ids are slot indices and positions fit a slot's context: far below u32::MAX.
    let keep = if keep > 0
        && ctx
            .clear_kv_cache_seq(Some(id as u32), Some(keep as u32), None)
            .unwrap_or(false)
    {
        keep
    } else {
        let _ = ctx.clear_kv_cache_seq(Some(id as u32), None, None);
        0
    };
    cached.tokens.clear();
    cached.pending.clear();
    keep
}

/// Delivers outboxes and frees slots whose request is finished and delivered, abandoned, or
/// stalled (its client stopped reading for longer than `stall_limit`; see the module docs).
/// A freed slot keeps its KV cells and remembers their tokens when the prompt cache is on.
fn retire(
    ctx: &mut LlamaContext<'_>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
    caches: &mut [SlotCache],
    ram: &RamCache,
    cache: PromptCache,
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
            if cache.enabled && !seq.poisoned {
                // Only prompt tokens are kept unless `cache_generated`: a generated token's KV
                // was computed one token at a time, and llama.cpp's single-row kernels round
                // differently from its batched ones, so a next turn reusing them would not
                // answer byte for byte as a cold start does (measured on SmolLM2). The answer
                // is read again with the new turn instead.
                let kept = if cache.keep_generated {
                    seq.n_past
                } else {
                    seq.n_past.min(seq.prompt_len)
                };
                if kept < seq.n_past {
                    let _ = ctx.clear_kv_cache_seq(Some(id as u32), Some(kept as u32), None);
                }
                let mut tokens = std::mem::take(&mut seq.tokens);
                caches[id].pending = tokens.get(kept..seq.n_past).unwrap_or_default().to_vec();
                tokens.truncate(kept);
                caches[id].tokens = tokens;
            } else {
                // Sequence ids are slot indices, far below u32::MAX.
                let _ = ctx.clear_kv_cache_seq(Some(id as u32), None, None);
                caches[id].tokens.clear();
                caches[id].pending.clear();
                if !caches[id].prefixes.is_empty() {
                    caches[id].prefixes.clear();
                    publish_prefixes(metrics, caches, ram);
                }
            }
            *slot = None;
            metrics.slots_busy.fetch_sub(1, Relaxed);
            record_pending(metrics, caches);
        }
    }
}

fn record_pending(metrics: &ModelMetrics, caches: &[SlotCache]) {
    let pending: usize = caches.iter().map(|c| c.pending.len()).sum();
    metrics
        .prompt_cache_refill_pending
        .store(pending as u64, Relaxed);
}

/// One decode step over every slot that can advance; with no request in any slot, a step that
/// reads answers again for the next turns (see [`SlotCache::pending`]). Returns false if there
/// was nothing to do.
#[allow(clippy::too_many_arguments)]
fn step(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    batch: &mut LlamaBatch<'_>,
    metrics: &ModelMetrics,
    seqs: &mut [Option<Sequence>],
    caches: &mut [SlotCache],
    n_batch: usize,
    ctx_per_seq: usize,
) -> bool {
    if seqs.iter().all(Option::is_none) {
        return refill(ctx, batch, metrics, caches);
    }
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
        seq.tokens.truncate(seq.n_past);
        seq.tokens.push(token);
        seq.n_past += 1;
        budget -= 1;
        generated_tokens += 1;
        to_sample.push((id, batch.n_tokens() - 1));
        in_batch.push(id);
    }
    for (id, slot) in seqs.iter_mut().enumerate() {
        let Some(seq) = slot else { continue };
        if seq.finished || seq.paused() || budget == 0 || seq.n_past >= seq.prompt_len {
            continue;
        }
        let take = (seq.prompt_len - seq.n_past).min(budget);
        let mut added = 0;
        for k in 0..take {
            let pos = seq.n_past + k;
            let last = pos + 1 == seq.prompt_len;
            if batch
                .add(seq.tokens[pos], pos as i32, &[id as i32], last)
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
                seq.poisoned = true;
                seq.fail(format!("decode failed: {e}"));
            }
        }
        return true;
    }
    for (id, row) in to_sample {
        if let Some(seq) = seqs[id].as_mut() {
            let token = seq.sampler.sample(ctx, row);
            let logprob = seq
                .logprobs
                .map(|top| token_logprob(ctx.get_logits_ith(row), token, top, model));
            seq.accept(token, logprob, model, ctx_per_seq, metrics);
        }
    }
    true
}

/// How many of `pending` tokens to read in one step: at most [`REFILL_CHUNK`], never leaving a
/// single token for a step of its own (a one-row batch goes through llama.cpp's one-token
/// kernels, which round differently from the batched ones this is for).
fn refill_take(pending: usize) -> usize {
    match pending {
        0 | 1 => 0,
        n if n <= REFILL_CHUNK => n,
        n if n - REFILL_CHUNK == 1 => REFILL_CHUNK - 1,
        _ => REFILL_CHUNK,
    }
}

/// The idle step: reads the next chunk of one free slot's pending answer into its cache.
fn refill(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    metrics: &ModelMetrics,
    caches: &mut [SlotCache],
) -> bool {
    batch.clear();
    let Some(id) = caches.iter().position(|c| !c.pending.is_empty()) else {
        return false;
    };
    let done = refill_slot(ctx, batch, metrics, id, &mut caches[id]);
    record_pending(metrics, caches);
    done
}

fn refill_slot(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    metrics: &ModelMetrics,
    id: usize,
    c: &mut SlotCache,
) -> bool {
    let take = refill_take(c.pending.len());
    if take == 0 {
        // One token left: the next turn reads it with its prompt.
        c.pending.clear();
        return true;
    }
    let start = c.tokens.len();
    for (k, &token) in c.pending[..take].iter().enumerate() {
        // Positions fit a slot's context and slot ids are small: both far below i32::MAX.
        if batch
            .add(token, (start + k) as i32, &[id as i32], false)
            .is_err()
        {
            c.pending.clear();
            return true;
        }
    }
    match ctx.decode(batch) {
        Ok(()) => {
            c.tokens.extend(c.pending.drain(..take));
            metrics
                .prompt_cache_refilled_total
                .fetch_add(take as u64, Relaxed);
        }
        Err(e) => {
            tracing::warn!(slot = id, error = %e, "reading an answer again failed; dropping the slot's cache");
            let _ = ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            c.tokens.clear();
            c.pending.clear();
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_never_leave_a_single_token_step() {
        assert_eq!(refill_take(0), 0);
        assert_eq!(refill_take(1), 0);
        assert_eq!(refill_take(2), 2);
        assert_eq!(refill_take(REFILL_CHUNK), REFILL_CHUNK);
        assert_eq!(refill_take(REFILL_CHUNK + 1), REFILL_CHUNK - 1);
        assert_eq!(refill_take(REFILL_CHUNK + 2), REFILL_CHUNK);
        // Whatever the length, the steps read everything but never one token alone.
        for n in 2..100 {
            let mut left = n;
            while left > 1 {
                let take = refill_take(left);
                assert!(take >= 2, "{n}: a step of {take}");
                left -= take;
            }
            assert_eq!(left, 0, "{n}");
        }
    }

    /// A sequence with `events` queued in its outbox, sending into `tx`.
    fn waiting(tx: mpsc::Sender<Event>, events: usize) -> Sequence {
        Sequence {
            tokens: Vec::new(),
            prompt_len: 0,
            n_past: 0,
            cached: 0,
            logprobs: None,
            next: None,
            max_tokens: 1,
            completion_tokens: 0,
            sampler: LlamaSampler::greedy(),
            text: TextAssembler::new(Vec::new()),
            events: tx,
            outbox: (0..events).map(|i| Event::Text(i.to_string())).collect(),
            finished: false,
            poisoned: false,
            stalled_since: None,
        }
    }

    fn tokens(ids: std::ops::Range<i32>) -> Vec<LlamaToken> {
        ids.map(LlamaToken).collect()
    }

    fn slot(held: Vec<LlamaToken>, last_used: u64) -> SlotCache {
        SlotCache {
            tokens: held,
            pending: Vec::new(),
            last_used,
            prefixes: Vec::new(),
        }
    }

    const CACHE: PromptCache = PromptCache {
        enabled: true,
        min_prefix: 4,
        keep_generated: false,
        ram_bytes: 0,
    };

    fn place(caches: &[SlotCache], prompt: &[LlamaToken], cache: PromptCache) -> Placement {
        place_with(caches, &RamCache::<usize>::new(0), prompt, cache)
    }

    fn place_with(
        caches: &[SlotCache],
        ram: &RamCache<usize>,
        prompt: &[LlamaToken],
        cache: PromptCache,
    ) -> Placement {
        let seqs: Vec<Option<Sequence>> = caches.iter().map(|_| None).collect();
        choose_slot(&seqs, caches, ram, prompt, cache).unwrap()
    }

    #[test]
    fn a_saved_cache_is_restored_when_it_holds_more_of_the_prompt_than_any_slot() {
        let mut ram = RamCache::new(1000);
        ram.insert(Saved {
            tokens: tokens(0..30),
            prefixes: Vec::new(),
            state: 10usize,
        });
        // The slots hold 10 tokens of this prompt; the saved entry holds 30.
        let caches = [slot(tokens(0..10), 2), slot(tokens(100..110), 1)];
        let p = place_with(&caches, &ram, &tokens(0..40), CACHE);
        assert_eq!((p.slot, p.keep, p.restore), (1, 30, Some(0)));
        // An empty slot is preferred to evicting one.
        let caches = [slot(tokens(100..110), 1), slot(Vec::new(), 2)];
        let p = place_with(&caches, &ram, &tokens(0..40), CACHE);
        assert_eq!((p.slot, p.keep, p.restore), (1, 30, Some(0)));
        // A slot holding as much wins: no copy needed.
        let caches = [slot(tokens(0..35), 1), slot(Vec::new(), 2)];
        let p = place_with(&caches, &ram, &tokens(0..40), CACHE);
        assert_eq!((p.slot, p.keep, p.restore), (0, 35, None));
    }

    #[test]
    fn a_next_turn_extends_the_slot_holding_its_conversation() {
        let caches = [slot(tokens(0..10), 2), slot(tokens(100..110), 1)];
        let p = place(&caches, &tokens(0..15), CACHE);
        assert_eq!((p.slot, p.keep, p.copy_from), (0, 10, None));
        // The whole prompt cached: its last token is decoded again.
        let p = place(&caches, &tokens(0..10), CACHE);
        assert_eq!((p.slot, p.keep), (0, 9));
    }

    #[test]
    fn a_shared_prefix_is_copied_into_an_empty_slot_rather_than_evicting() {
        let mut other = tokens(0..6);
        other.extend(tokens(50..60));
        let caches = [slot(tokens(0..20), 1), slot(Vec::new(), 0)];
        let p = place(&caches, &other, CACHE);
        assert_eq!((p.slot, p.keep, p.copy_from), (1, 6, Some(0)));
    }

    #[test]
    fn without_an_empty_slot_a_half_match_is_reused_and_a_small_one_is_not() {
        let mut half = tokens(0..12);
        half.extend(tokens(50..60));
        let caches = [slot(tokens(0..20), 1), slot(tokens(200..210), 2)];
        let p = place(&caches, &half, CACHE);
        assert_eq!((p.slot, p.keep, p.copy_from), (0, 12, None));
        // 6 of 20 shared: the least recently used slot is taken instead (slot 0 here, which
        // keeps its 6 shared tokens anyway); with slot 1 older, slot 1 starts over.
        let mut small = tokens(0..6);
        small.extend(tokens(50..60));
        let caches = [slot(tokens(0..20), 3), slot(tokens(200..210), 2)];
        let p = place(&caches, &small, CACHE);
        assert_eq!((p.slot, p.keep, p.copy_from), (1, 0, None));
        // Fewer than min_prefix shared: nothing kept.
        let p = place(&caches, &tokens(0..3), CACHE);
        assert_eq!((p.slot, p.keep), (1, 0));
        // The cache off: least recently used, nothing kept.
        let off = PromptCache {
            enabled: false,
            ..CACHE
        };
        let p = place(&caches, &tokens(0..15), off);
        assert_eq!((p.slot, p.keep, p.copy_from), (1, 0, None));
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
