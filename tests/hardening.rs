//! Regression tests for defects an adversarial review reproduced against the release binary
//! (issue 16): each drives the real `lumen` in front of the mock provider (and a real Redis
//! where the defect was fleet-wide) and fails without its fix.

use std::time::Duration;

use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::{scrape_until, RedisServer};
use lumen_test_support::openai::{bearer, chat};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn expect_continue_is_answered_at_the_edge_and_interim_answers_are_skipped() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: plain, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: interim, targets: [ {{ provider: mock, model: interim-100 }} ] }}
"#,
        mock.base_url()
    ));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for model in ["plain", "interim"] {
        let body = serde_json::to_vec(&chat(model, "hello")).unwrap();
        let mut c = tokio::net::TcpStream::connect(lumen.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        // The gateway says go ahead before the body is sent.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .expect("an answer to Expect")
                .unwrap();
            assert!(n > 0, "closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 100"),
            "{model}: {}",
            String::from_utf8_lossy(&got)
        );
        c.write_all(&body).await.unwrap();
        let mut rest = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .expect("the final answer")
                .unwrap();
            rest.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&rest);
            if n == 0 || text.contains("\"finish_reason\"") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains("HTTP/1.1 200"), "{model}: {text}");
        assert!(
            !text.contains("HTTP/1.1 100"),
            "one interim answer only: {text}"
        );
    }
    assert!(
        mock.requests().iter().all(|r| r.header("expect").is_none()),
        "Expect is never forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_request_leaves_the_circuit_the_fleet_slot_and_the_budget_as_they_were() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let lumen = Lumen::start_with_env(
        &format!(
            r#"redis: {{ url: "{url}", timeout: 500ms }}
keys:
  - {{ id: one, key: "sk-one", limits: {{ concurrent_requests: 1, tokens_per_minute: 100000 }} }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }}, circuit: {{ failures: 1, cooldown: 1s }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: fail-first-0 }} ], retry: {{ attempts: 1 }} }}
"#,
            url = redis.url(),
            base = mock.base_url()
        ),
        &[("LUMEN_TEST_FAULTS", "1")],
    );
    let auth = bearer("sk-one");
    // The first answer is a 503: the circuit opens (one failure is enough here).
    let first = lumen
        .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
        .await;
    assert_eq!(first.status, 503, "{}", first.text());
    // (The first request's slot is given back just after its answer: a client this quick may
    // meet it still taken, as with any concurrency limit.)
    let mut open = lumen
        .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
        .await;
    for _ in 0..20 {
        if open.status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        open = lumen
            .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
            .await;
    }
    assert_eq!(open.status, 503, "{}", open.text());
    assert!(open.text().contains("circuit_open"), "{}", open.text());
    // After the cooldown the next request is the half-open trial; it panics mid-attempt,
    // holding the trial permit, the key's fleet-wide slot and a token reservation.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let panicked = c
        .post_json(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-lumen-test-panic", "attempt")],
            &chat("m", "hello"),
        )
        .await;
    assert!(panicked.is_err(), "the panicking request gets no answer");
    // The guards give back off the request's path: let them land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Everything it held was given back: the trial is free (no circuit_open until restart)
    // and the key's only slot is free (no 429).
    let mut last = None;
    for _ in 0..20 {
        let resp = lumen
            .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
            .await;
        if resp.status == 200 {
            last = Some(resp);
            break;
        }
        last = Some(resp);
        // Long enough for the refused request's own settle to land before the next.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = last.unwrap();
    assert_eq!(last.status, 200, "{}", last.text());
    // And its token reservation was refunded: all that is held is this request's own
    // estimate (a quarter of the body's bytes plus 512 completion tokens).
    let estimate = serde_json::to_vec(&chat("m", "hello"))
        .unwrap()
        .len()
        .div_ceil(4)
        + 512;
    assert_eq!(
        last.header("x-ratelimit-remaining-tokens"),
        Some((100_000 - estimate).to_string().as_str()),
        "the panicked request's reservation is still counted"
    );
    let metrics = scrape_until(lumen.admin, "lumen_requests_in_flight 0").await;
    assert!(metrics.contains("lumen_requests_in_flight 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_token_counts_are_refused_by_name_and_cannot_reset_a_budget() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"keys:
  - {{ id: small, key: "sk-small", limits: {{ tokens_per_minute: 2000 }} }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    let auth = bearer("sk-small");
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat("m", "hello");
        body[field] = json!(18446744073709551615u64);
        let resp = lumen.post_chat(&[("authorization", &auth)], &body).await;
        assert_eq!(resp.status, 400, "{}", resp.text());
        let v = resp.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], field);
    }
    // The budget still holds: a request estimated over it is refused.
    let mut body = chat("m", "hello");
    body["max_tokens"] = json!(5000);
    assert_eq!(
        lumen
            .post_chat(&[("authorization", &auth)], &body)
            .await
            .status,
        429
    );
    assert!(mock.requests().is_empty(), "nothing reached the provider");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_answer_costs_the_provider_quota_nothing() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }}, quota: {{ tokens_per_minute: 5000 }} }}
routes:
  - {{ model: bad, targets: [ {{ provider: mock, model: status-400 }} ] }}
  - {{ model: good, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    // A client-chosen huge max_tokens on a request the provider refuses.
    let mut body = chat("bad", "hello");
    body["max_tokens"] = json!(1_000_000_000u64);
    for _ in 0..3 {
        let resp = lumen.post_chat(&[], &body).await;
        assert_eq!(resp.status, 400, "{}", resp.text());
    }
    // The quota was charged what the provider reported (nothing), not the estimate: every
    // tenant is still served.
    let resp = lumen.post_chat(&[], &chat("good", "hello")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_always_ask_for_usage_and_settle_on_it() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"keys:
  - {{ id: s, key: "sk-s", limits: {{ tokens_per_minute: 100000 }} }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    let auth = bearer("sk-s");
    // The client opts out of usage and asks for a huge completion budget.
    let mut body = chat("m", "hello");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(50_000);
    body["stream_options"] = json!({"include_usage": false});
    let resp = lumen.post_chat(&[("authorization", &auth)], &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        !resp.text().contains("\"usage\""),
        "the client did not ask for the usage chunk: {}",
        resp.text()
    );
    assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());
    let sent = mock.requests().pop().unwrap().json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // Settled with the reported 10 tokens, not the 50,000+ estimate.
    let next = lumen
        .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
        .await;
    let remaining: u64 = next
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining > 90_000, "charged the estimate: {remaining}");

    // A client that leaves mid-stream pays for what was streamed, not nothing.
    let mut body = chat("m", "hello");
    body["stream"] = json!(true);
    body["mock_chunks"] = json!(40);
    body["mock_delay_ms"] = json!(50);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let bytes = serde_json::to_vec(&body).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        bytes.len()
    );
    c.send_raw(head.as_bytes()).await.unwrap();
    c.send_raw(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = lumen
        .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
        .await;
    let left: u64 = after
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // Before the cut stream: `remaining` minus the second request's 11 tokens. The cut stream
    // cost its prompt and a few streamed events: some tokens, far below its 512+ estimate.
    let before = remaining - 11;
    assert!(left < before, "a cut stream is never settled at zero");
    assert!(
        before - left < 500,
        "charged the estimate: {}",
        before - left
    );
}

/// A client that saw a broken stream end and asks again at once gets an attempt of its own:
/// it does not follow the broken answer's cache flight, even while the failed request is
/// still winding down (held here by a test pause after its client saw the end).
#[tokio::test(flavor = "multi_thread")]
async fn asking_again_right_after_a_broken_stream_does_not_follow_it() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start_with_env(
        &format!(
            r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: nodone, targets: [ {{ provider: mock, model: no-done }} ], cache: {{ ttl: 10m, when: always }} }}
"#,
            mock.base_url()
        ),
        &[("LUMEN_TEST_FAULTS", "1")],
    );
    let mut body = chat("nodone", "hello");
    body["stream"] = json!(true);
    body["temperature"] = json!(0);
    let first = lumen
        .post_chat(&[("x-lumen-test-pause", "forward-failed")], &body)
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-lumen-cache"), Some("miss"));
    assert!(first
        .sse_data()
        .last()
        .is_some_and(|d| d.contains("\"error\"")));
    // The first request is still paused (500 ms) behind its answer's end.
    let again = lumen.post_chat(&[], &body).await;
    assert_eq!(
        again.header("x-lumen-cache"),
        Some("miss"),
        "a fresh attempt, not a follower of the broken answer: {}",
        again.text()
    );
    assert!(again.header("x-lumen-coalesced").is_none());
    assert_eq!(
        mock.requests().len(),
        2,
        "each request reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_before_done_ends_with_an_error_and_is_never_cached() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: nodone, targets: [ {{ provider: mock, model: no-done }} ], cache: {{ ttl: 10m, when: always }} }}
  - {{ model: old, targets: [ {{ provider: mock, model: http10-stream }} ] }}
"#,
        mock.base_url()
    ));
    for model in ["nodone", "old"] {
        let mut body = chat(model, "hello");
        body["stream"] = json!(true);
        body["temperature"] = json!(0);
        let resp = lumen.post_chat(&[], &body).await;
        assert_eq!(resp.status, 200, "{model}");
        let data = resp.sse_data();
        let last = data.last().cloned().unwrap_or_default();
        assert!(
            last.contains("\"error\""),
            "{model}: a truncated stream ends with an error event: {}",
            resp.text()
        );
        assert!(!resp.text().contains("[DONE]"));
    }
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let mut raw = chat("old", "hello");
    raw["stream"] = json!(true);
    let resp = c
        .post_json("/v1/chat/completions", &[], &raw)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let mut body = chat("nodone", "hello");
    body["stream"] = json!(true);
    body["temperature"] = json!(0);
    let again = lumen.post_chat(&[], &body).await;
    assert_ne!(
        again.header("x-lumen-cache"),
        Some("hit"),
        "a broken stream is never stored"
    );
    let metrics = scrape_until(lumen.admin, "failed_mid_response").await;
    assert!(metrics.contains("failed_mid_response"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_answer_is_in_our_http_version() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: old, targets: [ {{ provider: mock, model: http10-stream }} ] }}
"#,
        mock.base_url()
    ));
    let mut body = chat("old", "hello");
    body["stream"] = json!(true);
    let wire = serde_json::to_vec(&body).unwrap();
    let mut stream = tokio::net::TcpStream::connect(lumen.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        wire.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&wire).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_headers_pass_an_allow_list_and_ours_are_never_doubled() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"keys:
  - {{ id: k, key: "sk-k", limits: {{ requests_per_minute: 600 }} }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    let mut body = chat("m", "hello");
    body["mock_headers"] = json!({
        "set-cookie": "session=secret",
        "server": "upstream/1.0",
        "openai-organization": "org-provider",
        "x-ratelimit-limit-requests": "10000",
        "openai-processing-ms": "12",
    });
    let resp = lumen
        .post_chat(&[("authorization", &bearer("sk-k"))], &body)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    for leaked in ["set-cookie", "server", "openai-organization"] {
        assert!(resp.header(leaked).is_none(), "{leaked} leaked");
    }
    let limits: Vec<_> = resp
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-ratelimit-limit-requests"))
        .collect();
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert_eq!(limits[0].1, "600", "Lumen's own limit, not the provider's");
    assert_eq!(resp.header("openai-processing-ms"), Some("12"));
    assert_eq!(
        resp.header("x-lumen-upstream-request-id"),
        Some("upstream-own-id")
    );
    assert_ne!(resp.header("x-request-id"), Some("upstream-own-id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coalesced_follower_gets_the_stream_it_asked_for_and_pays_nothing() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"keys:
  - {{ id: a, key: "sk-a", limits: {{ tokens_per_minute: 100000 }} }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m, scope: global }} }}
"#,
        mock.base_url()
    ));
    let auth = bearer("sk-a");
    let mut leader = chat("m", "hello");
    leader["stream"] = json!(true);
    leader["temperature"] = json!(0);
    leader["mock_delay_ms"] = json!(150);
    leader["stream_options"] = json!({"include_usage": true});
    let mut follower = leader.clone();
    follower.as_object_mut().unwrap().remove("stream_options");
    let addr = lumen.addr;
    let auth2 = auth.clone();
    let lead = tokio::spawn(async move {
        let mut c = Client::connect(addr).await.unwrap();
        c.post_json(
            "/v1/chat/completions",
            &[("authorization", &auth2)],
            &leader,
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let follow = lumen
        .post_chat(&[("authorization", &auth)], &follower)
        .await;
    let lead = lead.await.unwrap();
    assert_eq!(follow.header("x-lumen-coalesced"), Some("1"), "{follow:?}");
    assert!(
        lead.text().contains("\"usage\""),
        "the leader asked for usage"
    );
    assert!(
        !follow.text().contains("\"usage\""),
        "the follower did not: {}",
        follow.text()
    );
    assert_eq!(follow.chat_stream_text(), lead.chat_stream_text());
    // The follower paid nothing: only the leader's 10 tokens are gone.
    let next = lumen
        .post_chat(&[("authorization", &auth)], &chat("m", "hello"))
        .await;
    let remaining: u64 = next
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining >= 100_000 - 10 - 600, "{remaining}");
    assert_eq!(
        mock.requests().len(),
        2,
        "one upstream call for both streams"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_that_do_not_align_with_the_inputs_are_a_502_and_not_cached() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: e, targets: [ {{ provider: mock, model: embed-short }} ], cache: {{ ttl: 10m }} }}
"#,
        mock.base_url()
    ));
    let body = json!({"model": "e", "input": ["a", "b", "c"]});
    for _ in 0..2 {
        let resp = request(
            lumen.addr,
            "POST",
            "/v1/embeddings",
            &[("content-type", "application/json")],
            &serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status, 502, "{}", resp.text());
        assert_eq!(resp.json()["error"]["code"], "upstream_invalid_answer");
    }
    assert_eq!(mock.requests().len(), 2, "nothing was cached");
    // Over OpenAI's cap of 2,048 inputs: refused before anything else.
    let many: Vec<String> = (0..2049).map(|i| format!("t{i}")).collect();
    let resp = request(
        lumen.addr,
        "POST",
        "/v1/embeddings",
        &[("content-type", "application/json")],
        &serde_json::to_vec(&json!({"model": "e", "input": many})).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(resp.json()["error"]["param"], "input");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_written_on_a_reused_connection_is_never_resent_silently() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: ok, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: dropper, targets: [ {{ provider: mock, model: drop }} ], retry: {{ attempts: 1 }} }}
"#,
        mock.base_url()
    ));
    // A first request leaves a pooled connection to the provider.
    assert_eq!(lumen.post_chat(&[], &chat("ok", "hello")).await.status, 200);
    // The provider reads the next one on that connection, then closes it without answering.
    let resp = lumen.post_chat(&[], &chat("dropper", "hello")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.header("x-lumen-attempts"), Some("1"));
    let drops = mock
        .requests()
        .iter()
        .filter(|r| r.json()["model"] == "drop")
        .count();
    assert_eq!(drops, 1, "the provider received the prompt once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_request_id_cannot_share_a_fleet_wide_slot() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let lumen = Lumen::start(&format!(
        r#"redis: {{ url: "{url}", timeout: 500ms }}
keys:
  - {{ id: one, key: "sk-one", limits: {{ concurrent_requests: 1 }} }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: slow, targets: [ {{ provider: mock, model: slow-600 }} ] }}
"#,
        url = redis.url(),
        base = mock.base_url()
    ));
    let auth = bearer("sk-one");
    let addr = lumen.addr;
    let auth2 = auth.clone();
    let first = tokio::spawn(async move {
        let mut c = Client::connect(addr).await.unwrap();
        c.post_json(
            "/v1/chat/completions",
            &[("authorization", &auth2), ("x-request-id", "same-id")],
            &chat("slow", "hello"),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = lumen
        .post_chat(
            &[("authorization", &auth), ("x-request-id", "same-id")],
            &chat("slow", "hello"),
        )
        .await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert_eq!(first.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_the_answer_is_noticed_at_once() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: slow, targets: [ {{ provider: mock, model: slow-4000 }} ] }}
"#,
        mock.base_url()
    ));
    let body = serde_json::to_vec(&chat("slow", "hello")).unwrap();
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    c.send_raw(head.as_bytes()).await.unwrap();
    c.send_raw(&body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    // The request ends (and is logged) long before the provider would have answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let log = lumen.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("\"route\":\"slow\"") && l.contains("\"kind\":\"access\""))
        {
            assert!(line.contains("client disconnected"), "{line}");
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["duration_us"].as_u64().unwrap() < 2_000_000, "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not noticed within 2 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peak resident memory of a process so far (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn keying_a_large_cacheable_body_costs_a_few_times_its_size_not_a_hundred() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
limits: {{ max_body_bytes: 16777216 }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m, when: always }} }}
"#,
        mock.base_url()
    ));
    // Warm up (pools, allocator) with a small request first.
    assert_eq!(lumen.post_chat(&[], &chat("m", "hello")).await.status, 200);
    // About 8 MiB of small JSON objects: the shape that costs most as a parsed tree.
    let messages: Vec<serde_json::Value> = (0..260_000)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    let body = json!({"model": "m", "messages": messages});
    let bytes = serde_json::to_vec(&body).unwrap();
    assert!(bytes.len() > 8_000_000, "{}", bytes.len());
    let before = peak_rss(lumen.pid());
    let resp = request(
        lumen.addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        &bytes,
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-lumen-cache"), Some("miss"));
    let grown = peak_rss(lumen.pid()).saturating_sub(before);
    assert!(
        grown < 6 * bytes.len() as u64,
        "peak RSS grew {} MiB for a {} MiB body",
        grown >> 20,
        bytes.len() >> 20
    );
}
