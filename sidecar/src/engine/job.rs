//! What travels between the HTTP side and an engine thread: the [`Job`]s handed to the engine
//! (a [`GenerateJob`] with its [`Sampling`], or an [`EmbedJob`]) and the [`Event`]s a generation
//! sends back, ending in a [`Finish`].
//!
//! A leaf of `engine`: it imports nothing of its parent, so that the loops in `generate.rs` and
//! `embed.rs` can use these types while `mod.rs` calls those loops. `mod.rs` re-exports them all.

use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: i32,
    pub seed: u32,
    /// GBNF grammar (root rule `root`) the output must follow.
    pub grammar: Option<String>,
}

/// A generation request, already tokenized and checked against the context size.
#[derive(Debug)]
pub struct GenerateJob {
    pub prompt: Vec<LlamaToken>,
    /// At least 1; the prompt plus this fits in one slot's context.
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub sampling: Sampling,
    /// `Some(k)`: send a [`Event::Logprob`] for every generated token, with its `k` most likely
    /// alternatives (0 to 20).
    pub logprobs: Option<u8>,
    /// The conversation's prefix hashes (`affinity::chain`), remembered with the slot's cache
    /// and reported in `/health`; empty for a text completion.
    pub prefixes: Vec<u64>,
    pub events: mpsc::Sender<Event>,
}

/// One generated token's log probability, and the most likely tokens at its position, from the
/// model's distribution before sampling cuts (as OpenAI reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's bytes (a piece of a UTF-8 character for byte-fallback tokens).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(Vec<u8>, f32)>,
}

/// Why generation ended, as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a generation request receives, in order: text deltas (and, when asked for, one
/// `Logprob` per generated token, each before the text it produced), then one `Done` or
/// `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Logprob(TokenLogprob),
    Done {
        finish: Finish,
        completion_tokens: u32,
        /// Prompt tokens taken from the slot's KV cache rather than processed.
        cached_tokens: u32,
    },
    Failed(String),
}

/// Embedding (or, for rank pooling, scoring) of several tokenized inputs.
#[derive(Debug)]
pub struct EmbedJob {
    pub inputs: Vec<Vec<LlamaToken>>,
    /// One vector per input: the pooled embedding, or `[score]` for rank pooling.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

#[derive(Debug)]
pub enum Job {
    Generate(GenerateJob),
    Embed(EmbedJob),
}

impl Job {
    /// True when whoever sent the job no longer waits for it.
    pub(super) fn abandoned(&self) -> bool {
        match self {
            Job::Generate(g) => g.events.is_closed(),
            Job::Embed(e) => e.reply.is_closed(),
        }
    }
}
