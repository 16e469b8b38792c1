//! Tests of the stream codec: [`Assembler`] on streams split anywhere, well formed or not,
//! [`render_sse`] on answers valid or not, and answers rendered and assembled back.

use super::*;
use serde_json::{json, Value};

/// A chat stream as OpenAI sends it with `stream_options.include_usage`.
const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\u00e9\\n!\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
    "data: [DONE]\n\n",
);

fn chat_answer() -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-x",
        "system_fingerprint": "fp_1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello é\n!"},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    })
}

/// Assembles `pieces` pushed one after the other.
fn assemble_pieces<'a>(kind: Kind, pieces: impl IntoIterator<Item = &'a [u8]>) -> Option<Value> {
    let mut assembler = Assembler::new(kind, 1 << 20);
    for piece in pieces {
        assembler.push(piece);
    }
    let body = assembler.finish()?;
    Some(serde_json::from_slice(&body).expect("finish gives JSON"))
}

/// Assembles `bytes` pushed in chunks of `size`.
fn assemble(kind: Kind, bytes: &[u8], size: usize) -> Option<Value> {
    assemble_pieces(kind, bytes.chunks(size.max(1)))
}

fn assemble_str(kind: Kind, stream: &str) -> Option<Value> {
    assemble(kind, stream.as_bytes(), usize::MAX)
}

/// A chunk of a chat stream with `choices`, for short tests.
fn chat_chunk(choices: Value) -> String {
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": choices});
    format!("data: {chunk}\n\n")
}

fn chat_stream_of(chunks: &[Value]) -> String {
    let mut stream: String = chunks.iter().map(|c| chat_chunk(c.clone())).collect();
    stream.push_str("data: [DONE]\n\n");
    stream
}

#[test]
fn a_chat_stream_assembles_split_at_every_byte() {
    let bytes = CHAT_STREAM.as_bytes();
    for at in 0..=bytes.len() {
        let (a, b) = bytes.split_at(at);
        assert_eq!(
            assemble_pieces(Kind::Chat, [a, b]),
            Some(chat_answer()),
            "split at {at}"
        );
    }
    for size in 1..=bytes.len() {
        assert_eq!(
            assemble(Kind::Chat, bytes, size),
            Some(chat_answer()),
            "chunks of {size}"
        );
    }
}

#[test]
fn crlf_and_cr_line_ends_assemble_split_anywhere() {
    for end in ["\r\n", "\r"] {
        let stream = CHAT_STREAM.replace('\n', end);
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            let got = assemble_pieces(Kind::Chat, [a, &b""[..], b]);
            assert_eq!(got, Some(chat_answer()), "{end:?} split at {at}");
        }
        assert_eq!(assemble(Kind::Chat, bytes, 1), Some(chat_answer()));
    }
}

#[test]
fn comments_other_fields_and_multi_line_data_are_understood() {
    let stream = concat!(
        ": keep-alive\n\n",
        "id: 1\nretry: 100\nevent: message\n",
        "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\n",
        "data: \"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data:{\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data:\n\n",
        "data: [DONE]\n\n",
        "data: {\"error\":{\"message\":\"after the end\"}}\n\n",
        "data: not json either\n\n",
    );
    let body = assemble_str(Kind::Chat, stream).expect("assembles");
    assert_eq!(body["choices"][0]["message"]["content"], "a");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["model"], "m");
}

#[test]
fn a_stream_ending_right_after_done_assembles() {
    let stream = CHAT_STREAM.trim_end();
    assert!(stream.ends_with("[DONE]"));
    assert_eq!(assemble_str(Kind::Chat, stream), Some(chat_answer()));
}

#[test]
fn a_stream_without_done_does_not_assemble() {
    // Every prefix that stops before `data: [DONE]` is whole is a truncated stream.
    let whole = CHAT_STREAM.len() - "\n\n".len();
    for end in 0..whole {
        let prefix = &CHAT_STREAM.as_bytes()[..end];
        assert_eq!(
            assemble(Kind::Chat, prefix, 13),
            None,
            "prefix of {end} bytes"
        );
    }
    assert_eq!(assemble(Kind::Chat, b"", 1), None);
}

#[test]
fn an_error_event_does_not_assemble() {
    let cut = CHAT_STREAM.len() - "data: [DONE]\n\n".len();
    let (head, done) = CHAT_STREAM.split_at(cut);
    for error in [
        "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
        "event: error\ndata: {\"message\":\"overloaded\"}\n\n",
        "event: error\n\n",
    ] {
        let stream = format!("{head}{error}{done}");
        assert_eq!(assemble_str(Kind::Chat, &stream), None, "{error}");
    }
    let harmless = format!("{head}data: {{\"error\":null,\"choices\":[]}}\n\n{done}");
    assert_eq!(assemble_str(Kind::Chat, &harmless), Some(chat_answer()));
}

#[test]
fn malformed_events_do_not_assemble() {
    let cut = CHAT_STREAM.len() - "data: [DONE]\n\n".len();
    let (head, done) = CHAT_STREAM.split_at(cut);
    for bad in [
        "data: {not json}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]\n\n",
        "data: 42\n\n",
        "data: \"text\"\n\n",
        "data: [1]\n\n",
        "data: {\"choices\":{}}\n\n",
        "data: {\"choices\":[7]}\n\n",
        "data: {\"choices\":[{\"index\":\"0\",\"delta\":{}}]}\n\n",
        "data: {\"choices\":[{\"index\":-1,\"delta\":{}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":\"x\"}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":5}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":[\"a\"]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":1}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"function_call\":{\"name\":\"f\"}}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":{}}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[1]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":{}}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":1}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":[]}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":{\"content\":\"x\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":7}\n\n",
        "data: \u{7f}\u{0}\n\n",
    ] {
        let stream = format!("{head}{bad}{done}");
        assert_eq!(assemble_str(Kind::Chat, &stream), None, "{bad}");
    }
    let mut invalid_utf8 = head.as_bytes().to_vec();
    invalid_utf8.extend_from_slice(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"}}]}\n\n",
    );
    invalid_utf8.extend_from_slice(done.as_bytes());
    assert_eq!(assemble(Kind::Chat, &invalid_utf8, 5), None);
}

#[test]
fn a_stream_of_no_choice_does_not_assemble() {
    assert_eq!(assemble_str(Kind::Chat, "data: [DONE]\n\n"), None);
    assert_eq!(
        assemble_str(Kind::Chat, &chat_stream_of(&[json!([])])),
        None
    );
}

#[test]
fn the_limit_is_on_sse_bytes() {
    let bytes = CHAT_STREAM.as_bytes();
    let mut exact = Assembler::new(Kind::Chat, bytes.len());
    for piece in bytes.chunks(10) {
        exact.push(piece);
    }
    assert!(exact.finish().is_some());
    let mut over = Assembler::new(Kind::Chat, bytes.len() - 1);
    for piece in bytes.chunks(10) {
        over.push(piece);
    }
    assert_eq!(over.finish(), None);
    let mut zero = Assembler::new(Kind::Chat, 0);
    zero.push(b"");
    zero.push(b"d");
    assert_eq!(zero.finish(), None);
}

#[test]
fn tool_calls_merge_by_index() {
    let stream = chat_stream_of(&[
        json!([{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}}]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\":1}"}}]}}]),
        json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    ]);
    let body = assemble(Kind::Chat, stream.as_bytes(), 7).expect("assembles");
    assert_eq!(
        body["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get", "arguments": "{\"city\":1}"}},
                {"id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}}
            ]},
            "logprobs": null,
            "finish_reason": "tool_calls"
        }])
    );
}

#[test]
fn tool_calls_without_an_index_merge_by_position() {
    let stream = chat_stream_of(&[json!([{"index": 0, "delta": {"tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": "1"}},
        {"id": "b", "function": {"name": "g", "arguments": "2"}}]}, "finish_reason": "tool_calls"}])]);
    let body = assemble_str(Kind::Chat, &stream).expect("assembles");
    let calls = &body["choices"][0]["message"]["tool_calls"];
    assert_eq!(calls[0]["id"], "a");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[1]["function"]["arguments"], "2");
    assert_eq!(
        body["choices"][0]["message"]["role"], "assistant",
        "the default role"
    );
}

#[test]
fn choices_merge_by_index_and_come_out_sorted() {
    let stream = chat_stream_of(&[
        json!([{"index": 1, "delta": {"role": "assistant", "content": "B"}}]),
        json!([{"index": 0, "delta": {"role": "assistant", "content": "A"}}]),
        json!([{"index": 1, "delta": {"content": "b"}, "finish_reason": "length"},
               {"index": 0, "delta": {"content": "a"}}]),
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]);
    let body = assemble_str(Kind::Chat, &stream).expect("assembles");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["content"], "Aa");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][1]["index"], 1);
    assert_eq!(body["choices"][1]["message"]["content"], "Bb");
    assert_eq!(body["choices"][1]["finish_reason"], "length");
    assert!(body.get("usage").is_none(), "no usage came");
}

#[test]
fn refusals_reasoning_and_logprobs_are_concatenated() {
    let token = |t: &str| json!({"token": t, "logprob": -0.5, "bytes": null, "top_logprobs": []});
    let stream = chat_stream_of(&[
        json!([{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"},
                "logprobs": {"content": [token("I")], "refusal": null}}]),
        json!([{"index": 0, "delta": {"reasoning_content": "ing", "refusal": "I can"},
                "logprobs": {"content": [token("x"), token("y")]}}]),
        json!([{"index": 0, "delta": {"refusal": "not."}, "logprobs": null}]),
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]);
    let body = assemble_str(Kind::Chat, &stream).expect("assembles");
    let choice = &body["choices"][0];
    assert_eq!(
        choice["message"]["content"],
        Value::Null,
        "no content ever came"
    );
    assert_eq!(choice["message"]["refusal"], "I cannot.");
    assert_eq!(choice["message"]["reasoning_content"], "Thinking");
    assert_eq!(
        choice["logprobs"],
        json!({"content": [token("I"), token("x"), token("y")]})
    );
}

#[test]
fn the_header_comes_from_the_first_chunk_that_has_it() {
    let stream = concat!(
        "data: {\"id\":\"first\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"id\":\"second\",\"created\":2,\"model\":\"n\",\"system_fingerprint\":\"fp\",\"service_tier\":\"default\",\"choices\":[]}\n\n",
        "data: [DONE]\n\n",
    );
    let body = assemble_str(Kind::Chat, stream).expect("assembles");
    assert_eq!(body["id"], "first");
    assert_eq!(body["created"], 1);
    assert_eq!(body["model"], "m");
    assert_eq!(body["system_fingerprint"], "fp");
    assert_eq!(body["service_tier"], "default");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["finish_reason"], Value::Null);
}

#[test]
fn a_completion_stream_assembles() {
    let stream = concat!(
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"Once\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\" upon\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}]}\r\n\r\n",
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );
    let expected = json!({
        "id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
        "choices": [{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    });
    for size in 1..=stream.len() {
        assert_eq!(
            assemble(Kind::Completion, stream.as_bytes(), size),
            Some(expected.clone())
        );
    }
    let bad = stream.replace("\" upon\"", "3");
    assert_eq!(assemble_str(Kind::Completion, &bad), None);
}

#[test]
fn completion_logprobs_are_concatenated() {
    let stream = concat!(
        "data: {\"id\":\"c\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"a\",\"index\":0,\"logprobs\":{\"tokens\":[\"a\"],\"token_logprobs\":[-1.0],\"top_logprobs\":null,\"text_offset\":[0]}}]}\n\n",
        "data: {\"id\":\"c\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"b\",\"index\":0,\"logprobs\":{\"tokens\":[\"b\"],\"token_logprobs\":[-2.0],\"top_logprobs\":null,\"text_offset\":[1]},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let body = assemble_str(Kind::Completion, stream).expect("assembles");
    assert_eq!(
        body["choices"][0]["logprobs"],
        json!({"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "text_offset": [0, 1]})
    );
}

#[test]
fn a_stream_of_the_other_endpoint_does_not_assemble() {
    assert_eq!(assemble_str(Kind::Completion, CHAT_STREAM), None);
    let stream = "data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\ndata: [DONE]\n\n";
    assert_eq!(assemble_str(Kind::Chat, stream), None);
    assert!(assemble_str(Kind::Completion, stream).is_some());
}

#[test]
fn damaged_streams_never_panic() {
    let bytes = CHAT_STREAM.as_bytes();
    for at in 0..bytes.len() {
        for replacement in [b'{', b'"', b'\n', b'\r', b':', b'\\', 0xff, b'0'] {
            let mut damaged = bytes.to_vec();
            damaged[at] = replacement;
            let _ = assemble(Kind::Chat, &damaged, 11);
            let _ = assemble(Kind::Completion, &damaged, 11);
        }
    }
    // Pseudo-random bytes.
    let mut state: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect();
    assert_eq!(assemble(Kind::Chat, &noise, 17), None);
}

/// Splits rendered SSE into its events' JSON, checking the framing.
fn events(sse: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(sse).expect("UTF-8");
    let body = text
        .strip_suffix("data: [DONE]\n\n")
        .expect("ends with [DONE]");
    assert!(body.is_empty() || body.ends_with("\n\n"));
    body.split_terminator("\n\n")
        .map(|event| {
            let json = event.strip_prefix("data: ").expect("a data event");
            assert!(!json.contains('\n'), "one line per event");
            serde_json::from_str(json).expect("JSON")
        })
        .collect()
}

fn render(kind: Kind, body: &Value, include_usage: bool) -> Option<Vec<u8>> {
    render_sse(
        kind,
        &serde_json::to_vec(body).expect("JSON"),
        include_usage,
    )
}

#[test]
fn a_chat_answer_renders_as_openai_streams_it() {
    let sse = render(Kind::Chat, &chat_answer(), true).expect("renders");
    let head = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                      "model": "gpt-x", "system_fingerprint": "fp_1"});
    let with = |extra: Value| {
        let mut chunk = head.clone();
        for (k, v) in extra.as_object().expect("object") {
            chunk[k] = v.clone();
        }
        chunk
    };
    assert_eq!(
        events(&sse),
        vec![
            with(
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello é\n!"},
                                     "logprobs": null, "finish_reason": null}]})
            ),
            with(
                json!({"choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]})
            ),
            with(
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
            ),
        ]
    );
    let without = render(Kind::Chat, &chat_answer(), false).expect("renders");
    assert_eq!(events(&without).len(), 2);
    assert!(events(&without).iter().all(|e| e.get("usage").is_none()));
    let mut no_usage = chat_answer();
    no_usage.as_object_mut().expect("object").remove("usage");
    assert_eq!(
        events(&render(Kind::Chat, &no_usage, true).expect("renders")).len(),
        2
    );
}

#[test]
fn rendering_gives_each_tool_call_its_index() {
    let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
            "annotations": [], "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}}]},
            "logprobs": null, "finish_reason": "tool_calls"}]});
    let sse = render(Kind::Chat, &body, false).expect("renders");
    let delta = &events(&sse)[0]["choices"][0]["delta"];
    assert_eq!(
        *delta,
        json!({"role": "assistant", "content": null, "annotations": [], "tool_calls": [
            {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}}]})
    );
}

#[test]
fn a_completion_answer_renders_as_openai_streams_it() {
    let body = json!({"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
        "choices": [{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}});
    let sse = render(Kind::Completion, &body, true).expect("renders");
    let head = |choices: Value| json!({"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m", "choices": choices});
    let mut usage = head(json!([]));
    usage["usage"] = body["usage"].clone();
    assert_eq!(
        events(&sse),
        vec![
            head(
                json!([{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": null}])
            ),
            head(json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}])),
            usage,
        ]
    );
}

#[test]
fn invalid_answers_do_not_render() {
    let chat = |choice: Value| json!({"id": "c", "created": 1, "model": "m", "choices": [choice]});
    let message = |m: Value| chat(json!({"index": 0, "message": m, "finish_reason": "stop"}));
    for (kind, body) in [
        (Kind::Chat, json!([])),
        (Kind::Chat, json!("x")),
        (Kind::Chat, json!({"error": {"message": "no"}})),
        (Kind::Chat, json!({"choices": []})),
        (Kind::Chat, json!({"choices": {}})),
        (Kind::Chat, json!({"choices": [1]})),
        (Kind::Chat, chat(json!({"message": {"content": "a"}}))),
        (
            Kind::Chat,
            chat(json!({"index": "0", "message": {"content": "a"}})),
        ),
        (Kind::Chat, chat(json!({"index": 0}))),
        (Kind::Chat, message(json!("a"))),
        (Kind::Chat, message(json!({"content": 1}))),
        (
            Kind::Chat,
            message(json!({"content": [{"type": "text", "text": "a"}]})),
        ),
        (Kind::Chat, message(json!({"role": 5, "content": "a"}))),
        (
            Kind::Chat,
            message(json!({"content": null, "tool_calls": {}})),
        ),
        (
            Kind::Chat,
            message(json!({"content": null, "tool_calls": ["a"]})),
        ),
        (
            Kind::Chat,
            chat(json!({"index": 0, "message": {"content": "a"}, "finish_reason": 1})),
        ),
        (
            Kind::Chat,
            chat(json!({"index": 0, "message": {"content": "a"}, "logprobs": []})),
        ),
        (
            Kind::Completion,
            chat(json!({"index": 0, "message": {"content": "a"}})),
        ),
        (Kind::Completion, chat(json!({"index": 0, "text": null}))),
        (Kind::Chat, chat(json!({"index": 0, "text": "a"}))),
    ] {
        assert_eq!(render(kind, &body, true), None, "{kind:?} {body}");
    }
    let duplicate = json!({"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]});
    assert_eq!(render(Kind::Completion, &duplicate, false), None);
    let mut bad_usage = chat_answer();
    bad_usage["usage"] = json!("many");
    assert_eq!(render(Kind::Chat, &bad_usage, true), None);
    assert_eq!(render_sse(Kind::Chat, b"", false), None);
    assert_eq!(render_sse(Kind::Chat, b"{\"choices\":[", false), None);
    assert_eq!(render_sse(Kind::Chat, b"\xff\xfe", false), None);
}

/// Renders `body` as SSE, assembles it back (split in several ways) and returns what came back.
fn round_trip(kind: Kind, body: &Value) -> Value {
    let sse = render(kind, body, true).expect("renders");
    let whole = assemble(kind, &sse, usize::MAX).expect("assembles");
    for size in [1, 2, 7, 64] {
        assert_eq!(assemble(kind, &sse, size).as_ref(), Some(&whole));
    }
    whole
}

#[test]
fn rendered_answers_assemble_back_to_themselves() {
    let tool_calls = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]},
            "logprobs": null, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    let several = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "service_tier": "default",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": "no",
                "annotations": []},
             "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]},
             "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": ""}, "logprobs": null,
             "finish_reason": "length"},
            {"index": 2, "message": {"role": "assistant", "content": "x", "reasoning_content": "why"},
             "logprobs": null, "finish_reason": null}]});
    let completion = json!({"id": "t", "object": "text_completion", "created": 1, "model": "m",
        "choices": [
            {"index": 0, "text": "abc", "logprobs": null, "finish_reason": "stop"},
            {"index": 1, "text": "", "logprobs": {"tokens": ["x"], "token_logprobs": [-1.0]},
             "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}});
    assert_eq!(round_trip(Kind::Chat, &chat_answer()), chat_answer());
    assert_eq!(round_trip(Kind::Chat, &tool_calls), tool_calls);
    assert_eq!(round_trip(Kind::Chat, &several), several);
    assert_eq!(round_trip(Kind::Completion, &completion), completion);
}

#[test]
fn round_trips_keep_the_content_of_looser_answers() {
    // Unsorted choices, a missing role, `refusal: null`, no `object`: the content survives.
    let body = json!({"id": "c", "created": 1, "model": "m",
        "choices": [
            {"index": 1, "message": {"content": "b", "refusal": null}, "finish_reason": "stop"},
            {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]});
    let back = round_trip(Kind::Chat, &body);
    assert_eq!(back["object"], "chat.completion");
    assert_eq!(back["choices"][0]["message"]["content"], "a");
    assert_eq!(
        back["choices"][1]["message"],
        json!({"role": "assistant", "content": "b"})
    );
    assert!(back.get("usage").is_none());
}

#[test]
fn an_assembled_stream_renders_and_assembles_to_itself() {
    let once = assemble_str(Kind::Chat, CHAT_STREAM).expect("assembles");
    assert_eq!(round_trip(Kind::Chat, &once), once);
}
