//! Sidecar throughput: generated tokens per second for one stream and for 4 parallel streams
//! (continuous batching should make the aggregate clearly higher), and prompt processing
//! tokens per second for a ~512-token prompt. On the generated tiny model always, and on
//! SmolLM2 when `models/SmolLM2-135M-Instruct.Q4_1.gguf` has been fetched.
//!
//! Run: `cargo bench -p lumen-llama --bench sidecar`. Measured from the client over HTTP, so
//! the figures include tokenizing, SSE framing and loopback; the baseline (one stream) is taken
//! in the same run, and the table reports the parallel/single ratio.

use std::time::Instant;

use lumen_test_support::openai::chat_with;
use lumen_test_support::sidecar::{self, real_model, tiny_chat_model, Sidecar};
use serde_json::json;

/// Repetitions per measurement; the best is kept (least disturbed by other work on the box).
const RUNS: usize = 3;

struct Figures {
    single: f64,
    parallel: f64,
    prompt: f64,
    prompt_tokens: u64,
}

fn main() {
    let mut rows = vec![(
        "tiny (generated, 3.5 MB)",
        measure(&tiny_chat_model().display().to_string(), 256, "2048"),
    )];
    if let Some(path) = real_model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cargo run --release -p lumen-llama -- fetch-model smollm2",
    ) {
        rows.push((
            "SmolLM2-135M-Instruct Q4_1",
            measure(&path.display().to_string(), 128, "1024"),
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nlumen-llama sidecar, {cores} CPU cores, best of {RUNS}");
    println!(
        "| model | 1 stream tok/s | 4 streams tok/s (aggregate) | parallel/single | prompt tok/s |"
    );
    println!("|---|---|---|---|---|");
    for (name, f) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}x | {:.0} ({} tokens) |",
            f.single,
            f.parallel,
            f.parallel / f.single,
            f.prompt,
            f.prompt_tokens
        );
    }
}

fn measure(model_path: &str, max_tokens: u64, ctx: &str) -> Figures {
    let s = Sidecar::start(&[
        "--model".into(),
        format!("m={model_path}:ctx={ctx},slots=4"),
    ]);
    let port = s.port;
    // Warm-up: first-touch of weights and buffers.
    generate(port, 0, 8);

    let single = best(|| {
        let started = Instant::now();
        let n = generate(port, 1, max_tokens);
        n as f64 / started.elapsed().as_secs_f64()
    });
    let parallel = best(|| {
        let started = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|i| std::thread::spawn(move || generate(port, 10 + i, max_tokens)))
            .collect();
        let n: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
        n as f64 / started.elapsed().as_secs_f64()
    });
    let text = long_prompt(port, 512);
    let mut prompt_tokens = 0;
    let prompt = best(|| {
        let started = Instant::now();
        let (tokens, _) = complete(port, &text, 1);
        prompt_tokens = tokens;
        tokens as f64 / started.elapsed().as_secs_f64()
    });
    Figures {
        single,
        parallel,
        prompt,
        prompt_tokens,
    }
}

fn best(mut run: impl FnMut() -> f64) -> f64 {
    (0..RUNS).map(|_| run()).fold(0.0, f64::max)
}

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";

/// Ordinary English of about `target` tokens for this model's tokenizer, sized by measuring
/// one and two sentences.
fn long_prompt(port: u16, target: u64) -> String {
    let one = complete(port, SENTENCE, 1).0;
    let two = complete(port, &SENTENCE.repeat(2), 1).0;
    let per = (two - one).max(1);
    let base = one.saturating_sub(per);
    let n = ((target.saturating_sub(base) + per / 2) / per).max(1) as usize;
    SENTENCE.repeat(n)
}

/// A sampled chat completion; returns the completion tokens generated.
fn generate(port: u16, seed: u64, max_tokens: u64) -> u64 {
    let body = chat_with(
        "m",
        "Write a long story about a dragon who learns to sail.",
        json!({"temperature": 0.7, "seed": seed, "max_tokens": max_tokens}),
    );
    let r = sidecar::post(port, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0)
}

/// A text completion; returns (prompt tokens, completion tokens).
fn complete(port: u16, prompt: &str, max_tokens: u64) -> (u64, u64) {
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let r = sidecar::post(port, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json()["usage"];
    (
        usage["prompt_tokens"].as_u64().unwrap_or(0),
        usage["completion_tokens"].as_u64().unwrap_or(0),
    )
}
