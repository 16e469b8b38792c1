//! Per-key limits through the real gateway: burst then refusal, Retry-After and the
//! `x-ratelimit-*` headers (stream and non-stream), concurrency caps, token-claim limits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use lumen_test_support::client::Client;
use lumen_test_support::openai::{chat, chat_with};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

const SECRET: &str = "limits-test-secret-0123456789abcdef";

fn start(mock: &MockUpstream) -> Lumen {
    Lumen::start(&format!(
        r#"
keys:
  - {{ id: bursty, key: "sk-bursty", limits: {{ requests_per_minute: 60, burst: 3 }} }}
  - {{ id: narrow, key: "sk-narrow", limits: {{ concurrent_requests: 2 }} }}
  - {{ id: free, key: "sk-free" }}
  - {{ id: budget, key: "sk-budget", limits: {{ tokens_per_minute: 300 }} }}
  - {{ id: streamer, key: "sk-streamer", limits: {{ tokens_per_minute: 300 }} }}
jwt:
  - {{ issuer: "https://idp.test", algorithms: [HS256], secret: "{SECRET}" }}
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: chat10, targets: [ {{ provider: mock, model: up }} ], limits: {{ requests_per_minute: 60, burst: 2 }} }}
"#,
        base = mock.base_url()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_admitted_then_refused_with_retry_after() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    for remaining in ["2", "1", "0"] {
        let resp = lumen.post_chat_as("sk-bursty", &chat("fast", "hi")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(
            resp.header("x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        assert!(resp.header("x-ratelimit-reset-requests").is_some());
    }
    let refused = lumen.post_chat_as("sk-bursty", &chat("fast", "hi")).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["type"], "rate_limit_exceeded");
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        mock.requests().len(),
        3,
        "a refused request never reaches the upstream"
    );
    // Other keys have their own buckets; keys without limits get no headers.
    let other = lumen.post_chat_as("sk-free", &chat("fast", "hi")).await;
    assert_eq!(other.status, 200);
    assert!(other.header("x-ratelimit-limit-requests").is_none());
    // One request per second refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        lumen
            .post_chat_as("sk-bursty", &chat("fast", "hi"))
            .await
            .status,
        200
    );

    lumen_test_support::harness::scrape_until(
        lumen.admin,
        r#"lumen_rate_limited_total{key="bursty",reason="requests"} 1"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_responses_carry_the_headers_too() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let body = json!({"model": "fast", "stream": true, "messages": [], "mock_chunks": 2});
    let resp = lumen.post_chat_as("sk-bursty", &body).await;
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(resp.header("x-ratelimit-remaining-requests"), Some("2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_is_capped_and_released() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let slow = json!({"model": "fast", "stream": true, "messages": [], "mock_chunks": 4, "mock_delay_ms": 300});
    let addr = lumen.addr;
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let body = slow.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                c.post_json(
                    "/v1/chat/completions",
                    &[("authorization", "Bearer sk-narrow")],
                    &body,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lumen_test_support::harness::scrape_until(lumen.admin, "lumen_requests_in_flight 2").await;
    let third = lumen.post_chat_as("sk-narrow", &chat("fast", "hi")).await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert!(third.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("concurrency"));
    for s in streams {
        assert_eq!(s.await.unwrap().status, 200);
    }
    assert_eq!(
        lumen
            .post_chat_as("sk-narrow", &chat("fast", "hi"))
            .await
            .status,
        200,
        "slots were released"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_claim_sets_the_rate() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = encode(
        &Header::default(),
        &json!({"iss": "https://idp.test", "sub": "svc", "exp": exp, "rpm": 2}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        lumen.post_chat_as(&token, &chat("fast", "hi")).await.status,
        200
    );
    assert_eq!(
        lumen.post_chat_as(&token, &chat("fast", "hi")).await.status,
        200
    );
    let refused = lumen.post_chat_as(&token, &chat("fast", "hi")).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("2"));
}

fn with_max(max_tokens: u64, stream: bool) -> serde_json::Value {
    chat_with(
        "fast",
        "hi",
        json!({"max_tokens": max_tokens, "stream": stream, "mock_chunks": 3}),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn token_reservations_are_settled_with_real_usage() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let first = lumen.post_chat_as("sk-budget", &with_max(200, false)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("300"));
    let remaining: u64 = first
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 100,
        "the estimate (prompt + max_tokens) is reserved: {remaining}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The mock used 11 tokens: the rest was refunded, so a second 200-token request fits.
    let second = lumen.post_chat_as("sk-budget", &with_max(200, false)).await;
    assert_eq!(second.status, 200, "{}", second.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let too_big = lumen.post_chat_as("sk-budget", &with_max(290, false)).await;
    assert_eq!(too_big.status, 429);
    assert_eq!(too_big.json()["error"]["type"], "rate_limit_exceeded");
    assert!(too_big.header("retry-after").is_some());
    assert_eq!(too_big.header("x-ratelimit-limit-tokens"), Some("300"));
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_ask_for_usage_and_settle_on_it() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let first = lumen
        .post_chat_as("sk-streamer", &with_max(200, true))
        .await;
    assert_eq!(first.status, 200);
    assert!(first.header("x-ratelimit-remaining-tokens").is_some());
    assert_eq!(
        mock.requests()[0].json()["stream_options"]["include_usage"],
        true
    );
    // Asked for on the client's behalf, so not passed on to it.
    assert!(!first.sse_data().iter().any(|d| d.contains("\"usage\"")));
    assert_eq!(first.sse_data().last().map(String::as_str), Some("[DONE]"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Settled at the 10 tokens the stream reported, so another fits.
    assert_eq!(
        lumen
            .post_chat_as("sk-streamer", &with_max(200, true))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_limit_applies_per_key_on_that_route_only() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let on_route = || chat("chat10", "hi");
    let first = lumen.post_chat_as("sk-free", &on_route()).await;
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(lumen.post_chat_as("sk-free", &on_route()).await.status, 200);
    let refused = lumen.post_chat_as("sk-free", &on_route()).await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        lumen
            .post_chat_as("sk-free", &chat("fast", "hi"))
            .await
            .status,
        200,
        "other routes are not limited"
    );
    assert_eq!(
        lumen.post_chat_as("sk-narrow", &on_route()).await.status,
        200,
        "other keys have their own bucket"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn floods_from_one_address_are_cut_before_auth() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
limits: {{ per_ip: {{ requests_per_minute: 60, burst: 3 }} }}
keys: [ {{ id: a, key: "sk-a" }} ]
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        base = mock.base_url()
    ));
    for _ in 0..3 {
        assert_eq!(
            lumen
                .post_chat_as("sk-wrong", &chat("fast", "hi"))
                .await
                .status,
            401
        );
    }
    let refused = lumen.post_chat_as("sk-a", &chat("fast", "hi")).await;
    assert_eq!(
        refused.status, 429,
        "even a good key, from a flooding address"
    );
    assert!(refused.header("retry-after").is_some());
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        r#"lumen_rate_limited_total{key="ip",reason="requests"} 1"#,
    )
    .await;
    let mut c = Client::connect(lumen.addr).await.unwrap();
    assert_eq!(
        c.request("GET", "/healthz", &[], b"").await.unwrap().status,
        200,
        "probes are never limited"
    );
}

fn per_ip_config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
limits: {{ per_ip: {{ requests_per_minute: 60, burst: 3 }} }}
keys: [ {{ id: a, key: "sk-a" }} ]
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
{extra}
"#,
        base = mock.base_url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_token_on_a_public_listener_is_ignored_and_the_address_limit_still_applies() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&per_ip_config(&mock, ""));
    let real_looking = "0123456789abcdef0123456789abcdef";
    // The token does not authenticate: without a key, the caller is refused as keyless.
    let keyless = lumen
        .post_chat(&[("x-lumen-job-token", real_looking)], &chat("fast", "hi"))
        .await;
    assert_eq!(keyless.status, 401);
    assert!(
        keyless.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing API key"),
        "{}",
        keyless.text()
    );
    // Nor does a bogus one refuse a caller with a good key: it is a normal caller...
    for token in ["bogus", real_looking] {
        let r = lumen
            .post_chat(
                &[
                    ("authorization", "Bearer sk-a"),
                    ("x-lumen-job-token", token),
                ],
                &chat("fast", "hi"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // ...counted by its address like everyone: the fourth request in the burst is cut.
    let cut = lumen
        .post_chat(
            &[
                ("authorization", "Bearer sk-a"),
                ("x-lumen-job-token", "bogus"),
            ],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(cut.status, 429, "{}", cut.text());
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.header("x-lumen-job-token").is_none()),
        "the header is never forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_ipv6_clients_are_limited_per_64() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&per_ip_config(
        &mock,
        r#"server: { trusted_proxies: ["127.0.0.1"] }"#,
    ));
    let key = ("authorization", "Bearer sk-a");
    // Three addresses of one /64 (one client changing its low bits) share one bucket.
    for client in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "198.51.100.1, 2001:db8:1:2:aaaa:bbbb:cccc:dddd",
    ] {
        let r = lumen
            .post_chat(&[key, ("x-forwarded-for", client)], &chat("fast", "hi"))
            .await;
        assert_eq!(r.status, 200, "{client}: {}", r.text());
    }
    let cut = lumen
        .post_chat(
            &[key, ("x-forwarded-for", "2001:db8:1:2:ffff::9")],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(cut.status, 429, "another address of the same /64");
    // Another /64 is another client; so is the proxy itself (no header).
    let other = lumen
        .post_chat(
            &[key, ("x-forwarded-for", "2001:db8:1:3::1")],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(
        lumen.post_chat(&[key], &chat("fast", "hi")).await.status,
        200
    );
    // The right-most untrusted entry counts, not what the client put first.
    let forged = lumen
        .post_chat(
            &[key, ("x-forwarded-for", "203.0.113.50, 2001:db8:1:2::77")],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(forged.status, 429, "the client is still 2001:db8:1:2::/64");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&per_ip_config(&mock, ""));
    let key = ("authorization", "Bearer sk-a");
    for i in 0..3 {
        let client = format!("2001:db8:{i}::1");
        let r = lumen
            .post_chat(
                &[key, ("x-forwarded-for", client.as_str())],
                &chat("fast", "hi"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let cut = lumen
        .post_chat(
            &[key, ("x-forwarded-for", "2001:db8:99::1")],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(
        cut.status, 429,
        "no proxy is trusted by default: every request is 127.0.0.1's"
    );
}

/// A key's concurrency slot and its token reservation are given back the moment its answer is
/// complete, before the client is sent the last of it: a client that has its answer and asks
/// again at once, on another connection (and, with `runtime: per_core`, another thread),
/// finds them free and settled, while the first request is still winding down (held here by
/// a test pause after its answer went out). Answers, streams, stripped streams and errors alike.
#[tokio::test(flavor = "multi_thread")]
async fn limits_are_given_back_before_the_client_has_its_answer() {
    let mock = MockUpstream::start();
    let yaml = format!(
        r#"
keys:
  - {{ id: one, key: "sk-one", limits: {{ concurrent_requests: 1, tokens_per_minute: 100000 }} }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
  gone: {{ base_url: "http://127.0.0.1:9", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: dead, targets: [ {{ provider: gone, model: up }} ], retry: {{ attempts: 1 }} }}
"#,
        mock.base_url()
    );
    let lumen = Lumen::start_with_env(&yaml, &[("LUMEN_TEST_FAULTS", "1")]);
    let pause = ("x-lumen-test-pause", "answer-sent");
    let auth = "Bearer sk-one".to_string();
    let cases = [
        ("answer", with_max(50_000, false)),
        ("stream", with_max(50_000, true)),
        ("stream, usage stripped", {
            let mut body = with_max(50_000, true);
            body["stream_options"] = json!({"include_usage": false});
            body
        }),
    ];
    for (case, body) in cases {
        let first = lumen
            .post_chat(&[("authorization", &auth), pause], &body)
            .await;
        assert_eq!(first.status, 200, "{case}: {}", first.text());
        // The first request is still paused (500 ms) after its answer went out.
        let again = lumen
            .post_chat(&[("authorization", &auth)], &chat("fast", "hi"))
            .await;
        assert_eq!(
            again.status,
            200,
            "{case}: the slot was free: {}",
            again.text()
        );
        let remaining: u64 = again
            .header("x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            remaining > 90_000,
            "{case}: settled on the usage, not the 50,000-token estimate: {remaining}"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // An error answer gives the slot back before it goes out too.
    let failed = lumen
        .post_chat(&[("authorization", &auth), pause], &chat("dead", "hi"))
        .await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    let again = lumen
        .post_chat(&[("authorization", &auth)], &chat("fast", "hi"))
        .await;
    assert_eq!(again.status, 200, "the slot was free: {}", again.text());
}
