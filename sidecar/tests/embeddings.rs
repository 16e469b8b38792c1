//! Embeddings and reranking through the real binary. The generated models check the pipeline
//! exactly (shapes, normalisation, `dimensions`, batching, ordering); all-MiniLM-L6-v2, when
//! fetched, checks that the vectors mean something.

use base64::Engine as _;
use lumen_test_support::sidecar::{real_model, tiny_chat_model, tiny_rerank_model, Sidecar};
use serde_json::{json, Value};

fn vector(item: &Value) -> Vec<f64> {
    item["embedding"]
        .as_array()
        .expect("float embedding")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

fn pipeline_models() -> Vec<String> {
    vec![
        "--model".into(),
        format!(
            "emb={}:pooling=mean,slots=4,threads=1",
            tiny_chat_model().display()
        ),
        "--model".into(),
        format!(
            "rank={}:pooling=rank,slots=4,threads=1",
            tiny_rerank_model().display()
        ),
    ]
}

#[test]
fn embeddings_are_unit_vectors_and_dimensions_truncate() {
    let s = Sidecar::start(&pipeline_models());
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "emb", "input": ["hello", "world", "hello"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["object"], "list");
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    // BOS + one token per character.
    assert_eq!(r["usage"]["prompt_tokens"], 18);
    assert_eq!(r["usage"]["total_tokens"], 18);
    let vs: Vec<Vec<f64>> = data.iter().map(vector).collect();
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        assert_eq!(data[i]["object"], "embedding");
        assert_eq!(v.len(), 128, "the tiny model's n_embd");
        assert!((norm(v) - 1.0).abs() < 1e-5, "norm {}", norm(v));
    }
    assert!(close(&vs[0], &vs[2], 1e-5), "same text, same vector");
    assert!(
        !close(&vs[0], &vs[1], 1e-3),
        "different text, different vector"
    );

    // Batched with others or alone, an input gets the same vector.
    let alone = s
        .post("/v1/embeddings", &json!({"model": "emb", "input": "world"}))
        .json();
    assert!(close(&vector(&alone["data"][0]), &vs[1], 1e-4));

    // dimensions: the first d components, renormalised.
    let short = s
        .post(
            "/v1/embeddings",
            &json!({"model": "emb", "input": "hello", "dimensions": 16}),
        )
        .json();
    let short = vector(&short["data"][0]);
    assert_eq!(short.len(), 16);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    let head = &vs[0][..16];
    let expected: Vec<f64> = head.iter().map(|x| x / norm(head)).collect();
    assert!(close(&short, &expected, 1e-5));

    // base64: little-endian f32s, the same numbers.
    let b64 = s
        .post(
            "/v1/embeddings",
            &json!({"model": "emb", "input": "hello", "encoding_format": "base64"}),
        )
        .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    assert!(close(&decoded, &vs[0], 1e-6));

    for bad in [
        json!({"model": "emb", "input": "x", "dimensions": 0}),
        json!({"model": "emb", "input": "x", "dimensions": 129}),
        json!({"model": "emb", "input": []}),
        json!({"model": "emb", "input": "x", "encoding_format": "hex"}),
        json!({"model": "rank", "input": "x"}),
        json!({"model": "emb", "input": [[1, 99999]]}),
    ] {
        let r = s.post("/v1/embeddings", &bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        s.post("/v1/embeddings", &json!({"model": "none", "input": "x"}))
            .status,
        404
    );
}

#[test]
fn rerank_sorts_by_score_and_honours_top_n() {
    let s = Sidecar::start(&pipeline_models());
    let docs = [
        "a cat sat on the mat",
        "stock markets fell",
        "cats purr",
        "rain is wet",
        "x",
    ];
    let r = s.post(
        "/v1/rerank",
        &json!({"model": "rank", "query": "what do cats do?", "documents": docs, "return_documents": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), docs.len());
    let scores: Vec<f64> = results
        .iter()
        .map(|x| x["relevance_score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "sorted: {scores:?}"
    );
    let mut indices: Vec<u64> = results
        .iter()
        .map(|x| x["index"].as_u64().unwrap())
        .collect();
    for x in results {
        let i = x["index"].as_u64().unwrap() as usize;
        assert_eq!(x["document"]["text"], docs[i]);
    }
    indices.sort();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // Each score is the model's score of that pair alone: nothing mixed up in batching.
    for x in results {
        let i = x["index"].as_u64().unwrap() as usize;
        let one = s
            .post(
                "/v1/rerank",
                &json!({"model": "rank", "query": "what do cats do?", "documents": [docs[i]]}),
            )
            .json();
        let alone = one["results"][0]["relevance_score"].as_f64().unwrap();
        // Batch shapes change float summation order a little; mixed-up pairs would be far off.
        assert!((alone - x["relevance_score"].as_f64().unwrap()).abs() < 2e-3);
    }

    let top = s
        .post(
            "/v1/rerank",
            &json!({"model": "rank", "query": "what do cats do?", "documents": docs, "top_n": 2}),
        )
        .json();
    let top = top["results"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["index"], results[0]["index"]);
    assert_eq!(top[1]["index"], results[1]["index"]);
    assert!(
        top[0].get("document").is_none(),
        "documents only when asked"
    );

    let r = s.post(
        "/v1/rerank",
        &json!({"model": "emb", "query": "q", "documents": ["d"]}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "model_not_supported");
    let r = s.post(
        "/v1/rerank",
        &json!({"model": "rank", "query": "q", "documents": []}),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn minilm_embeddings_put_related_sentences_closer() {
    let Some(path) = real_model(
        "all-MiniLM-L6-v2.gguf",
        "cargo run --release -p lumen-llama -- fetch-model minilm",
    ) else {
        return;
    };
    let s = Sidecar::start(&[
        "--model".into(),
        format!("minilm={}:pooling=mean", path.display()),
    ]);
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "A cheetah is running behind its prey.",
    ];
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": sentences}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    let vs: Vec<Vec<f64>> = r["data"].as_array().unwrap().iter().map(vector).collect();
    assert_eq!(vs[0].len(), 384);
    let related = cosine(&vs[0], &vs[1]);
    let unrelated = cosine(&vs[0], &vs[2]).max(cosine(&vs[0], &vs[3]));
    assert!(
        related > unrelated + 0.4,
        "related {related:.3} should clearly beat unrelated {unrelated:.3}"
    );
    // Reference cosines from the original model (sentence-transformers / an independent
    // forward pass over the same safetensors): 0.7553, -0.0461, 0.1419.
    for (i, reference) in [(1, 0.7553), (2, -0.0461), (3, 0.1419)] {
        let got = cosine(&vs[0], &vs[i]);
        assert!(
            (got - reference).abs() < 0.01,
            "pair 0-{i}: {got:.4} vs {reference}"
        );
    }
}
