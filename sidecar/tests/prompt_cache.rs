//! The prompt cache on the generated tiny model: a slot keeps its KV cache after a request, the
//! next request that shares a long enough prefix goes to that slot and processes only the rest,
//! and the answer is byte-identical to the one computed from scratch.

use lumen_test_support::openai::message_content;
use lumen_test_support::sidecar::{tiny_chat_model, Sidecar};
use lumen_test_support::sse::read_chat_stream;
use serde_json::{json, Value};

fn tiny(opts: &str) -> Sidecar {
    Sidecar::start(&[
        "--model".into(),
        format!("tiny={}:threads=1,{opts}", tiny_chat_model().display()),
    ])
}

/// A system prompt of a few hundred tokens (the tiny model reads one token per character).
fn system(topic: &str) -> String {
    format!("You are a helpful assistant about {topic}. ").repeat(8)
}

fn ask(s: &Sidecar, messages: &Value, extra: Value) -> Value {
    let mut body =
        json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn cached(r: &Value) -> u64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {r}"))
}

/// Three turns of one conversation: each turn resends the history with the last answer.
fn conversation(s: &Sidecar, topic: &str, opening: &str) -> Vec<Value> {
    let mut messages = vec![json!({"role": "system", "content": system(topic)})];
    let mut answers = Vec::new();
    for turn in [opening, "Tell me more", "Why?"] {
        messages.push(json!({"role": "user", "content": turn}));
        let r = ask(s, &Value::Array(messages.clone()), json!({}));
        messages.push(json!({"role": "assistant", "content": message_content(&r)}));
        answers.push(r);
    }
    answers
}

#[test]
fn a_reused_prefix_gives_the_same_answers_as_a_cold_start_and_says_how_much_it_reused() {
    let warm = tiny("ctx=1024,slots=2,min_prefix=32");
    let cold = tiny("ctx=1024,slots=2,prompt_cache=false");

    let a = conversation(&warm, "boats", "Hello");
    let b = conversation(&cold, "boats", "Hello");
    for (turn, (w, c)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            message_content(w),
            message_content(c),
            "turn {turn}: the answer with a reused prefix differs from the cold one"
        );
        assert_eq!(w["usage"]["prompt_tokens"], c["usage"]["prompt_tokens"]);
        assert_eq!(
            cached(c),
            0,
            "turn {turn}: prompt_cache=false reuses nothing"
        );
    }
    assert_eq!(cached(&a[0]), 0, "the first turn finds nothing cached");
    let system_tokens = system("boats").len() as u64;
    for (turn, w) in a.iter().enumerate().skip(1) {
        let prompt = w["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            cached(w) > system_tokens && cached(w) < prompt,
            "turn {turn}: {} of {prompt} prompt tokens cached",
            cached(w)
        );
    }

    let reused = warm.metric("lumen_llama_prompt_tokens_cached_total", "tiny", None);
    let expected: u64 = a.iter().map(cached).sum();
    assert_eq!(reused as u64, expected);
    let processed = warm.metric("lumen_llama_prompt_tokens_total", "tiny", None) as u64;
    let prompts: u64 = a
        .iter()
        .map(|r| r["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        processed + expected,
        prompts,
        "every prompt token is either processed or reused"
    );
    assert_eq!(
        cold.metric("lumen_llama_prompt_tokens_cached_total", "tiny", None),
        0.0
    );

    // A second conversation with the same system prompt: the free slot gets a copy of the
    // first one's cache (which stays where it is), and the answers are still the cold ones.
    let c = conversation(&warm, "boats", "Good day");
    let d = conversation(&cold, "boats", "Good day");
    for (turn, (w, c)) in c.iter().zip(&d).enumerate() {
        assert_eq!(message_content(w), message_content(c), "turn {turn}");
    }
    assert!(cached(&c[0]) > system_tokens, "{}", c[0]);
    assert_eq!(
        warm.metric("lumen_llama_prompt_cache_copies_total", "tiny", None),
        1.0
    );
    // The first conversation still has its slot.
    let mut messages = vec![json!({"role": "system", "content": system("boats")})];
    for (r, turn) in a.iter().zip(["Hello", "Tell me more", "Why?"]) {
        messages.push(json!({"role": "user", "content": turn}));
        messages.push(json!({"role": "assistant", "content": message_content(r)}));
    }
    messages.push(json!({"role": "user", "content": "Again"}));
    let again = ask(&warm, &Value::Array(messages), json!({}));
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&again) + 50 > prompt,
        "{} of {prompt}",
        cached(&again)
    );
}

#[test]
fn each_conversation_returns_to_the_slot_that_holds_it() {
    // Two slots, two conversations taking turns: with least-recently-used alone, each turn
    // would land on the other conversation's slot; with prefix matching, each finds its own.
    let s = tiny("ctx=1024,slots=2,min_prefix=32");
    let topics = ["trains", "cheese"];
    let mut histories: Vec<Vec<Value>> = topics
        .iter()
        .map(|t| vec![json!({"role": "system", "content": system(t)})])
        .collect();
    for (round, turn) in ["Hi", "And then?", "Go on"].iter().enumerate() {
        for h in histories.iter_mut() {
            h.push(json!({"role": "user", "content": turn}));
            let r = ask(&s, &Value::Array(h.clone()), json!({}));
            h.push(json!({"role": "assistant", "content": message_content(&r)}));
            if round > 0 {
                let prompt = r["usage"]["prompt_tokens"].as_u64().unwrap();
                assert!(
                    cached(&r) + 50 > prompt,
                    "round {round}: only {} of {prompt} tokens reused",
                    cached(&r)
                );
            }
        }
    }
}

#[test]
fn a_repeated_prompt_reuses_all_but_its_last_token_and_streams_the_same_text() {
    let s = tiny("ctx=1024,slots=1,min_prefix=16");
    let messages =
        json!([{"role": "system", "content": system("maps")}, {"role": "user", "content": "Hi"}]);
    let first = ask(&s, &messages, json!({}));
    let again = ask(&s, &messages, json!({}));
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // The last prompt token is decoded again: sampling needs its logits.
    assert_eq!(cached(&again), prompt - 1);
    assert_eq!(message_content(&again), message_content(&first));

    let body = json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12,
        "stream": true, "stream_options": {"include_usage": true}});
    let streamed = read_chat_stream(s.stream("/v1/chat/completions", &body));
    assert_eq!(streamed.text, message_content(&first));
    let usage = streamed.usage.expect("usage chunk");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], prompt - 1);

    // A prompt sharing fewer than min_prefix tokens starts over.
    let other = ask(
        &s,
        &json!([{"role": "user", "content": "Something else"}]),
        json!({}),
    );
    assert_eq!(cached(&other), 0);
}

#[test]
fn cache_generated_keeps_the_answer_for_the_next_turn() {
    // By default a next turn reads the last answer again (byte-identical answers); with
    // cache_generated the answer's cells are kept, as llama-server keeps them.
    for (opts, answer_cached) in [("", false), (",cache_generated=true", true)] {
        let s = tiny(&format!("ctx=1024,slots=1,min_prefix=16{opts}"));
        let turns = conversation(&s, "rivers", "Hello");
        let prompt = turns[1]["usage"]["prompt_tokens"].as_u64().unwrap();
        // Turn 2 adds the 12-token answer and 33 tokens of new turn; with the answer cached,
        // only the new turn and the answer's last token (sampled, never fed) are read.
        let uncached = prompt - cached(&turns[1]);
        let expected = if answer_cached { 34 } else { 45 };
        assert_eq!(uncached, expected, "{opts}: {uncached} of {prompt} read");
    }
}
