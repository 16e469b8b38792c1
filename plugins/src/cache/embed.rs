//! Embeddings cached per input item. A list request (`input: ["a", "b", ...]`) is split into
//! its items so that each is cached on its own: a later request that shares some inputs sends
//! upstream only the ones not cached ([`with_items`]), its answer is split back per input
//! ([`split`]), and the whole answer is put together in the client's order ([`merge`]).
//!
//! A single input (a string, or one token array such as `[1, 2, 3]`) is not split: it is
//! cached as a whole request. Responses come from upstream providers and may be malformed;
//! nothing here panics on any input.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use serde_json::{Map, Value};

/// The items of an embeddings request's `input` when it is a JSON array of at least one item
/// that are all strings or all token arrays (non-empty arrays of non-negative integers);
/// `None` otherwise: a single string, a single token array (`[1, 2, 3]` is one input, not
/// three), an empty list, a mixed list, or anything else, which the caller sends as it is.
pub fn items(body: &Value) -> Option<Vec<Value>> {
    let list = body.get("input")?.as_array()?;
    if list.is_empty() {
        return None;
    }
    let strings = list.iter().all(Value::is_string);
    let token_arrays = list.iter().all(is_token_array);
    (strings || token_arrays).then(|| list.clone())
}

/// One token array: a non-empty list of token ids.
fn is_token_array(value: &Value) -> bool {
    value
        .as_array()
        .is_some_and(|tokens| !tokens.is_empty() && tokens.iter().all(Value::is_u64))
}

/// The request body with `input` replaced by `items`, every other field kept as is (the
/// model, `dimensions`, `encoding_format`, ...: they decide what each embedding is). A body
/// that is not a JSON object is returned unchanged; the upstream answers it as it would.
pub fn with_items(body: &Value, items: &[Value]) -> Vec<u8> {
    let mut body = body.clone();
    if let Some(fields) = body.as_object_mut() {
        fields.insert("input".into(), Value::Array(items.to_vec()));
    }
    // Serialising a `Value` cannot fail (its keys are strings).
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The per-input `embedding` values of an embeddings response, in input order (by each entry's
/// `index`). `None` unless there is exactly one entry for each index `0..n`, each with an
/// `embedding` that is a list of numbers or a base64 string: an answer that does not account
/// for every input, once, is not cached.
pub fn split(response: &[u8], n: usize) -> Option<Vec<Value>> {
    let answer: Value = serde_json::from_slice(response).ok()?;
    let data = answer.as_object()?.get("data")?.as_array()?;
    if data.len() != n {
        return None;
    }
    let mut embeddings: Vec<Option<Value>> = vec![None; n];
    for entry in data {
        let entry = entry.as_object()?;
        let index = usize::try_from(entry.get("index")?.as_u64()?).ok()?;
        let slot = embeddings.get_mut(index)?;
        if slot.is_some() {
            return None;
        }
        let embedding = entry.get("embedding")?;
        if !is_embedding(embedding) {
            return None;
        }
        *slot = Some(embedding.clone());
    }
    // With `n` entries, no index twice and every index below `n`, every slot is filled.
    embeddings.into_iter().collect()
}

/// An embedding as OpenAI encodes it: a list of numbers (`encoding_format: "float"`) or a
/// base64 string (`"base64"`).
fn is_embedding(value: &Value) -> bool {
    match value {
        Value::String(_) => true,
        Value::Array(numbers) => numbers.iter().all(Value::is_number),
        _ => false,
    }
}

/// A full embeddings response (`object: "list"`, `data` with `object: "embedding"`, `index` =
/// position, `embedding`), for `model`, with `usage` as given.
pub fn merge(model: &str, embeddings: Vec<Value>, usage: Value) -> Vec<u8> {
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| {
            let mut entry = Map::new();
            entry.insert("object".into(), Value::String("embedding".into()));
            entry.insert("index".into(), Value::from(index));
            entry.insert("embedding".into(), embedding);
            Value::Object(entry)
        })
        .collect();
    let mut answer = Map::new();
    answer.insert("object".into(), Value::String("list".into()));
    answer.insert("data".into(), Value::Array(data));
    answer.insert("model".into(), Value::String(model.to_string()));
    answer.insert("usage".into(), usage);
    // Serialising a `Value` cannot fail (its keys are strings).
    serde_json::to_vec(&Value::Object(answer)).unwrap_or_default()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(value: Value) -> Option<Vec<Value>> {
        items(&json!({"model": "m", "input": value}))
    }

    #[test]
    fn lists_of_strings_are_items() {
        assert_eq!(
            input(json!(["a", "b", "a"])),
            Some(vec![json!("a"), json!("b"), json!("a")])
        );
        assert_eq!(input(json!(["only"])), Some(vec![json!("only")]));
        assert_eq!(
            input(json!([""])),
            Some(vec![json!("")]),
            "the upstream judges empty text"
        );
    }

    #[test]
    fn lists_of_token_arrays_are_items() {
        assert_eq!(
            input(json!([[1, 2], [3]])),
            Some(vec![json!([1, 2]), json!([3])])
        );
        assert_eq!(input(json!([[100257]])), Some(vec![json!([100257])]));
    }

    #[test]
    fn single_inputs_and_anything_else_are_not_items() {
        assert_eq!(input(json!("a")), None, "one string");
        assert_eq!(input(json!([1, 2, 3])), None, "one token array");
        assert_eq!(input(json!([7])), None, "one token array of one token");
        assert_eq!(input(json!([])), None, "nothing");
        assert_eq!(input(json!([[]])), None, "an empty token array");
        assert_eq!(input(json!([[1], []])), None);
        assert_eq!(input(json!(["a", 1])), None, "mixed");
        assert_eq!(input(json!(["a", [1]])), None, "mixed");
        assert_eq!(input(json!([[1], ["a"]])), None, "text in a token array");
        assert_eq!(input(json!([[1.5]])), None, "not a token id");
        assert_eq!(input(json!([[-1]])), None, "not a token id");
        assert_eq!(input(json!([null])), None);
        assert_eq!(input(json!([{"text": "a"}])), None);
        assert_eq!(input(json!([[[1]]])), None);
        assert_eq!(input(json!(null)), None);
        assert_eq!(input(json!({"0": "a"})), None);
        assert_eq!(items(&json!({"model": "m"})), None, "no input");
        assert_eq!(items(&json!(["a", "b"])), None, "not a request");
        assert_eq!(items(&json!("a")), None, "not a request");
    }

    #[test]
    fn with_items_replaces_only_the_input() {
        let body = json!({"model": "m", "input": ["a", "b", "c"], "dimensions": 8,
                          "encoding_format": "base64", "user": "u"});
        let sub: Value =
            serde_json::from_slice(&with_items(&body, &[json!("c"), json!("a")])).expect("JSON");
        assert_eq!(
            sub,
            json!({"model": "m", "input": ["c", "a"], "dimensions": 8,
                   "encoding_format": "base64", "user": "u"})
        );
        let tokens: Value =
            serde_json::from_slice(&with_items(&json!({"input": [[1], [2]]}), &[json!([2])]))
                .expect("JSON");
        assert_eq!(tokens, json!({"input": [[2]]}));
        assert_eq!(
            with_items(&json!("not an object"), &[json!("a")]),
            b"\"not an object\""
        );
    }

    fn response(data: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"object": "list", "data": data, "model": "m",
                                   "usage": {"prompt_tokens": 2, "total_tokens": 2}}))
        .expect("JSON")
    }

    #[test]
    fn split_orders_by_index() {
        let answer = response(json!([
            {"object": "embedding", "index": 2, "embedding": "AAAA"},
            {"object": "embedding", "index": 0, "embedding": [0.5, -1]},
            {"object": "embedding", "index": 1, "embedding": []}
        ]));
        assert_eq!(
            split(&answer, 3),
            Some(vec![json!([0.5, -1]), json!([]), json!("AAAA")])
        );
        assert_eq!(split(&response(json!([])), 0), Some(vec![]));
    }

    #[test]
    fn split_needs_exactly_one_entry_per_input() {
        let two =
            response(json!([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [2.0]}]));
        assert_eq!(split(&two, 1), None, "more entries than inputs");
        assert_eq!(split(&two, 3), None, "fewer entries than inputs");
        for data in [
            json!([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": "1", "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": -1, "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 1.0, "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 18446744073709551615u64, "embedding": [1.0]}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 1}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": null}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": {"x": 1}}]),
            json!([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": ["a"]}]),
            json!([{"index": 0, "embedding": [1.0]}, 7]),
        ] {
            assert_eq!(split(&response(data.clone()), 2), None, "{data}");
        }
    }

    #[test]
    fn split_rejects_what_is_not_an_embeddings_answer() {
        for answer in [
            &b""[..],
            b"not json",
            b"[]",
            b"{}",
            b"{\"data\":{}}",
            b"{\"error\":{\"message\":\"rate limited\"}}",
            b"{\"data\":[{\"index\":0,\"embedding\":[1.0]}]",
            b"\xff\xfe",
        ] {
            assert_eq!(
                split(answer, 1),
                None,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn merge_builds_a_whole_answer_in_order() {
        let usage = json!({"prompt_tokens": 3, "total_tokens": 3});
        let merged: Value = serde_json::from_slice(&merge(
            "text-embed",
            vec![json!([1.0]), json!("AAAA")],
            usage,
        ))
        .expect("JSON");
        assert_eq!(
            merged,
            json!({
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [1.0]},
                    {"object": "embedding", "index": 1, "embedding": "AAAA"}
                ],
                "model": "text-embed",
                "usage": {"prompt_tokens": 3, "total_tokens": 3}
            })
        );
    }

    #[test]
    fn split_then_merge_gives_back_the_answer() {
        let original = json!({"object": "list", "model": "m",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25]},
                     {"object": "embedding", "index": 1, "embedding": [0.5]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}});
        let bytes = serde_json::to_vec(&original).expect("JSON");
        let parts = split(&bytes, 2).expect("splits");
        let merged: Value =
            serde_json::from_slice(&merge("m", parts, original["usage"].clone())).expect("JSON");
        assert_eq!(merged, original);
    }
}
