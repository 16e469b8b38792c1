//! The prompt cache on the generated tiny model: a slot keeps its KV cache after a request, the
//! next request that shares a long enough prefix goes to that slot and processes only the rest,
//! and the answer is byte-identical to the one computed from scratch.

use lumen_test_support::openai::message_content;
use lumen_test_support::sidecar::{tiny_chat_model, Sidecar};
use lumen_test_support::sse::read_chat_stream;
use serde_json::{json, Value};
use std::time::Duration;

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
fn the_answer_is_read_again_while_idle_so_the_next_turn_finds_it_cached() {
    // An answer's cells, generated one token at a time, are dropped (they would not give a
    // cold start's answer); while the engine is idle the answer is read again as a batch, so
    // the next turn finds it cached anyway. `cache_generated` keeps the generated cells
    // instead, as llama-server does. A turn sent before the refill ends reads the answer with
    // its prompt, as without it.
    for (opts, refilled) in [("", 11.0), (",cache_generated=true", 0.0)] {
        let s = tiny(&format!("ctx=1024,slots=1,min_prefix=16{opts}"));
        let mut messages = vec![json!({"role": "system", "content": system("rivers")})];
        messages.push(json!({"role": "user", "content": "Hello"}));
        let first = ask(&s, &Value::Array(messages.clone()), json!({}));
        assert_eq!(first["usage"]["completion_tokens"], 12);
        // 12 tokens generated, 11 fed back (the last one is never decoded): 11 read again.
        assert!(
            s.eventually(Duration::from_secs(10), |s| {
                s.metric("lumen_llama_prompt_cache_refilled_total", "tiny", None) == refilled
            }),
            "{opts}: refilled {}",
            s.metric("lumen_llama_prompt_cache_refilled_total", "tiny", None)
        );
        messages.push(json!({"role": "assistant", "content": message_content(&first)}));
        messages.push(json!({"role": "user", "content": "Tell me more"}));
        let second = ask(&s, &Value::Array(messages), json!({}));
        let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
        // Only the new turn (33 tokens) and the answer's last token are read.
        assert_eq!(prompt - cached(&second), 34, "{opts}: of {prompt}");
        // Reading again happens only while idle, and never counts as a request's prompt.
        assert_eq!(
            s.metric("lumen_llama_prompt_tokens_total", "tiny", None) as u64
                + cached(&first)
                + cached(&second),
            first["usage"]["prompt_tokens"].as_u64().unwrap() + prompt
        );
    }
}

#[test]
fn a_conversation_evicted_from_its_slot_is_restored_from_host_memory() {
    // One slot, two conversations taking turns: each turn evicts the other conversation. With
    // prompt_cache_ram the evicted cache is saved and restored for its next turn; the answers
    // stay those of a cold start.
    let ram = tiny("ctx=1024,slots=1,min_prefix=32,prompt_cache_ram=64MiB");
    let none = tiny("ctx=1024,slots=1,min_prefix=32");
    let cold = tiny("ctx=1024,slots=1,prompt_cache=false");
    let topics = ["trains", "cheese"];
    let mut histories: Vec<Vec<Value>> = topics
        .iter()
        .map(|t| vec![json!({"role": "system", "content": system(t)})])
        .collect();
    let system_tokens = system("trains").len() as u64;
    for (round, turn) in ["Hi", "And then?", "Go on"].iter().enumerate() {
        for h in histories.iter_mut() {
            h.push(json!({"role": "user", "content": turn}));
            let messages = Value::Array(h.clone());
            let (r, n, c) = (
                ask(&ram, &messages, json!({})),
                ask(&none, &messages, json!({})),
                ask(&cold, &messages, json!({})),
            );
            assert_eq!(message_content(&r), message_content(&c), "round {round}");
            assert_eq!(message_content(&n), message_content(&c), "round {round}");
            if round > 0 {
                assert!(
                    cached(&r) > system_tokens,
                    "round {round}: {} restored",
                    cached(&r)
                );
                // Without host memory only the few tokens both system prompts start with.
                assert!(
                    cached(&n) < system_tokens / 2,
                    "round {round}: {} kept without prompt_cache_ram",
                    cached(&n)
                );
            }
            h.push(json!({"role": "assistant", "content": message_content(&r)}));
        }
    }
    // Every turn but the first evicted the other conversation; every turn after round 0
    // restored its own.
    assert_eq!(
        ram.metric("lumen_llama_prompt_cache_restores_total", "tiny", None),
        4.0
    );
    assert_eq!(
        ram.metric("lumen_llama_prompt_cache_saves_total", "tiny", None),
        5.0
    );
    // The entry restored last left host memory; the other conversation's is there.
    assert_eq!(
        ram.metric("lumen_llama_prompt_cache_ram_entries", "tiny", None),
        1.0
    );
    assert!(ram.metric("lumen_llama_prompt_cache_ram_bytes", "tiny", None) > 0.0);
    assert_eq!(
        none.metric("lumen_llama_prompt_cache_saves_total", "tiny", None),
        0.0
    );
}

#[test]
fn host_memory_is_bounded_least_recently_saved_out_first() {
    // A budget that holds one evicted conversation: three conversations on one slot leave
    // only the most recently evicted one in host memory.
    let s = tiny("ctx=1024,slots=1,min_prefix=32,prompt_cache_ram=64MiB");
    let topics = ["ships", "ducks", "kites"];
    for t in topics {
        let messages =
            json!([{"role": "system", "content": system(t)}, {"role": "user", "content": "Hi"}]);
        ask(&s, &messages, json!({}));
    }
    let entry_bytes = s.metric("lumen_llama_prompt_cache_ram_bytes", "tiny", None)
        / s.metric("lumen_llama_prompt_cache_ram_entries", "tiny", None);
    assert_eq!(
        s.metric("lumen_llama_prompt_cache_ram_entries", "tiny", None),
        2.0
    );
    drop(s);
    // Now a budget of one and a half entries.
    let budget = (entry_bytes * 1.5) as u64;
    let s = tiny(&format!(
        "ctx=1024,slots=1,min_prefix=32,prompt_cache_ram={budget}"
    ));
    for t in topics {
        let messages =
            json!([{"role": "system", "content": system(t)}, {"role": "user", "content": "Hi"}]);
        ask(&s, &messages, json!({}));
    }
    assert_eq!(
        s.metric("lumen_llama_prompt_cache_ram_entries", "tiny", None),
        1.0
    );
    assert!(s.metric("lumen_llama_prompt_cache_ram_bytes", "tiny", None) <= budget as f64);
    // The newest evicted ("ducks") is restored; the oldest ("ships") starts over but for the
    // shared opening.
    let back = |t: &str| {
        let messages =
            json!([{"role": "system", "content": system(t)}, {"role": "user", "content": "Hi"}]);
        cached(&ask(&s, &messages, json!({})))
    };
    assert!(back("ducks") > system("ducks").len() as u64);
    assert!(back("ships") < system("ships").len() as u64 / 2);
}
