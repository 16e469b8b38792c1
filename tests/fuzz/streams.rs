//! Response streams: the SSE assembler and renderer (`lumen_plugins::sse`) and the usage
//! tap and strip (`lumen_plugins::sse::usage`), all fed arbitrary bytes in arbitrary chunks.

use bytes::Bytes;
use lumen_plugins::sse::usage::{UsageStrip, UsageTap};
use lumen_plugins::sse::{render_sse, Assembler, Kind};
use serde_json::{json, Value};

use crate::engine::{chunkings, outcome, Target};
use crate::requests::floats_round_trip;

/// An SSE event as the mock provider (tests/support/src/mock.rs) writes it.
fn event(payload: &Value) -> String {
    format!("data: {payload}\n\n")
}

/// Streams as providers send them: the mock's chat and completion streams with usage, tool
/// calls, logprobs, two choices, CRLF line ends, comments, an error event, no `[DONE]`.
pub fn stream_seeds() -> Vec<Vec<u8>> {
    let header = |object: &str| json!({"id": "chatcmpl-mock", "object": object, "created": 1_700_000_000, "model": "mock-small"});
    let with = |base: Value, extra: Value| {
        let mut base = base;
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base
    };
    let chat = |choices: Value| with(header("chat.completion.chunk"), json!({"choices": choices}));
    let text = |choices: Value| with(header("text_completion"), json!({"choices": choices}));
    let usage = with(
        header("chat.completion.chunk"),
        json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}),
    );
    let mut chat_stream = String::new();
    chat_stream += &event(&chat(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
    ));
    for i in 0..3 {
        chat_stream += &event(&chat(
            json!([{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]),
        ));
    }
    chat_stream += &event(&chat(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ));
    let done = "data: [DONE]\n\n";
    let mut completion = String::new();
    for i in 0..3 {
        completion += &event(&text(
            json!([{"index": 0, "text": format!("tok{i} "), "finish_reason": null}]),
        ));
    }
    completion += &event(&text(
        json!([{"index": 0, "text": "", "finish_reason": "length", "logprobs": {"tokens": ["a"], "token_logprobs": [-0.1]}}]),
    ));
    let tools = [
        event(&chat(json!([{"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]))),
        event(&chat(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]))),
        event(&chat(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]))),
        event(&chat(json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))),
    ]
    .concat();
    let two = [
        event(&chat(json!([{"index": 0, "delta": {"content": "a", "reasoning_content": "think"}, "logprobs": {"content": [{"token": "a", "logprob": -0.5}]}}, {"index": 1, "delta": {"content": "b"}}]))),
        event(&chat(json!([{"index": 1, "delta": {"refusal": "no"}, "finish_reason": "stop"}, {"index": 0, "delta": {}, "finish_reason": "stop"}]))),
    ]
    .concat();
    let usage_event = event(&usage);
    let seeds = [
        format!("{chat_stream}{usage_event}{done}"),
        format!("{chat_stream}{done}"),
        format!("{completion}{usage_event}{done}"),
        format!("{tools}{done}"),
        format!(": keep-alive\n\n{two}retry: 100\nid: 7\n{done}"),
        format!("{chat_stream}{usage_event}{done}").replace('\n', "\r\n"),
        chat_stream.replace("\n\n", "\r\r"),
        format!("{chat_stream}event: error\ndata: {{\"error\":{{\"message\":\"overloaded\"}}}}\n\n{done}"),
        chat_stream.clone(),
        format!("data: {{\"choices\":[{{\"delta\":\ndata: {{\"content\":\"split\"}}}}]}}\n\n{done}"),
    ];
    seeds.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn stream_dict() -> Vec<Vec<u8>> {
    [
        "data:",
        "data: [DONE]\n\n",
        "event: error\n",
        ": ping\n\n",
        "\"delta\":",
        "\"text\":",
        "\"tool_calls\":",
        "\"function\":",
        "\"arguments\":",
        "\"finish_reason\":",
        "\"logprobs\":",
        "\"usage\":",
        "\"choices\":[]",
        "\"index\":",
        "\"error\":",
        "\"role\":",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Non-stream answers, to render as streams.
fn answer_seeds() -> Vec<Vec<u8>> {
    let answers = [
        json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "logprobs": null, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}),
        json!({"id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "tool_calls"},
                           {"index": 1, "message": {"role": "assistant", "content": "x", "refusal": null, "annotations": []}, "logprobs": {"content": [{"token": "x", "logprob": -1}]}, "finish_reason": "length"}]}),
        json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": "tok0 tok1", "logprobs": null, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
    ];
    answers
        .iter()
        .map(|a| serde_json::to_vec(a).unwrap_or_default())
        .collect()
}

pub fn assemble_target() -> Target {
    Target {
        name: "sse_assemble",
        seeds: stream_seeds(),
        dict: stream_dict(),
        max_len: 4096,
        json: false,
    }
}

fn assemble(kind: Kind, pieces: &[&[u8]], limit: usize) -> Option<Vec<u8>> {
    let mut assembler = Assembler::new(kind, limit);
    for piece in pieces {
        assembler.push(piece);
    }
    assembler.finish()
}

/// The assembler: the same answer however the stream is chunked; an assembled answer is JSON
/// that renders as a stream, and that stream assembles to the same answer (a cached answer
/// replays as it was stored).
pub fn check_assemble(input: &[u8]) -> u64 {
    let mut reached = Vec::new();
    for kind in [Kind::Chat, Kind::Completion] {
        let all = chunkings(input);
        let whole = assemble(kind, &all[0], usize::MAX);
        for pieces in &all[1..] {
            assert_eq!(
                assemble(kind, pieces, usize::MAX),
                whole,
                "{kind:?}: chunking changed the assembled answer ({} pieces)",
                pieces.len()
            );
        }
        if !input.is_empty() {
            assert_eq!(
                assemble(kind, &all[0], input.len() - 1),
                None,
                "over the limit"
            );
        }
        reached.push(whole.is_some());
        if let Some(answer) = whole {
            check_round_trip(kind, &answer);
        }
    }
    outcome(reached)
}

/// An assembled answer, rendered and assembled again, is the same answer.
fn check_round_trip(kind: Kind, answer: &[u8]) {
    let value: Value = serde_json::from_slice(answer).expect("an assembled answer is JSON");
    for include_usage in [false, true] {
        let Some(sse) = render_sse(kind, answer, include_usage) else {
            panic!(
                "{kind:?}: an assembled answer does not render: {}",
                String::from_utf8_lossy(answer)
            );
        };
        let again = assemble(kind, &[&sse], usize::MAX).unwrap_or_else(|| {
            panic!(
                "{kind:?}: a rendered answer does not assemble: {}",
                String::from_utf8_lossy(&sse)
            )
        });
        let mut want = value.clone();
        if !include_usage {
            if let Some(map) = want.as_object_mut() {
                map.remove("usage");
            }
        }
        let again: Value = serde_json::from_slice(&again).expect("JSON");
        assert_eq!(
            again, want,
            "{kind:?}: render then assemble changed the answer"
        );
    }
}

pub fn render_target() -> Target {
    Target {
        name: "sse_render",
        seeds: answer_seeds(),
        dict: stream_dict(),
        max_len: 4096,
        json: true,
    }
}

/// The renderer on arbitrary bodies: what renders (from a body the assembler can represent,
/// see [`faithful`]) assembles, and renders again the same.
pub fn check_render(input: &[u8]) -> u64 {
    let mut reached = Vec::new();
    for kind in [Kind::Chat, Kind::Completion] {
        for include_usage in [false, true] {
            let Some(sse) = render_sse(kind, input, include_usage) else {
                reached.push(0);
                continue;
            };
            assert!(sse.ends_with(b"data: [DONE]\n\n"));
            if !faithful(input) {
                reached.push(2);
                continue;
            }
            let answer = assemble(kind, &[&sse], usize::MAX).unwrap_or_else(|| {
                panic!(
                    "{kind:?}: a rendered body does not assemble: {}",
                    String::from_utf8_lossy(&sse)
                )
            });
            let again =
                render_sse(kind, &answer, include_usage).expect("an assembled answer renders");
            assert_eq!(
                String::from_utf8_lossy(&again),
                String::from_utf8_lossy(&sse),
                "{kind:?}: render, assemble, render is not stable; the assembled answer: {}",
                String::from_utf8_lossy(&answer)
            );
            reached.push(1);
        }
    }
    outcome(reached)
}

pub fn usage_target() -> Target {
    let mut seeds = stream_seeds();
    seeds.extend(answer_seeds());
    Target {
        name: "usage_stream",
        seeds,
        dict: stream_dict(),
        max_len: 4096,
        json: false,
    }
}

/// The usage tap reads the same usage however the body is chunked; the strip drops only
/// usage-only events, whole, whatever the chunking, and passes every other byte on in order.
pub fn check_usage(input: &[u8]) -> u64 {
    let all = chunkings(input);
    let mut reached = Vec::new();
    for sse in [true, false] {
        let tap = |pieces: &[&[u8]]| {
            let mut tap = UsageTap::new(sse);
            for piece in pieces {
                tap.observe(piece);
            }
            (tap.total_tokens(), tap.split(), tap.estimate())
        };
        let whole = tap(&all[0]);
        for pieces in &all[1..] {
            assert_eq!(
                tap(pieces),
                whole,
                "sse={sse}: chunking changed the usage read"
            );
        }
        reached.push((whole.0.is_some(), whole.1.is_some()));
    }
    let strip = |pieces: &[&[u8]]| {
        let mut strip = UsageStrip::default();
        let mut out = Vec::new();
        for piece in pieces {
            out.extend_from_slice(&strip.filter(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&strip.finish());
        out
    };
    let whole = strip(&all[0]);
    for pieces in &all[1..] {
        assert_eq!(
            String::from_utf8_lossy(&strip(pieces)),
            String::from_utf8_lossy(&whole),
            "chunking changed what the strip passes on"
        );
    }
    let removed = removed_events(input, &whole);
    for event in &removed {
        assert!(
            is_usage_chunk(event),
            "the strip dropped an event that is not a usage-only chunk: {}",
            String::from_utf8_lossy(event)
        );
    }
    outcome((reached, removed.len().min(3)))
}

/// The events of `input` (each through its blank line, as SSE defines them for LF and CRLF)
/// and the unfinished rest.
fn events(input: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while let Some(nl) = input[i..].iter().position(|b| *b == b'\n') {
        let at = i + nl + 1;
        let end = match (input.get(at), input.get(at + 1)) {
            (Some(b'\n'), _) => Some(at + 1),
            (Some(b'\r'), Some(b'\n')) => Some(at + 2),
            _ => None,
        };
        match end {
            Some(end) => {
                events.push(&input[start..end]);
                start = end;
                i = end;
            }
            None => i = at,
        }
    }
    (events, &input[start..])
}

/// Aligns what the strip passed on with the input's events: `out` must be the input with some
/// whole events left out. Returns those events.
fn removed_events<'a>(input: &'a [u8], out: &[u8]) -> Vec<&'a [u8]> {
    let (events, rest) = events(input);
    let mut removed = Vec::new();
    let mut at = 0;
    for event in events {
        if out[at..].starts_with(event) {
            at += event.len();
        } else {
            removed.push(event);
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&out[at..]),
        String::from_utf8_lossy(rest),
        "the strip's output is not the input less whole events"
    );
    removed
}

/// A usage-only chunk: some `data:` line is a JSON object with non-null `usage` and an empty
/// `choices` list. Strings are skipped unchecked, as the strip skips them (a lone surrogate
/// escape or a byte that is not UTF-8 inside a usage chunk does not make it another event).
fn is_usage_chunk(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    event.split(|b| *b == b'\n').any(|line| {
        line.strip_prefix(b"data:")
            .map(<[u8]>::trim_ascii)
            .filter(|d| d.starts_with(b"{"))
            .and_then(|d| serde_json::from_slice::<Chunk>(d).ok())
            .is_some_and(|c| c.usage.is_some() && c.choices.is_some_and(|c| c.is_empty()))
    })
}

/// Whether the body holds only what the assembler merges back as it was: floats that read
/// back (finding F2), choices in `index` order, `logprobs` null or lists, message fields that
/// are text, lists or null (an object, such as `audio`, makes a stream unusable by design), and
/// tool calls with only the fields the assembler keeps.
fn faithful(body: &[u8]) -> bool {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    if !floats_round_trip(&answer) {
        return false;
    }
    let choices = answer["choices"].as_array().into_iter().flatten();
    // `logprobs` lists are concatenated: an empty object, or a null list, comes back as null.
    let lists = |l: &Value| {
        l.is_null()
            || l.as_object()
                .is_some_and(|m| !m.is_empty() && m.values().all(Value::is_array))
    };
    // Choices come back in `index` order.
    let indexes: Vec<Option<u64>> = choices.clone().map(|c| c["index"].as_u64()).collect();
    if !indexes.is_sorted() || !choices.clone().all(|c| lists(&c["logprobs"])) {
        return false;
    }
    for message in choices.filter_map(|c| c["message"].as_object()) {
        let mergeable = message.iter().all(|(name, value)| {
            name == "tool_calls" || value.is_null() || value.is_string() || value.is_array()
        });
        if !mergeable || !plain_tool_calls(message) {
            return false;
        }
    }
    true
}

/// Finding F3 of issue 16: the assembler keeps only `index`, `id`, `type` and
/// `function.{name, arguments}` of a streamed tool call and drops any other field (the renderer
/// passes them on), so an answer whose tool calls carry more does not survive a replay.
fn plain_tool_calls(message: &serde_json::Map<String, Value>) -> bool {
    let calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let text = |v: Option<&Value>| v.is_some_and(Value::is_string);
    let text_or_null = |v: Option<&Value>| v.is_some_and(|v| v.is_string() || v.is_null());
    calls.into_iter().all(|call| {
        // Exactly what the assembler puts back: `id` (text or null), `type`, and `function`
        // with `name` (text or null) and `arguments`; anything missing comes back filled in.
        call.as_object().is_some_and(|call| {
            call.keys()
                .all(|k| matches!(k.as_str(), "id" | "type" | "function"))
                && text_or_null(call.get("id"))
                && text(call.get("type"))
                && call
                    .get("function")
                    .and_then(Value::as_object)
                    .is_some_and(|f| {
                        f.keys().all(|k| k == "name" || k == "arguments")
                            && text_or_null(f.get("name"))
                            && text(f.get("arguments"))
                    })
        })
    })
}
