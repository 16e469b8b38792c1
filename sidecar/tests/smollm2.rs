//! A real instruct model: SmolLM2-135M-Instruct (Q4_1), served with its checksum verified.
//! Skipped, with a message saying how to fetch it, only when the file is absent.

use lumen_test_support::openai::message_content;
use lumen_test_support::sidecar::{real_model, Sidecar};
use lumen_test_support::sse::read_chat_stream;
use serde_json::{json, Value};
use std::time::Duration;

const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn smollm2() -> Option<Sidecar> {
    smollm2_with("")
}

/// SmolLM2 with extra model options (`,key=value...`).
fn smollm2_with(opts: &str) -> Option<Sidecar> {
    let path = real_model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cargo run --release -p lumen-llama -- fetch-model smollm2",
    )?;
    Some(Sidecar::start(&[
        "--model".into(),
        format!(
            "smollm2={}:ctx=1024,slots=2,sha256={SHA256}{opts}",
            path.display()
        ),
    ]))
}

fn ask(s: &Sidecar, body: &Value) -> Value {
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn answers_a_factual_question() {
    let Some(s) = smollm2() else { return };
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "temperature": 0,
        "seed": 42,
        "max_tokens": 16,
    });
    let r = ask(&s, &body);
    assert!(
        message_content(&r).contains("Paris"),
        "{:?}",
        message_content(&r)
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // The same request streamed gives the same text, and the same usage.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let got = read_chat_stream(s.stream("/v1/chat/completions", &streamed));
    assert_eq!(got.text, message_content(&r));
    assert_eq!(got.finish_reason.as_deref(), Some("stop"));
    assert_eq!(got.usage.as_ref(), Some(&r["usage"]));
}

#[test]
fn sampled_stream_matches_non_stream_for_the_same_seed() {
    let Some(s) = smollm2() else { return };
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 7,
        "max_tokens": 40,
    });
    let r = ask(&s, &body);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let got = read_chat_stream(s.stream("/v1/chat/completions", &streamed));
    assert!(!got.text.is_empty());
    assert_eq!(got.text, message_content(&r));
}

#[test]
fn json_object_is_a_json_object() {
    let Some(s) = smollm2() else { return };
    let r = ask(
        &s,
        &json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Describe a cat as a JSON object with the keys name and age."}],
            "temperature": 0,
            "max_tokens": 200,
            "response_format": {"type": "json_object"},
        }),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let v: Value = serde_json::from_str(message_content(&r))
        .unwrap_or_else(|e| panic!("{e}: {:?}", message_content(&r)));
    assert!(v.is_object(), "{v}");
}

#[test]
fn max_tokens_5_is_length_with_5_tokens() {
    let Some(s) = smollm2() else { return };
    let r = ask(
        &s,
        &json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Tell me a long story about dragons."}],
            "temperature": 0,
            "max_tokens": 5,
        }),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 5);
    let total = r["usage"]["prompt_tokens"].as_u64().unwrap() + 5;
    assert_eq!(r["usage"]["total_tokens"], total);
}

#[test]
fn stop_sequences_cut_real_text() {
    let Some(s) = smollm2() else { return };
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What are the seven days of the week? List them."}],
        "temperature": 0,
        "max_tokens": 40,
    });
    let full = ask(&s, &body);
    let full_text = message_content(&full);
    let at = full_text
        .find("Wednes")
        .unwrap_or_else(|| panic!("{full_text:?}"));

    // "Wednes" ends inside a token: the text must stop right before it, mid-token.
    for stream in [false, true] {
        let mut stopped = body.clone();
        stopped["stop"] = json!(["Wednes", "never said"]);
        stopped["stream"] = json!(stream);
        let (text, finish) = if stream {
            let got = read_chat_stream(s.stream("/v1/chat/completions", &stopped));
            (got.text, got.finish_reason.unwrap_or_default())
        } else {
            let r = ask(&s, &stopped);
            (
                message_content(&r).to_string(),
                r["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        assert_eq!(text, &full_text[..at], "stream={stream}");
        assert_eq!(finish, "stop", "stream={stream}");
    }
}

#[test]
fn a_reused_prefix_answers_byte_for_byte_as_a_cold_start() {
    // Turns sent back to back: each reads the last answer with its prompt.
    reused_prefix_matches_a_cold_start(false);
}

#[test]
fn an_answer_read_again_while_idle_answers_byte_for_byte_as_a_cold_start() {
    // Turns sent once the sidecar is idle: the last answer was read again meanwhile, in
    // batches, and the next turn finds all of it cached.
    reused_prefix_matches_a_cold_start(true);
}

fn reused_prefix_matches_a_cold_start(idle: bool) {
    let Some(warm) = smollm2() else { return };
    let Some(cold) = smollm2_with(",prompt_cache=false") else {
        return;
    };
    let system = "You are a patient tutor who explains geography to children. ".repeat(6);
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut last_prompt = 0;
    let mut last_answer = 0;
    for (turn, question) in [
        "What is the capital of France?",
        "What river runs through it?",
        "Name one famous building there.",
    ]
    .iter()
    .enumerate()
    {
        messages.push(json!({"role": "user", "content": question}));
        let body =
            json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 24});
        let (w, c) = (ask(&warm, &body), ask(&cold, &body));
        assert_eq!(message_content(&w), message_content(&c), "turn {turn}");
        let cached = w["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let prompt = w["usage"]["prompt_tokens"].as_u64().unwrap();
        if turn > 0 {
            assert!(
                cached > prompt / 2,
                "turn {turn}: {cached} of {prompt} cached"
            );
            if idle {
                // All of the last prompt and all but a token or two of its answer (the last
                // one was never fed back; the template may tokenize the seam differently).
                assert!(
                    cached + 3 >= last_prompt + last_answer,
                    "turn {turn}: {cached} cached; the last prompt was {last_prompt} and its \
                     answer {last_answer} tokens"
                );
            }
        }
        assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        last_prompt = prompt;
        last_answer = w["usage"]["completion_tokens"].as_u64().unwrap();
        messages.push(json!({"role": "assistant", "content": message_content(&w)}));
        if idle {
            assert!(warm.eventually(Duration::from_secs(30), |s| {
                s.metric("lumen_llama_prompt_cache_refill_pending", "smollm2", None) == 0.0
            }));
        }
    }
    if idle {
        assert!(warm.metric("lumen_llama_prompt_cache_refilled_total", "smollm2", None) > 0.0);
    }
}

#[test]
fn a_conversation_restored_from_host_memory_answers_byte_for_byte_as_a_cold_start() {
    // One slot, two conversations taking turns: each turn evicts the other, which is saved to
    // host memory and restored for its next turn.
    let Some(warm) = smollm2_with(",slots=1,prompt_cache_ram=256MiB") else {
        return;
    };
    let Some(cold) = smollm2_with(",slots=1,prompt_cache=false") else {
        return;
    };
    let mut chats: Vec<Vec<Value>> = ["geography", "astronomy"]
        .iter()
        .map(|topic| {
            let system = format!("You are a patient tutor who explains {topic} to children. ");
            vec![json!({"role": "system", "content": system.repeat(6)})]
        })
        .collect();
    for (round, question) in ["Tell me one fact.", "Tell me another.", "Why is that?"]
        .iter()
        .enumerate()
    {
        for chat in chats.iter_mut() {
            chat.push(json!({"role": "user", "content": question}));
            let body =
                json!({"model": "smollm2", "messages": chat, "temperature": 0, "max_tokens": 24});
            let (w, c) = (ask(&warm, &body), ask(&cold, &body));
            assert_eq!(message_content(&w), message_content(&c), "round {round}");
            let cached = w["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            let prompt = w["usage"]["prompt_tokens"].as_u64().unwrap();
            if round > 0 {
                assert!(cached > prompt / 2, "round {round}: {cached} of {prompt}");
            }
            chat.push(json!({"role": "assistant", "content": message_content(&w)}));
        }
    }
    assert_eq!(
        warm.metric("lumen_llama_prompt_cache_restores_total", "smollm2", None),
        4.0
    );
}
