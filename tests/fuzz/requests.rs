//! Request bodies: the OpenAI parser and the body rewrite (`openai`), the cache key and its
//! canonical JSON, and the per-item embeddings cache (`lumen_plugins::cache`).

use bytes::Bytes;
use lumen::openai::{self, Endpoint, LlmRequest};
use lumen_plugins::cache::{self, embed, Api, Scope, When};
use serde_json::{json, Value};

use crate::engine::{outcome, shape, Target};

const ENDPOINTS: [Endpoint; 4] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Rerank,
];

/// Realistic bodies for each endpoint, streaming or not, with and without `stream_options`.
pub fn request_seeds() -> Vec<Vec<u8>> {
    let bodies = [
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}),
        json!({"model": "fast", "stream": true, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Write a haiku"}], "max_tokens": 64}),
        json!({"model": "fast", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
        json!({"model": "fast", "stream": true, "stream_options": {"include_usage": false, "continuous_usage_stats": true}, "messages": [], "max_completion_tokens": 10}),
        json!({"model": "fast", "stream": true, "stream_options": null, "messages": [], "user": "u-1"}),
        json!({"model": "m", "prompt": "Say hi", "max_tokens": 5, "stream": true, "seed": 7}),
        json!({"model": "m", "prompt": ["a", "b"], "echo": true}),
        json!({"model": "text-embedding-3-small", "input": ["a", "b", "a"], "dimensions": 8}),
        json!({"model": "minilm", "input": [[1, 2, 3], [4]], "encoding_format": "base64"}),
        json!({"model": "minilm", "input": "one string"}),
        json!({"model": "rerank-v3", "query": "q", "documents": ["a", "b"], "top_n": 1}),
        json!({"model": "local/smollm2", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ];
    let mut seeds: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .collect();
    seeds
        .push(b" \n{ \"stream\" : true , \"model\" : \"m\\u00e9\", \"messages\": [ ] }\n".to_vec());
    seeds.push(br#"{"messages":[],"model":"a","stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#.to_vec());
    seeds
}

/// Fragments that change a request's meaning when spliced into its text.
pub fn request_dict() -> Vec<Vec<u8>> {
    [
        "\"stream\":true,",
        "\"stream_options\":null,",
        "\"stream_options\":{},",
        "\"stream_options\":{\"include_usage\":false},",
        "\"model\":\"x\",",
        "\"max_tokens\":",
        "\"messages\":[],",
        "\"input\":[\"a\",\"b\"],",
        "\"include_usage\"",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

pub fn parse_target() -> Target {
    Target {
        name: "openai_parse",
        seeds: request_seeds(),
        dict: request_dict(),
        max_len: 4096,
        json: true,
    }
}

/// `openai::parse` for every endpoint; a parsed request's spans point at what they name, and
/// the body sent upstream is valid JSON that Lumen itself parses back to the same request,
/// with the model spliced and usage asked for.
pub fn check_parse(input: &[u8]) -> u64 {
    let mut reached = Vec::new();
    for endpoint in ENDPOINTS {
        match openai::parse(endpoint, Bytes::copy_from_slice(input)) {
            Err(e) => reached.push(shape(&e.to_string())),
            Ok(req) => {
                check_request(&req);
                reached.push(format!(
                    "ok {} {} {} {} {}",
                    req.stream,
                    req.include_usage,
                    req.max_tokens.is_some(),
                    req.stream_options_span.is_some(),
                    openai::adds_usage(&req),
                ));
            }
        }
    }
    outcome(reached)
}

fn check_request(req: &LlmRequest) {
    let raw = &req.raw;
    let model: String = serde_json::from_slice(&raw[req.model_span.clone()])
        .expect("model_span is not the model's JSON string");
    assert_eq!(model, req.model, "model_span names another value");
    let _ = req.token_estimate(openai::DEFAULT_COMPLETION_TOKENS);
    let Ok(original) = serde_json::from_slice::<Value>(raw) else {
        // Finding F4 of issue 16: the parser skips the fields it does not read (and keeps
        // `messages`, `stream_options`... raw) without checking their strings: bytes that are
        // not UTF-8, or a lone surrogate escape (`"\ud800"`), pass, though serde_json refuses
        // the body as a whole (and `body_with_usage` then drops the client's `stream_options`).
        return;
    };
    if let Some(span) = &req.stream_options_span {
        serde_json::from_slice::<Value>(&raw[span.clone()])
            .expect("stream_options_span is not a JSON value");
    }
    let renamed = Bytes::from_static(b"\"renamed/model-\\u00e9\"");
    for model_json in [None, Some(&renamed)] {
        let sent = concat(&openai::body_with_usage(req, model_json));
        let want_model = match model_json {
            None => req.model.clone(),
            Some(_) => "renamed/model-é".to_string(),
        };
        let value: Value = serde_json::from_slice(&sent).unwrap_or_else(|e| {
            panic!(
                "body_with_usage made invalid JSON ({e}): {}",
                String::from_utf8_lossy(&sent)
            )
        });
        assert_eq!(
            value["model"],
            Value::String(want_model.clone()),
            "model not spliced"
        );
        if openai::adds_usage(req) {
            assert_eq!(
                value["stream_options"]["include_usage"],
                Value::Bool(true),
                "usage not asked for (a JSON reader keeps the last duplicate key): {}",
                String::from_utf8_lossy(&sent)
            );
        } else {
            assert_eq!(sent, concat(&openai::body_for_target(req, model_json)));
            if model_json.is_none() {
                assert_eq!(
                    &sent[..],
                    &raw[..],
                    "an unchanged body must be forwarded as is"
                );
            }
        }
        // Every other field is forwarded as the client sent it.
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(map) = v.as_object_mut() {
                map.remove("model");
                map.remove("stream_options");
            }
            v
        };
        assert_eq!(
            strip(&value),
            strip(&original),
            "a field changed on the way upstream"
        );
        // The body sent upstream is one Lumen itself accepts, as the same request.
        let again = openai::parse(req.endpoint, Bytes::from(sent.clone())).unwrap_or_else(|e| {
            panic!(
                "the body sent upstream does not parse ({e}): {}",
                String::from_utf8_lossy(&sent)
            )
        });
        assert_eq!(again.model, want_model);
        assert_eq!(again.stream, req.stream);
        assert_eq!(again.max_tokens, req.max_tokens);
        if openai::adds_usage(req) {
            assert!(
                again.include_usage,
                "the rewritten body does not ask for usage"
            );
        }
    }
}

fn concat(parts: &[Bytes]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

pub fn cache_key_target() -> Target {
    Target {
        name: "cache_key",
        seeds: request_seeds(),
        dict: request_dict(),
        max_len: 4096,
        json: true,
    }
}

/// The cache key: canonical JSON is valid and idempotent, and the key does not change with key
/// order, whitespace, integral floats, or the delivery fields (`stream`, `stream_options`,
/// `user`, `model`). Item keys are equal exactly for items with equal canonical form.
pub fn check_cache_key(input: &[u8]) -> u64 {
    let Ok(body) = serde_json::from_slice::<Value>(input) else {
        return outcome("not json");
    };
    let key = |b: &Value| cache::key(Scope::Key, "team-a", "fast", "fast", Api::Chat, "", b);
    let mut canonical = Vec::new();
    cache::canonical(&body, &mut canonical);
    let reparsed: Value = serde_json::from_slice(&canonical).unwrap_or_else(|e| {
        panic!(
            "canonical JSON does not parse ({e}): {}",
            String::from_utf8_lossy(&canonical)
        )
    });
    if !floats_round_trip(&body) {
        // Finding F2: harmless for keys, which hash one parse of the client's text.
        return outcome("float drift");
    }
    let mut again = Vec::new();
    cache::canonical(&reparsed, &mut again);
    assert_eq!(
        String::from_utf8_lossy(&canonical),
        String::from_utf8_lossy(&again),
        "canonical form is not idempotent"
    );
    let k = key(&body);
    assert_eq!(
        k,
        key(&reparsed),
        "the key changed when the body was canonicalised"
    );
    let pretty = serde_json::to_vec_pretty(&body).unwrap_or_default();
    let pretty: Value = serde_json::from_slice(&pretty).expect("pretty JSON parses");
    assert_eq!(k, key(&pretty), "the key changed with whitespace");
    if let Value::Object(map) = &body {
        let mut delivery = map.clone();
        delivery.insert("stream".into(), Value::Bool(true));
        delivery.insert("stream_options".into(), json!({"include_usage": true}));
        delivery.insert("user".into(), Value::String("someone".into()));
        delivery.insert("model".into(), Value::String("other".into()));
        assert_eq!(
            k,
            key(&Value::Object(delivery)),
            "a delivery field changed the key"
        );
    }
    let cacheable = cache::cacheable(Api::Chat, &body, When::Deterministic);
    let items = embed::items(&body);
    if let Some(items) = &items {
        let keys = cache::item_keys(Scope::Global, "", "embed", "minilm", "", &body, items);
        assert_eq!(keys.len(), items.len());
        let forms: Vec<Vec<u8>> = items
            .iter()
            .map(|item| {
                let mut out = Vec::new();
                cache::canonical(item, &mut out);
                out
            })
            .collect();
        for i in 0..items.len() {
            for j in 0..items.len() {
                assert_eq!(
                    keys[i] == keys[j],
                    forms[i] == forms[j],
                    "item keys {i} and {j} disagree with the items' canonical forms"
                );
            }
        }
    }
    outcome((cacheable, items.map(|i| i.len().min(4)), body_kind(&body)))
}

/// Whether every float of `v` reads back from its text as the same float. Not always: serde_json
/// is built without `float_roundtrip`, and its fast float parser may read a number one ulp off
/// (finding F2 of issue 16), so properties that compare values across a write and a re-read
/// skip such inputs.
pub fn floats_round_trip(v: &Value) -> bool {
    match v {
        Value::Number(n) if n.is_f64() => {
            serde_json::from_str::<Value>(&n.to_string()).is_ok_and(|back| back == *v)
        }
        Value::Array(items) => items.iter().all(floats_round_trip),
        Value::Object(map) => map.values().all(floats_round_trip),
        _ => true,
    }
}

fn body_kind(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

/// Embeddings responses as providers send them (floats and base64), and odd ones.
fn embedding_response_seeds() -> Vec<Vec<u8>> {
    let responses = [
        json!({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]},
            {"object": "embedding", "index": 1, "embedding": [1, 2, 3e-5]}],
            "model": "minilm", "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
        json!({"object": "list", "data": [
            {"object": "embedding", "index": 1, "embedding": "AAAAAA=="},
            {"object": "embedding", "index": 0, "embedding": "AACAPw=="}],
            "model": "m", "usage": null}),
        json!({"data": [{"index": 0, "embedding": []}]}),
    ];
    responses
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap_or_default())
        .collect()
}

pub fn embed_target() -> Target {
    let mut seeds = request_seeds();
    seeds.extend(embedding_response_seeds());
    Target {
        name: "cache_embed",
        seeds,
        dict: request_dict(),
        max_len: 4096,
        json: true,
    }
}

/// Per-item embeddings: `with_items` keeps every other field and its items read back as
/// given; `split` accounts for exactly `n` inputs, and what it splits merges and splits back.
pub fn check_embed(input: &[u8]) -> u64 {
    let mut reached = Vec::new();
    if let Ok(body) = serde_json::from_slice::<Value>(input) {
        if let Some(items) = embed::items(&body).filter(|_| floats_round_trip(&body)) {
            assert!(!items.is_empty(), "items() gave an empty list");
            let mut subsets = vec![items.clone(), items[..1].to_vec()];
            if items.len() > 1 {
                subsets.push(items[1..].to_vec());
                subsets.push(items.iter().rev().cloned().collect());
            }
            for subset in subsets {
                let sent = embed::with_items(&body, &subset);
                let value: Value =
                    serde_json::from_slice(&sent).expect("with_items made invalid JSON");
                assert_eq!(embed::items(&value), Some(subset), "items do not read back");
                let mut rest = value.clone();
                let mut before = body.clone();
                for v in [&mut rest, &mut before] {
                    if let Some(map) = v.as_object_mut() {
                        map.remove("input");
                    }
                }
                assert_eq!(rest, before, "with_items changed another field");
            }
            reached.push(items.len().min(4));
        }
    }
    let entries = serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|v| v.get("data").and_then(Value::as_array).map(Vec::len));
    for n in [0, 1, 2, 3].into_iter().chain(entries) {
        let Some(embeddings) = embed::split(input, n) else {
            continue;
        };
        assert_eq!(
            embeddings.len(),
            n,
            "split() gave the wrong number of embeddings"
        );
        if !embeddings.iter().all(floats_round_trip) {
            continue;
        }
        let merged = embed::merge("minilm", embeddings.clone(), json!({"prompt_tokens": 1}));
        assert_eq!(
            embed::split(&merged, n),
            Some(embeddings),
            "a merged answer does not split back"
        );
        reached.push(10 + n);
    }
    outcome(reached)
}
