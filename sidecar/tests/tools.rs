//! Tool calls, log probabilities, token counting and strict input, on the generated tiny model
//! through the real binary. The tiny model has random weights, so what it says means nothing;
//! what is checked is what the grammar and the server guarantee whatever the model says.

use lumen_test_support::openai::message_content;
use lumen_test_support::sidecar::{tiny_chat_model, Sidecar};
use lumen_test_support::sse::SseStream;
use serde_json::{json, Value};

fn tiny() -> Sidecar {
    Sidecar::start(&[
        "--model".into(),
        format!(
            "tiny={}:threads=1,ctx=2048,slots=2",
            tiny_chat_model().display()
        ),
    ])
}

/// A tool whose arguments are bounded (an enum), so even a random model's call ends.
fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                       "required": ["city"], "additionalProperties": false}
    }}, {"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["zone"], "additionalProperties": false}
    }}])
}

fn body(messages: Value, extra: Value) -> Value {
    let mut b = json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 120});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn post_ok(s: &Sidecar, body: &Value) -> Value {
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Reads a tool-calling stream: (content, calls as (id, name, arguments), finish_reason).
fn read_tool_stream(mut stream: SseStream) -> (String, Vec<(String, String, String)>, String) {
    let (mut content, mut calls, mut finish) = (
        String::new(),
        Vec::<(String, String, String)>::new(),
        String::new(),
    );
    let mut done = false;
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if let Some(id) = d["id"].as_str() {
                assert_eq!(i, calls.len(), "calls start in order");
                assert_eq!(d["type"], "function");
                calls.push((
                    id.into(),
                    d["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (content, calls, finish)
}

#[test]
fn required_tools_give_valid_calls_whole_and_streamed_and_the_conversation_goes_on() {
    let s = tiny();
    let messages = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let req = body(
        messages.clone(),
        json!({"tools": weather_tool(), "tool_choice": "required"}),
    );
    let r = post_ok(&s, &req);
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    for c in calls {
        assert_eq!(c["type"], "function");
        assert!(c["id"].as_str().unwrap().starts_with("call_"));
        let args: Value =
            serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
        match c["function"]["name"].as_str().unwrap() {
            "get_weather" => assert!(
                ["Paris", "Oslo"].contains(&args["city"].as_str().unwrap()),
                "{args}"
            ),
            "get_time" => assert!(
                ["UTC", "CET"].contains(&args["zone"].as_str().unwrap()),
                "{args}"
            ),
            other => panic!("unknown tool {other}"),
        }
    }

    // The same streamed: the same calls, arguments arriving in pieces.
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let (content, scalls, finish) = read_tool_stream(s.stream("/v1/chat/completions", &streamed));
    assert_eq!(finish, "tool_calls");
    assert!(content.is_empty(), "{content:?}");
    assert_eq!(scalls.len(), calls.len());
    for (sc, c) in scalls.iter().zip(calls) {
        assert_eq!(sc.1, c["function"]["name"]);
        assert_eq!(sc.2, c["function"]["arguments"]);
    }

    // The tool's answer goes back; with tool_choice none the model answers in text.
    let mut history = messages.as_array().unwrap().clone();
    history.push(choice["message"].clone());
    for c in calls {
        history.push(json!({"role": "tool", "tool_call_id": c["id"], "content": "18 C, sunny"}));
    }
    let r = post_ok(
        &s,
        &body(
            Value::Array(history.clone()),
            json!({"tools": weather_tool(), "tool_choice": "none", "max_tokens": 8}),
        ),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(message_content(&r).chars().count(), 8);
}

#[test]
fn a_named_tool_and_no_parallel_calls_are_honoured() {
    let s = tiny();
    let req = body(
        json!([{"role": "user", "content": "Time?"}]),
        json!({"tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "get_time"}},
               "parallel_tool_calls": false}),
    );
    let r = post_ok(&s, &req);
    let calls = r["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    assert_eq!(calls[0]["function"]["name"], "get_time");
}

#[test]
fn auto_answers_either_text_or_calls_never_raw_json() {
    // With `auto` the grammar allows an answer or calls. Sampled over several seeds, the random
    // tiny model takes both ways; each answer must be one well-formed shape or the other.
    let s = tiny();
    let (mut texts, mut calls) = (0, 0);
    for seed in 0..12 {
        let req = body(
            json!([{"role": "user", "content": "Hi"}]),
            json!({"tools": weather_tool(), "max_tokens": 200, "temperature": 1.0, "seed": seed}),
        );
        let r = post_ok(&s, &req);
        let choice = &r["choices"][0];
        let msg = &choice["message"];
        match msg.get("tool_calls") {
            Some(list) => {
                calls += 1;
                let list = list.as_array().unwrap();
                assert!(!list.is_empty());
                assert_eq!(msg["content"], Value::Null);
                // The tiny model spends a token per character: 200 is room for whole calls.
                assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
                for call in list {
                    let name = call["function"]["name"].as_str().unwrap();
                    assert!(["get_weather", "get_time"].contains(&name), "{name}");
                    let args = call["function"]["arguments"].as_str().unwrap();
                    let args: Value = serde_json::from_str(args).expect("arguments are JSON");
                    assert!(args.is_object(), "{args}");
                }
            }
            None => {
                texts += 1;
                let text = msg["content"].as_str().unwrap();
                assert!(
                    !text.starts_with("{\"response\""),
                    "the JSON wrapper is removed: {text:?}"
                );
                assert!(
                    ["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()),
                    "{r}"
                );
            }
        }
    }
    assert!(texts > 0 && calls > 0, "{texts} texts, {calls} calls");
}

#[test]
fn logprobs_come_in_openai_shapes_whole_and_streamed() {
    let s = tiny();
    let req = body(
        json!([{"role": "user", "content": "Hi"}]),
        json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 6}),
    );
    let r = post_ok(&s, &req);
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    let mut text = String::new();
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        // Greedy decoding picks the most likely token.
        assert_eq!(top[0]["token"], t["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        text.push_str(&String::from_utf8(bytes).unwrap());
    }
    assert_eq!(text, message_content(&r));

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let mut stream = s.stream("/v1/chat/completions", &streamed);
    let mut tokens = Vec::new();
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            tokens.extend(c.iter().cloned());
        }
    }
    assert_eq!(&tokens, content);

    // Legacy completions: `logprobs: 2`.
    let r = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "ab", "temperature": 0, "max_tokens": 4, "logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let lp = &r.json()["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);

    // Not asked for: null.
    let r = post_ok(
        &s,
        &body(
            json!([{"role": "user", "content": "Hi"}]),
            json!({"max_tokens": 2}),
        ),
    );
    assert_eq!(r["choices"][0]["logprobs"], Value::Null);
}

#[test]
fn tokenize_counts_what_a_chat_request_reports() {
    let s = tiny();
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let r = post_ok(&s, &body(messages.clone(), json!({"max_tokens": 1})));
    let t = s.post("/tokenize", &json!({"model": "tiny", "messages": messages}));
    assert_eq!(t.status, 200, "{}", t.text());
    assert_eq!(t.json()["count"], r["usage"]["prompt_tokens"]);
    // With tools, the count includes their instructions, as the chat request renders them.
    let with_tools = json!({"tools": weather_tool(), "tool_choice": "auto"});
    let r = post_ok(&s, &body(messages.clone(), with_tools.clone()));
    let mut ask = json!({"model": "tiny", "messages": messages});
    ask["tools"] = with_tools["tools"].clone();
    ask["tool_choice"] = with_tools["tool_choice"].clone();
    let t = s.post("/tokenize", &ask).json();
    assert_eq!(t["count"], r["usage"]["prompt_tokens"]);
    assert!(t["count"].as_u64() > Some(100), "{}", t["count"]);
    ask["with_tokens"] = json!(false);
    let t = s.post("/tokenize", &ask).json();
    assert_eq!(t, json!({"count": r["usage"]["prompt_tokens"]}));

    let t = s
        .post(
            "/tokenize",
            &json!({"content": "abc", "add_special": false, "with_pieces": true}),
        )
        .json();
    assert_eq!(t["count"], 3);
    assert_eq!(t["pieces"], json!(["a", "b", "c"]));
    let d = s.post("/detokenize", &json!({"tokens": t["tokens"]}));
    assert_eq!(d.json()["content"], "abc");

    for (path, bad, param) in [
        (
            "/tokenize",
            json!({"content": "a", "messages": []}),
            "content",
        ),
        ("/detokenize", json!({"tokens": [1, -5]}), "tokens[1]"),
        (
            "/tokenize",
            json!({"model": "nope", "content": "a"}),
            "model",
        ),
    ] {
        let r = s.post(path, &bad);
        assert!(
            r.status == 400 || r.status == 404,
            "{path} {bad}: {}",
            r.status
        );
        assert_eq!(r.json()["error"]["param"], param, "{path} {bad}");
    }
}

#[test]
fn unsupported_input_is_a_400_naming_the_field() {
    let s = tiny();
    for (extra, messages, param) in [
        (
            json!({}),
            json!([{"role": "wizard", "content": "hi"}]),
            "messages[0].role",
        ),
        (
            json!({"n": 2}),
            json!([{"role": "user", "content": "hi"}]),
            "n",
        ),
        (
            json!({}),
            json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
            "messages[0].content[0].type",
        ),
        (
            json!({}),
            json!([{"role": "tool", "content": "x", "tool_call_id": "call_1"}]),
            "messages[0].tool_call_id",
        ),
        (
            json!({"tools": [{"type": "file_search"}]}),
            json!([{"role": "user", "content": "hi"}]),
            "tools[0].type",
        ),
        (
            json!({"tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            json!([{"role": "user", "content": "hi"}]),
            "tool_choice.function.name",
        ),
        (
            json!({"tools": weather_tool(), "response_format": {"type": "json_object"}}),
            json!([{"role": "user", "content": "hi"}]),
            "response_format",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 50}),
            json!([{"role": "user", "content": "hi"}]),
            "top_logprobs",
        ),
    ] {
        let r = s.post(
            "/v1/chat/completions",
            &body(messages.clone(), extra.clone()),
        );
        assert_eq!(r.status, 400, "{extra} {messages}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
}
