//! Chat and text completion through the real binary and real llama.cpp, on the generated tiny
//! model. Its greedy output is deterministic, never ends on its own, and is one printable ASCII
//! character per token, so lengths, usage and stop strings are checked exactly.

use std::time::Duration;

use lumen_test_support::json_prefix::is_json_prefix;
use lumen_test_support::openai::{chat_with, message_content};
use lumen_test_support::sidecar::{self, tiny_chat_model, Sidecar};
use lumen_test_support::sse::{read_chat_stream, SseStream};
use serde_json::{json, Value};

/// `--model tiny=<generated model>:<opts>` (one engine thread, to be kind to a 2-core CI box).
fn tiny(opts: &str) -> Vec<String> {
    vec![
        "--model".into(),
        format!("tiny={}:threads=1,{opts}", tiny_chat_model().display()),
    ]
}

#[test]
fn health_is_503_while_loading_then_200_with_free_slots() {
    let mut args = tiny("slots=4");
    args.extend(["--load-delay-ms".into(), "5000".into()]);
    let s = Sidecar::spawn(&args);

    let r = s.get("/health");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["status"], "loading");
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "hi", json!({"temperature": 0, "max_tokens": 1})),
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "model_loading");
    assert_eq!(r.header("retry-after"), Some("1"));

    s.wait_healthy();
    let h = s.get("/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["models"]["tiny"]["slots_free"], 4);
    assert_eq!(h["models"]["tiny"]["slots_busy"], 0);
}

#[test]
fn chat_reports_exact_usage_and_length() {
    let s = Sidecar::start(&tiny("ctx=512"));
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "Hello", json!({"temperature": 0, "max_tokens": 20})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    // BOS, <|im_start|>, "user", "\n", "Hello", <|im_end|>, "\n", <|im_start|>, "assistant",
    // "\n": 1+1+4+1+5+1+1+1+9+1 tokens, one per character outside the control tokens.
    assert_eq!(r["usage"]["prompt_tokens"], 25);
    assert_eq!(r["usage"]["completion_tokens"], 20);
    assert_eq!(r["usage"]["total_tokens"], 45);
    assert_eq!(
        message_content(&r).chars().count(),
        20,
        "{:?}",
        message_content(&r)
    );

    let again = s
        .post(
            "/v1/chat/completions",
            &chat_with("tiny", "Hello", json!({"temperature": 0, "max_tokens": 20})),
        )
        .json();
    assert_eq!(
        message_content(&again),
        message_content(&r),
        "greedy decoding is deterministic"
    );
}

#[test]
fn stream_gives_the_same_text_as_non_stream() {
    let s = Sidecar::start(&tiny("ctx=512"));
    let body = chat_with(
        "tiny",
        "Tell me",
        json!({"temperature": 0, "max_tokens": 24}),
    );
    let whole = s.post("/v1/chat/completions", &body).json();

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let stream = s.stream("/v1/chat/completions", &streamed);
    assert_eq!(stream.status, 200);
    assert!(
        stream
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let got = read_chat_stream(stream);
    assert_eq!(got.first_role.as_deref(), Some("assistant"));
    assert_eq!(got.text, message_content(&whole));
    assert_eq!(got.finish_reason.as_deref(), Some("length"));
    assert_eq!(got.usage.as_ref(), Some(&whole["usage"]));
    assert!(got.ended_with_done);
}

#[test]
fn stop_strings_end_generation_and_are_never_emitted() {
    let s = Sidecar::start(&tiny("ctx=512"));
    let full = s
        .post(
            "/v1/chat/completions",
            &chat_with("tiny", "abc", json!({"temperature": 0, "max_tokens": 40})),
        )
        .json();
    let full = message_content(&full).to_string();
    assert_eq!(full.chars().count(), 40);
    // A 3-character stop string from the middle of what the model says anyway.
    let stop: String = full.chars().skip(10).take(3).collect();
    let at = full.find(&stop).expect("stop comes from the text");
    let expected = &full[..at];

    for stream in [false, true] {
        let body = chat_with(
            "tiny",
            "abc",
            json!({"temperature": 0, "max_tokens": 40, "stop": ["never-said", stop],
                   "stream": stream, "stream_options": {"include_usage": true}}),
        );
        let (text, finish, usage) = if stream {
            let got = read_chat_stream(s.stream("/v1/chat/completions", &body));
            (
                got.text,
                got.finish_reason.unwrap_or_default(),
                got.usage.unwrap_or_default(),
            )
        } else {
            let r = s.post("/v1/chat/completions", &body).json();
            (
                message_content(&r).to_string(),
                r["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["usage"].clone(),
            )
        };
        assert_eq!(text, expected, "stream={stream}");
        assert_eq!(finish, "stop", "stream={stream}");
        // Tokens generated up to and including the one that completed the stop string.
        assert_eq!(usage["completion_tokens"], at + 3, "stream={stream}");
    }

    let single = s
        .post(
            "/v1/chat/completions",
            &chat_with(
                "tiny",
                "abc",
                json!({"temperature": 0, "max_tokens": 40, "stop": stop}),
            ),
        )
        .json();
    assert_eq!(message_content(&single), expected, "stop as a plain string");
}

#[test]
fn text_completions_default_to_16_tokens() {
    let s = Sidecar::start(&tiny("ctx=512"));
    let r = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon", "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 16);
    assert_eq!(r["usage"]["prompt_tokens"], 10); // BOS + 9 characters
    assert_eq!(
        r["choices"][0]["text"].as_str().unwrap().chars().count(),
        16
    );

    let mut streamed =
        json!({"model": "tiny", "prompt": "Once upon", "temperature": 0, "stream": true});
    streamed["max_tokens"] = json!(16);
    let got = read_chat_stream(s.stream("/v1/completions", &streamed));
    assert_eq!(got.text, r["choices"][0]["text"].as_str().unwrap());
    assert!(got.ended_with_done);
}

#[test]
fn json_object_output_follows_the_json_grammar() {
    let s = Sidecar::start(&tiny("ctx=1024"));
    // A random-weight model wanders inside a JSON string, so it may not close the object within
    // max_tokens; whatever it wrote must still be a prefix of valid JSON, and starts an object.
    for seed in [1, 2, 3] {
        let r = s
            .post(
                "/v1/chat/completions",
                &chat_with(
                    "tiny",
                    "json",
                    json!({"max_tokens": 120, "temperature": 1.0, "seed": seed,
                           "response_format": {"type": "json_object"}}),
                ),
            )
            .json();
        let text = message_content(&r);
        assert!(text.starts_with('{'), "{text:?}");
        match r["choices"][0]["finish_reason"].as_str() {
            Some("stop") => {
                let v: Value = serde_json::from_str(text).expect("complete JSON");
                assert!(v.is_object());
            }
            Some("length") => assert!(is_json_prefix(text), "not a JSON prefix: {text:?}"),
            other => panic!("finish_reason {other:?}"),
        }
    }
    // A schema with nothing open-ended: the grammar must close the object and then force the
    // end of generation, so this one finishes with "stop" and parses.
    let schema = json!({
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]}},
        "required": ["ok", "colour"],
        "additionalProperties": false
    });
    let r = s
        .post(
            "/v1/chat/completions",
            &chat_with(
                "tiny",
                "json",
                json!({"temperature": 0, "max_tokens": 60,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
            ),
        )
        .json();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let v: Value = serde_json::from_str(message_content(&r)).expect("schema output parses");
    assert!(v["ok"].is_boolean(), "{v}");
    assert!(v["colour"] == "red" || v["colour"] == "green", "{v}");
}

#[test]
fn eight_concurrent_requests_on_four_slots_complete_and_are_batched() {
    let s = Sidecar::start(&tiny("ctx=512,slots=4,queue=8"));
    let port = s.port;
    let workers: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let body = chat_with(
                    "tiny",
                    &format!("request number {i}"),
                    json!({"max_tokens": 128, "temperature": 0.7, "seed": i}),
                );
                sidecar::post(port, "/v1/chat/completions", &body)
            })
        })
        .collect();
    for w in workers {
        let r = w.join().expect("worker");
        assert_eq!(r.status, 200, "{}", r.text());
        let r = r.json();
        assert_eq!(r["usage"]["completion_tokens"], 128);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
    }
    let batches = s.metric("lumen_llama_batch_sequences_count", "tiny", None);
    let single = s.metric(
        "lumen_llama_batch_sequences_bucket",
        "tiny",
        Some("le=\"1\""),
    );
    let at_most_four = s.metric(
        "lumen_llama_batch_sequences_bucket",
        "tiny",
        Some("le=\"4\""),
    );
    assert!(batches > 0.0);
    assert!(
        batches - single > 0.0,
        "no decode step carried more than one sequence ({batches} steps)"
    );
    assert_eq!(at_most_four, batches, "never more sequences than slots");
    assert_eq!(
        s.metric("lumen_llama_completion_tokens_total", "tiny", None),
        8.0 * 128.0
    );
    assert_eq!(s.metric("lumen_llama_requests_total", "tiny", None), 8.0);
    // A slot is released just after its last event is handed over, so allow a moment.
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.health_of("tiny")
            ["slots_busy"]
            == 0)
    );
}

/// A streamed request with room for thousands of tokens, whose client reads one chunk and
/// then stops reading: its slot stays busy (generating, then paused by backpressure).
fn occupy_slot(s: &Sidecar) -> SseStream {
    let mut stream = s.stream(
        "/v1/chat/completions",
        &chat_with(
            "tiny",
            "hold",
            json!({"temperature": 0, "max_tokens": 15000, "stream": true}),
        ),
    );
    assert_eq!(stream.status, 200);
    // The role chunk comes before the engine takes the job; the first text chunk comes after.
    assert!(stream.next_data().is_some());
    assert!(stream.next_data().is_some());
    stream
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = Sidecar::start(&tiny("ctx=16384,slots=1,queue=1"));
    let busy = occupy_slot(&s);
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.health_of("tiny")
            ["slots_busy"]
            == 1)
    );
    // The second request waits in the queue (its headers come back at once: it is a stream).
    let queued = s.stream(
        "/v1/chat/completions",
        &chat_with(
            "tiny",
            "wait",
            json!({"temperature": 0, "max_tokens": 5, "stream": true}),
        ),
    );
    assert_eq!(queued.status, 200);
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.health_of("tiny")
            ["queue_depth"]
            == 1)
    );

    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "third", json!({"temperature": 0, "max_tokens": 5})),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let e = r.json();
    assert_eq!(e["error"]["code"], "server_overloaded");
    assert_eq!(e["error"]["type"], "server_error");
    assert_eq!(
        s.metric("lumen_llama_requests_rejected_total", "tiny", None),
        1.0
    );

    drop(busy);
    // The queued request now gets the slot and finishes normally.
    let got = read_chat_stream(queued);
    assert_eq!(got.finish_reason.as_deref(), Some("length"));
    assert!(
        s.eventually(Duration::from_secs(60), |s| s.health_of("tiny")
            ["slots_busy"]
            == 0)
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let s = Sidecar::start(&tiny("ctx=16384,slots=1,queue=4"));
    for stream in [true, false] {
        let before = s.metric("lumen_llama_requests_cancelled_total", "tiny", None);
        if stream {
            let busy = occupy_slot(&s);
            assert_eq!(s.health_of("tiny")["slots_busy"], 1);
            drop(busy);
        } else {
            // A non-streaming request, abandoned while it is generating.
            let port = s.port;
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let body = chat_with(
                "tiny",
                "hold",
                json!({"temperature": 0, "max_tokens": 15000}),
            )
            .to_string();
            use std::io::Write;
            write!(
                conn,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            assert!(
                s.eventually(Duration::from_secs(30), |s| s.health_of("tiny")
                    ["slots_busy"]
                    == 1)
            );
            drop(conn);
        }
        assert!(
            s.eventually(Duration::from_secs(60), |s| s.health_of("tiny")
                ["slots_busy"]
                == 0),
            "slot still busy after the client left (stream={stream})"
        );
        assert_eq!(
            s.metric("lumen_llama_requests_cancelled_total", "tiny", None),
            before + 1.0,
            "the engine saw the disconnect (stream={stream})"
        );
    }
    // Far fewer tokens than the two abandoned requests asked for were generated.
    assert!(s.metric("lumen_llama_completion_tokens_total", "tiny", None) < 15000.0);
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "after", json!({"temperature": 0, "max_tokens": 3})),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
}

#[test]
fn a_client_that_stops_reading_loses_its_slot_after_the_stall_limit() {
    // A 4 KiB model name goes into every SSE chunk, so the socket buffers (megabytes on
    // loopback) fill after about a thousand tokens rather than tens of thousands. And a short
    // stall limit, so the test does not wait the default 30 s.
    let name = "t".repeat(4096);
    let args = vec![
        "--model".into(),
        format!(
            "{name}={}:threads=1,ctx=16384,slots=1,queue=4",
            tiny_chat_model().display()
        ),
    ];
    let s = Sidecar::start_with_env(&args, &[("LUMEN_LLAMA_STALL_TIMEOUT_MS", "300")]);
    // Reads the role chunk, then nothing, while keeping the connection open: the socket
    // buffers and the event channel fill, and the slot pauses on a full outbox.
    let mut stuck = s.stream(
        "/v1/chat/completions",
        &chat_with(
            &name,
            "hold",
            json!({"temperature": 0, "max_tokens": 15000, "stream": true}),
        ),
    );
    assert_eq!(stuck.status, 200);
    assert!(stuck.next_data().is_some());
    // Wait for the stall itself, not for a free slot: the role chunk can go out before the
    // request has a slot, and a slot that is not taken yet is free too.
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.metric(
            "lumen_llama_requests_stalled_total",
            &name,
            None
        ) == 1.0),
        "a client that stopped reading was never counted as stalled"
    );
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.health_of(&name)
            ["slots_busy"]
            == 0),
        "the slot of a client that stopped reading was never freed"
    );
    assert_eq!(
        s.metric("lumen_llama_requests_cancelled_total", &name, None),
        0.0
    );
    // Ended long before its 15000 tokens: by the stall, not the token limit.
    assert!(s.metric("lumen_llama_completion_tokens_total", &name, None) < 15000.0);
    let warns = s
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("stopped reading"))
        .count();
    assert_eq!(warns, 1, "one warn line per stalled request");

    // The freed slot serves the next request.
    let r = s.post(
        "/v1/chat/completions",
        &chat_with(&name, "after", json!({"temperature": 0, "max_tokens": 3})),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    drop(stuck);
}

#[test]
fn over_long_prompts_are_400_context_length_exceeded() {
    let s = Sidecar::start(&tiny("ctx=64"));
    let long = "x".repeat(200);
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", &long, json!({"temperature": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "messages");

    // The prompt fits but prompt + max_tokens does not.
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "hi", json!({"temperature": 0, "max_tokens": 60})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");

    // Without max_tokens the reply fills what is left of the context, then stops: length.
    let r = s
        .post(
            "/v1/chat/completions",
            &chat_with("tiny", "hi", json!({"temperature": 0})),
        )
        .json();
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["total_tokens"], 64);

    let r = s.post("/v1/completions", &json!({"model": "tiny", "prompt": long}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "prompt");
    assert!(
        s.eventually(Duration::from_secs(30), |s| s.health_of("tiny")
            ["slots_busy"]
            == 0)
    );
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = Sidecar::start(&tiny("ctx=256"));
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["param"], "model");

    let r = s.post_raw("/v1/chat/completions", b"{not json");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "x", json!({"temperature": 5})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "temperature");

    let r = s.post("/v1/embeddings", &json!({"model": "tiny", "input": "x"}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "model_not_supported");

    let r = s.get("/v1/nothing-here");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());

    let models = s.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");

    // Still serving normally afterwards.
    let r = s.post(
        "/v1/chat/completions",
        &chat_with("tiny", "ok", json!({"temperature": 0, "max_tokens": 2})),
    );
    assert_eq!(r.status, 200);
}
