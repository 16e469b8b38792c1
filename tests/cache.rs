//! The response cache, end to end: the real `lumen` binary, the mock provider, and a real
//! `redis-server` for the shared tier.

use std::time::Duration;

use lumen_test_support::client::{Client, Response};
use lumen_test_support::harness::RedisServer;
use lumen_test_support::openai::chat_with;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice", tenant: acme }}
  - {{ id: bob, key: "sk-bob", tenant: acme }}
  - {{ id: carol, key: "sk-carol", tenant: other }}
  - {{ id: thrifty, key: "sk-thrifty", limits: {{ tokens_per_minute: 1000 }} }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - model: cached
    targets: [ {{ provider: mock, model: up }} ]
    cache: {{ ttl: 10m }}
  - model: short
    targets: [ {{ provider: mock, model: up }} ]
    cache: {{ ttl: 300ms }}
  - model: shared
    targets: [ {{ provider: mock, model: up }} ]
    cache: {{ ttl: 10m, scope: global }}
  - model: team
    targets: [ {{ provider: mock, model: up }} ]
    cache: {{ ttl: 10m, scope: tenant }}
  - model: slow
    targets: [ {{ provider: mock, model: slow-400 }} ]
    cache: {{ ttl: 10m }}
  - model: breaks
    targets: [ {{ provider: mock, model: drop-mid-stream }} ]
    cache: {{ ttl: 10m }}
  - model: embed
    targets: [ {{ provider: mock, model: up-embed }} ]
    cache: {{ ttl: 10m }}
  - model: plain
    targets: [ {{ provider: mock, model: up }} ]
  - model: fails-once
    targets: [ {{ provider: mock, model: fail-first-300 }} ]
    retry: {{ attempts: 1 }}
    cache: {{ ttl: 10m }}
{extra}"#,
        base = mock.base_url()
    )
}

/// The request these tests repeat: greedy (`temperature: 0`), so the cache may store it.
fn cacheable(model: &str) -> Value {
    chat_with(model, "hello", json!({"temperature": 0}))
}

async fn send(lumen: &Lumen, key: &str, body: &Value, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    Client::connect(lumen.addr)
        .await
        .unwrap()
        .post_json(
            if body.get("input").is_some() {
                "/v1/embeddings"
            } else {
                "/v1/chat/completions"
            },
            &headers,
            body,
        )
        .await
        .unwrap()
}

fn chat_calls(mock: &MockUpstream) -> usize {
    mock.requests().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_is_a_hit_with_age_and_no_upstream_call() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let first = send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-lumen-cache"), Some("miss"));
    let second = send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-lumen-cache"), Some("hit"));
    assert!(second.header("age").is_some());
    assert_eq!(second.header("x-lumen-provider"), Some("mock"));
    assert_eq!(second.json(), first.json());
    assert_eq!(chat_calls(&mock), 1);

    // Not deterministic: never cached, no cache header.
    let mut warm = cacheable("cached");
    warm["temperature"] = json!(0.7);
    for _ in 0..2 {
        let r = send(&lumen, "sk-alice", &warm, &[]).await;
        assert_eq!(r.header("x-lumen-cache"), None);
    }
    assert_eq!(chat_calls(&mock), 3);
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_cache_requests_total{result=\"hit\",route=\"cached\"} 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_expire_after_their_ttl() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    send(&lumen, "sk-alice", &cacheable("short"), &[]).await;
    let hit = send(&lumen, "sk-alice", &cacheable("short"), &[]).await;
    assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let expired = send(&lumen, "sk-alice", &cacheable("short"), &[]).await;
    assert_eq!(expired.header("x-lumen-cache"), Some("miss"));
    assert_eq!(chat_calls(&mock), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_ignores_json_order_and_stream_but_not_output_fields() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    // Same request, keys reordered, whitespace, 0.0 for 0, a user id: a hit.
    let reordered: Value = serde_json::from_str(
        r#"{ "messages": [ { "content": "hello", "role": "user" } ],
             "temperature": 0.0, "user": "u-1", "model": "cached" }"#,
    )
    .unwrap();
    let r = send(&lumen, "sk-alice", &reordered, &[]).await;
    assert_eq!(r.header("x-lumen-cache"), Some("hit"));
    // Every field that changes the output makes a different key.
    for (field, value) in [
        ("max_tokens", json!(7)),
        ("top_p", json!(0.5)),
        ("stop", json!(["\n"])),
        ("seed", json!(3)),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut b = cacheable("cached");
        b[field] = value;
        let r = send(&lumen, "sk-alice", &b, &[]).await;
        assert_eq!(r.header("x-lumen-cache"), Some("miss"), "{field}");
    }
    let mut other = cacheable("cached");
    other["messages"][0]["content"] = json!("hello!");
    assert_eq!(
        send(&lumen, "sk-alice", &other, &[])
            .await
            .header("x-lumen-cache"),
        Some("miss")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_answer_is_replayed_as_a_stream_and_a_stream_as_json() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    // JSON first, then the same request as a stream.
    let json_first = send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    let mut stream = cacheable("cached");
    stream["stream"] = json!(true);
    let replay = send(&lumen, "sk-alice", &stream, &[]).await;
    assert_eq!(replay.header("x-lumen-cache"), Some("hit"));
    assert_eq!(replay.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        replay.chat_stream_text(),
        json_first.json()["choices"][0]["message"]["content"]
    );
    let data = replay.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");

    // A stream first (stored once [DONE] arrived), then JSON.
    let mut other = cacheable("cached");
    other["messages"][0]["content"] = json!("stream me");
    other["stream"] = json!(true);
    other["mock_chunks"] = json!(4);
    let streamed = send(&lumen, "sk-alice", &other, &[]).await;
    assert_eq!(streamed.header("x-lumen-cache"), Some("miss"));
    assert_eq!(streamed.chat_stream_text(), "tok0 tok1 tok2 tok3 ");
    other["stream"] = json!(false);
    let as_json = send(&lumen, "sk-alice", &other, &[]).await;
    assert_eq!(as_json.header("x-lumen-cache"), Some("hit"));
    let body = as_json.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 "
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(chat_calls(&mock), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_stream_is_never_stored() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let mut b = cacheable("breaks");
    b["stream"] = json!(true);
    b["mock_chunks"] = json!(5);
    for _ in 0..2 {
        let r = send(&lumen, "sk-alice", &b, &[]).await;
        assert_eq!(r.header("x-lumen-cache"), Some("miss"));
        let last: Value = serde_json::from_str(r.sse_data().last().unwrap()).unwrap();
        assert!(last.get("error").is_some());
    }
    assert_eq!(chat_calls(&mock), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_keep_answers_to_their_key_tenant_or_everyone() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    let bob = send(&lumen, "sk-bob", &cacheable("cached"), &[]).await;
    assert_eq!(
        bob.header("x-lumen-cache"),
        Some("miss"),
        "scope key: never across keys"
    );

    send(&lumen, "sk-alice", &cacheable("team"), &[]).await;
    let bob = send(&lumen, "sk-bob", &cacheable("team"), &[]).await;
    assert_eq!(bob.header("x-lumen-cache"), Some("hit"), "same tenant");
    let carol = send(&lumen, "sk-carol", &cacheable("team"), &[]).await;
    assert_eq!(carol.header("x-lumen-cache"), Some("miss"), "other tenant");

    send(&lumen, "sk-alice", &cacheable("shared"), &[]).await;
    let carol = send(&lumen, "sk-carol", &cacheable("shared"), &[]).await;
    assert_eq!(carol.header("x-lumen-cache"), Some("hit"), "global");
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_control_no_cache_refreshes_and_no_store_bypasses() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let bypass = send(
        &lumen,
        "sk-alice",
        &cacheable("cached"),
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(bypass.header("x-lumen-cache"), Some("bypass"));
    let after = send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(
        after.header("x-lumen-cache"),
        Some("miss"),
        "no-store stored nothing"
    );
    let refresh = send(
        &lumen,
        "sk-alice",
        &cacheable("cached"),
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(
        refresh.header("x-lumen-cache"),
        Some("miss"),
        "no-cache skips the lookup"
    );
    assert_eq!(chat_calls(&mock), 3);
    let hit = send(&lumen, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    assert_eq!(chat_calls(&mock), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_are_cached_per_item_and_only_misses_go_upstream() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let first = send(
        &lumen,
        "sk-alice",
        &json!({"model": "embed", "input": ["apple", "banana"]}),
        &[],
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-lumen-cache"), Some("miss"));
    let vectors: Vec<Value> = first.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].clone())
        .collect();
    mock.clear();

    let second = send(
        &lumen,
        "sk-alice",
        &json!({"model": "embed", "input": ["banana", "cherry", "apple"]}),
        &[],
    )
    .await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.header("x-lumen-cache-items"), Some("2/3"));
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].json()["input"],
        json!(["cherry"]),
        "only the miss went upstream"
    );
    assert_eq!(seen[0].json()["model"], "up-embed");
    let body = second.json();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
    }
    assert_eq!(
        data[0]["embedding"], vectors[1],
        "banana from the cache, in place"
    );
    assert_eq!(
        data[2]["embedding"], vectors[0],
        "apple from the cache, in place"
    );
    assert_eq!(
        body["usage"]["prompt_tokens"], 3,
        "only the miss was billed"
    );

    mock.clear();
    let all_hit = send(
        &lumen,
        "sk-alice",
        &json!({"model": "embed", "input": ["cherry", "apple"]}),
        &[],
    )
    .await;
    assert_eq!(all_hit.header("x-lumen-cache"), Some("hit"));
    assert!(mock.requests().is_empty());
    assert_eq!(all_hit.json()["data"][1]["embedding"], vectors[0]);
}

async fn concurrent(lumen: &Lumen, body: &Value, n: usize) -> Vec<Response> {
    concurrent_at(lumen, "/v1/chat/completions", body, n).await
}

async fn concurrent_at(lumen: &Lumen, path: &'static str, body: &Value, n: usize) -> Vec<Response> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (addr, body) = (lumen.addr, body.clone());
            tokio::spawn(async move {
                Client::connect(addr)
                    .await
                    .unwrap()
                    .post_json(path, &[("authorization", "Bearer sk-alice")], &body)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_identical_requests_in_flight_make_one_upstream_call() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let responses = concurrent(&lumen, &cacheable("slow"), 50).await;
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            "mock reply from slow-400"
        );
    }
    assert_eq!(chat_calls(&mock), 1, "non-stream");
    let coalesced = responses
        .iter()
        .filter(|r| r.header("x-lumen-coalesced").is_some())
        .count();
    assert!(coalesced >= 40, "{coalesced}");

    // Streams: followers get the leader's chunks as they arrive.
    mock.clear();
    let mut stream = cacheable("cached");
    stream["messages"][0]["content"] = json!("a slow stream");
    stream["stream"] = json!(true);
    stream["mock_chunks"] = json!(5);
    stream["mock_delay_ms"] = json!(80);
    let responses = concurrent(&lumen, &stream, 50).await;
    for r in &responses {
        assert_eq!(r.status, 200);
        assert_eq!(r.chat_stream_text(), "tok0 tok1 tok2 tok3 tok4 ");
        assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    }
    assert_eq!(chat_calls(&mock), 1, "stream");
    // A follower saw its first chunk long before the leader's stream ended.
    let follower = responses
        .iter()
        .find(|r| r.header("x-lumen-coalesced").is_some())
        .expect("a follower");
    let first = follower.chunks.first().unwrap().0;
    let last = follower.chunks.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(200),
        "{first:?} {last:?}"
    );
}

/// Responses and Messages requests share flights too: the flight carries the provider's chat
/// answer and each follower translates it for itself (its own id; a stored response each).
#[tokio::test(flavor = "multi_thread")]
async fn identical_translated_requests_in_flight_make_one_upstream_call() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let body = json!({"model": "slow", "input": "hello", "temperature": 0});
    let responses = concurrent_at(&lumen, "/v1/responses", &body, 20).await;
    let mut ids = std::collections::HashSet::new();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "response");
        assert_eq!(
            v["output"][0]["content"][0]["text"],
            "mock reply from slow-400"
        );
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_string()),
            "ids differ"
        );
    }
    assert_eq!(chat_calls(&mock), 1, "responses");
    let followers: Vec<_> = responses
        .iter()
        .filter(|r| r.header("x-lumen-coalesced").is_some())
        .collect();
    assert!(followers.len() >= 15, "{}", followers.len());
    // A follower's response is stored under its own id, for its next turn.
    let id = followers[0].json()["id"].as_str().unwrap().to_string();
    let stored = Client::connect(lumen.addr)
        .await
        .unwrap()
        .request(
            "GET",
            &format!("/v1/responses/{id}"),
            &[("authorization", "Bearer sk-alice")],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(stored.json()["id"], id.as_str());

    // Messages streams: followers get Anthropic's events as the leader's chunks arrive.
    mock.clear();
    // (The translation passes no mock_* fields on: the slow model holds the answer back.)
    let body = json!({"model": "slow", "max_tokens": 64, "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": "a slow stream"}]});
    let responses = concurrent_at(&lumen, "/v1/messages", &body, 20).await;
    let mut ids = std::collections::HashSet::new();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        // Named events (`event: …` then `data: …`).
        let events: Vec<Value> = r
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(events.first().unwrap()["type"], "message_start");
        assert_eq!(events.last().unwrap()["type"], "message_stop");
        let text: String = events
            .iter()
            .filter_map(|e| e["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "tok0 tok1 tok2 ");
        let id = events[0]["message"]["id"].as_str().unwrap().to_string();
        assert!(ids.insert(id), "ids differ");
    }
    assert_eq!(chat_calls(&mock), 1, "messages stream");
    assert!(
        responses
            .iter()
            .filter(|r| r.header("x-lumen-coalesced").is_some())
            .count()
            >= 15
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_share_hits_through_redis_and_survive_its_loss() {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let extra = format!("redis: {{ url: \"{}\", timeout: 200ms }}\n", redis.url());
    let one = Lumen::start(&config(&mock, &extra));
    let two = Lumen::start(&config(&mock, &extra));
    let miss = send(&one, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(miss.header("x-lumen-cache"), Some("miss"));
    // The store to Redis happens just after the response: give it a moment.
    let mut hit = None;
    for _ in 0..50 {
        let r = send(&two, "sk-alice", &cacheable("cached"), &[]).await;
        if r.header("x-lumen-cache") == Some("hit") {
            hit = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = hit.expect("node two hits what node one stored");
    assert_eq!(hit.json(), miss.json());

    redis.kill();
    let mut other = cacheable("cached");
    other["messages"][0]["content"] = json!("while redis is down");
    for node in [&one, &two] {
        let r = send(node, "sk-alice", &other, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Memory still answers what each node holds.
    let r = send(&one, "sk-alice", &cacheable("cached"), &[]).await;
    assert_eq!(r.header("x-lumen-cache"), Some("hit"));
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_fails_one_follower_takes_over() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let responses = concurrent(&lumen, &cacheable("fails-once"), 10).await;
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let failed = responses.iter().filter(|r| r.status == 503).count();
    assert_eq!((ok, failed), (9, 1), "only the leader saw its failure");
    assert_eq!(
        chat_calls(&mock),
        2,
        "one follower took over; the rest followed it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_count_as_requests_but_spend_no_tokens() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let mut body = cacheable("cached");
    body["max_tokens"] = json!(300);
    // The miss reserves its estimate and settles at the 11 tokens the mock reports.
    let miss = send(&lumen, "sk-thrifty", &body, &[]).await;
    assert_eq!(miss.status, 200);
    // Hits: none reserves 300 tokens, so ten of them fit in a 1000-token budget.
    for _ in 0..10 {
        let hit = send(&lumen, "sk-thrifty", &body, &[]).await;
        assert_eq!(hit.status, 200, "{}", hit.text());
        assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    }
    // A new request still finds the budget nearly whole.
    let mut other = body.clone();
    other["messages"][0]["content"] = json!("something new");
    let fresh = send(&lumen, "sk-thrifty", &other, &[]).await;
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    let left: u64 = fresh
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 600, "{left}");
}
