//! Fallback and health, end to end: the real `lumen` binary in front of several mock
//! providers at once: strategies, retries and fallback before the first byte, the stream
//! commit point, circuit breaking, active probes, provider limits, deadlines.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Client, Response};
use lumen_test_support::harness::free_port;
use lumen_test_support::openai::{chat, chat_with};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

/// Providers `a`, `b`, `c` on separate mocks, probes off unless `extra_provider` says
/// otherwise, and the given routes.
fn providers(mocks: &[&MockUpstream], provider_extra: &str) -> String {
    let mut out = String::from("auth: off\nproviders:\n");
    for (name, mock) in ["a", "b", "c"].iter().zip(mocks) {
        out.push_str(&format!(
            "  {name}: {{ base_url: \"{}\", timeout: 2s, health: {{ enabled: false }}{provider_extra} }}\n",
            mock.base_url()
        ));
    }
    out
}

fn count_by_provider(responses: &[Response]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in responses {
        assert_eq!(r.status, 200, "{}", r.text());
        *counts
            .entry(r.header("x-lumen-provider").unwrap_or("").to_string())
            .or_default() += 1;
    }
    counts
}

async fn sequential(lumen: &Lumen, model: &str, n: usize) -> Vec<Response> {
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            c.post_json("/v1/chat/completions", &[], &chat(model, "hello"))
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn strategies_pick_as_specified() {
    let (ma, mb, mc) = (
        MockUpstream::start(),
        MockUpstream::start(),
        MockUpstream::start(),
    );
    let yaml = format!(
        r#"{}routes:
  - model: prio
    strategy: priority
    targets: [ {{ provider: a, model: m }}, {{ provider: b, model: m }} ]
  - model: rr
    strategy: round_robin
    targets: [ {{ provider: a, model: m }}, {{ provider: b, model: m }}, {{ provider: c, model: m }} ]
  - model: weighted
    strategy: weighted
    targets: [ {{ provider: a, model: m, weight: 3 }}, {{ provider: b, model: m, weight: 1 }} ]
  - model: latency
    strategy: lowest_latency
    targets: [ {{ provider: a, model: slow-150 }}, {{ provider: c, model: m }} ]
"#,
        providers(&[&ma, &mb, &mc], "")
    );
    let lumen = Lumen::start(&yaml);

    let prio = count_by_provider(&sequential(&lumen, "prio", 10).await);
    assert_eq!(prio.get("a"), Some(&10), "{prio:?}");

    let rr = count_by_provider(&sequential(&lumen, "rr", 30).await);
    for p in ["a", "b", "c"] {
        assert_eq!(rr.get(p), Some(&10), "round robin is exact: {rr:?}");
    }

    let weighted = count_by_provider(&sequential(&lumen, "weighted", 400).await);
    assert_eq!(weighted.get("a"), Some(&300), "{weighted:?}");
    assert_eq!(weighted.get("b"), Some(&100), "{weighted:?}");

    // Lowest latency: after each target is measured once, the fast one takes nearly all
    // requests; exploration sends a few to the slow one so it is measured again.
    let latency = count_by_provider(&sequential(&lumen, "latency", 60).await);
    let fast = latency.get("c").copied().unwrap_or(0);
    let slow = latency.get("a").copied().unwrap_or(0);
    assert!(
        slow >= 3,
        "the slow target is measured again now and then: {latency:?}"
    );
    assert!(fast >= 54, "the fast target wins: {latency:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn least_busy_and_local_first_spill_when_a_target_is_full() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"auth: off
providers:
  local: {{ base_url: "{}", max_in_flight: 1, health: {{ enabled: false }} }}
  cloud: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: local-first
    targets: [ {{ provider: local, model: m }}, {{ provider: cloud, model: m }} ]
  - model: least
    strategy: least_busy
    targets: [ {{ provider: local, model: m }}, {{ provider: cloud, model: m }} ]
"#,
        ma.base_url(),
        mb.base_url()
    );
    let lumen = Lumen::start(&yaml);
    // Idle: local first.
    let idle = count_by_provider(&sequential(&lumen, "local-first", 3).await);
    assert_eq!(idle.get("local"), Some(&3), "{idle:?}");

    // Occupy the local target's one slot with a slow stream.
    let addr = lumen.addr;
    let long = tokio::spawn(async move {
        let mut body = chat_with("local-first", "hello", json!({"stream": true}));
        body["mock_chunks"] = json!(6);
        body["mock_delay_ms"] = json!(150);
        let mut c = Client::connect(addr).await.unwrap();
        c.post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spill = count_by_provider(&sequential(&lumen, "local-first", 3).await);
    assert_eq!(spill.get("cloud"), Some(&3), "full local spills: {spill:?}");
    // Least busy: the busy target is avoided too.
    let least = count_by_provider(&sequential(&lumen, "least", 4).await);
    assert_eq!(least.get("cloud"), Some(&4), "{least:?}");
    let long = long.await.unwrap();
    assert_eq!(long.status, 200);
    assert_eq!(long.header("x-lumen-provider"), Some("local"));
    // Free again: back to local, and least-busy shares idle targets evenly.
    let back = count_by_provider(&sequential(&lumen, "local-first", 2).await);
    assert_eq!(back.get("local"), Some(&2), "{back:?}");
    let even = count_by_provider(&sequential(&lumen, "least", 10).await);
    assert_eq!(even.get("local"), Some(&5), "{even:?}");
}

/// A primary that fails in `model`'s way, then a good secondary: the client gets the
/// secondary's answer, stream and non-stream, with the whole body re-sent and the model
/// rewritten for the secondary.
async fn falls_back_from(failing_model: &str) {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"auth: off
limits: {{ max_body_bytes: 4MiB }}
providers:
  a: {{ base_url: "{}", timeout: 500ms, health: {{ enabled: false }} }}
  b: {{ base_url: "{}", health: {{ enabled: false }} }}
  nowhere: {{ base_url: "http://127.0.0.1:{}/v1", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: {}, model: {failing_model} }}, {{ provider: b, model: good-model }} ]
"#,
        ma.base_url(),
        mb.base_url(),
        free_port(),
        if failing_model == "refused" {
            "nowhere"
        } else {
            "a"
        },
    );
    let lumen = Lumen::start(&yaml);
    // About 1 MiB of prompt: more than Pingora's 64 KiB retry buffer.
    let big = "x".repeat(1 << 20);
    for stream in [false, true] {
        mb.clear();
        let mut body = json!({"model": "fast", "messages": [{"role": "user", "content": big}]});
        if stream {
            body["stream"] = json!(true);
        }
        let started = Instant::now();
        let resp = lumen.post_chat(&[], &body).await;
        assert_eq!(
            resp.status,
            200,
            "{failing_model} stream={stream}: {}",
            resp.text()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(resp.header("x-lumen-provider"), Some("b"));
        // After a 429 with Retry-After the primary is skipped, not tried again.
        let attempts = if failing_model == "status-429" && stream {
            "1"
        } else {
            "2"
        };
        assert_eq!(resp.header("x-lumen-attempts"), Some(attempts));
        if stream {
            assert_eq!(resp.chat_stream_text(), "tok0 tok1 tok2 ");
            assert_eq!(resp.sse_data().last().map(String::as_str), Some("[DONE]"));
        } else {
            assert_eq!(
                resp.json()["choices"][0]["message"]["content"],
                "mock reply from good-model"
            );
        }
        let seen = mb.requests();
        assert_eq!(seen.len(), 1);
        let sent = seen[0].json();
        assert_eq!(sent["model"], "good-model");
        assert_eq!(
            sent["messages"][0]["content"].as_str().map(str::len),
            Some(1 << 20)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_on_503() {
    falls_back_from("status-503").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_on_429() {
    falls_back_from("status-429").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_on_refused_connection() {
    falls_back_from("refused").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_when_the_primary_hangs_past_its_timeout() {
    falls_back_from("hang").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_when_the_primary_drops_before_the_first_byte() {
    falls_back_from("drop").await;
    falls_back_from("drop-after-head").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn falls_back_when_the_first_chunk_never_comes() {
    falls_back_from("hang-after-head").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_success_or_a_stream_of_comments_only_is_no_answer() {
    falls_back_from("empty").await;
    falls_back_from("comment-then-drop").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_first_byte_a_failure_ends_the_stream_with_an_error_event() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"{}routes:
  - model: fast
    targets: [ {{ provider: a, model: drop-mid-stream }}, {{ provider: b, model: good }} ]
"#,
        providers(&[&ma, &mb], "")
    );
    let lumen = Lumen::start(&yaml);
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        lumen.post_chat(&[], &chat_with("fast", "hello", json!({"stream": true}))),
    )
    .await
    .expect("no hang");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-lumen-provider"), Some("a"));
    let data = resp.sse_data();
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_unavailable", "{data:?}");
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "never looks like success"
    );
    assert!(
        mb.requests().is_empty(),
        "no fallback after the commit point"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_skips_the_provider_instead_of_sleeping() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"{}routes:
  - model: fast
    targets: [ {{ provider: a, model: status-429 }}, {{ provider: b, model: good }} ]
"#,
        providers(&[&ma, &mb], "")
    );
    let lumen = Lumen::start(&yaml);
    let mut body = chat("fast", "hello");
    body["mock_retry_after"] = json!(30);
    for i in 0..5 {
        let started = Instant::now();
        let resp = lumen.post_chat(&[], &body).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-lumen-provider"), Some("b"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "never slept on Retry-After"
        );
        let expected_attempts = if i == 0 { "2" } else { "1" };
        assert_eq!(resp.header("x-lumen-attempts"), Some(expected_attempts));
    }
    assert_eq!(ma.requests().len(), 1, "skipped after its Retry-After");
    let admin = request(lumen.admin, "GET", "/admin/providers", &[], b"")
        .await
        .unwrap()
        .json();
    let a = &admin["providers"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["models"][0]["model"], "status-429");
    assert_eq!(a["models"][0]["available"], "rate_limited");
    assert!(a["models"][0]["rate_limited_for_ms"].as_u64().unwrap() > 25_000);
    assert!(a["last_error"]["message"].as_str().unwrap().contains("429"));
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_rate_limit_headers_skip_it_until_reset() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"{}routes:
  - model: fast
    targets: [ {{ provider: a, model: m }}, {{ provider: b, model: m }} ]
"#,
        providers(&[&ma, &mb], "")
    );
    let lumen = Lumen::start(&yaml);
    let mut body = chat("fast", "hello");
    body["mock_headers"] =
        json!({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"});
    assert_eq!(
        lumen.post_chat(&[], &body).await.header("x-lumen-provider"),
        Some("a")
    );
    // a said it has no requests left for 1 s.
    assert_eq!(
        lumen
            .post_chat(&[], &chat("fast", "hello"))
            .await
            .header("x-lumen-provider"),
        Some("b")
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        lumen
            .post_chat(&[], &chat("fast", "hello"))
            .await
            .header("x-lumen-provider"),
        Some("a")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_quota_exhaustion_skips_the_provider() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"auth: off
providers:
  a: {{ base_url: "{}", quota: {{ requests_per_minute: 2 }}, health: {{ enabled: false }} }}
  b: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: a, model: m }}, {{ provider: b, model: m }} ]
  - model: only-a
    targets: [ {{ provider: a, model: m }} ]
"#,
        ma.base_url(),
        mb.base_url()
    );
    let lumen = Lumen::start(&yaml);
    let got = count_by_provider(&sequential(&lumen, "fast", 5).await);
    assert_eq!(got.get("a"), Some(&2), "{got:?}");
    assert_eq!(got.get("b"), Some(&3), "{got:?}");
    assert_eq!(ma.requests().len(), 2);
    // A route with nothing else to use says so: 503 with Retry-After up to the window's end.
    let resp = lumen.post_chat(&[], &chat("only-a", "hello")).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "no_available_provider");
    assert!(resp.text().contains("quota_exhausted"), "{}", resp.text());
    let wait: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
}

#[tokio::test(flavor = "multi_thread")]
async fn circuit_opens_after_failures_and_recovers_after_cooldown() {
    let port = free_port();
    let mb = MockUpstream::start();
    let yaml = format!(
        r#"auth: off
providers:
  a: {{ base_url: "http://127.0.0.1:{port}/v1", health: {{ enabled: false }},
       circuit: {{ failures: 2, cooldown: 700ms }} }}
  b: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: a, model: m }}, {{ provider: b, model: m }} ]
"#,
        mb.base_url()
    );
    let lumen = Lumen::start(&yaml);
    // a refuses connections: two failures open its circuit.
    for _ in 0..2 {
        let r = lumen.post_chat(&[], &chat("fast", "hello")).await;
        assert_eq!(r.header("x-lumen-attempts"), Some("2"));
    }
    let r = lumen.post_chat(&[], &chat("fast", "hello")).await;
    assert_eq!(r.header("x-lumen-provider"), Some("b"));
    assert_eq!(
        r.header("x-lumen-attempts"),
        Some("1"),
        "open circuit: a not tried"
    );
    let admin = request(lumen.admin, "GET", "/admin/providers", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(
        admin["providers"][0]["models"][0]["circuit"]["state"],
        "open"
    );
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_circuit_state{model=\"m\",provider=\"a\"} 2",
    )
    .await;

    // a comes back; after the cooldown one trial request goes to it and closes the circuit.
    let ma = MockUpstream::start_on(port, true, 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = lumen.post_chat(&[], &chat("fast", "hello")).await;
    assert_eq!(r.header("x-lumen-provider"), Some("a"), "half-open trial");
    let r = lumen.post_chat(&[], &chat("fast", "hello")).await;
    assert_eq!(r.header("x-lumen-provider"), Some("a"), "closed again");
    assert_eq!(ma.requests().len(), 2);
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_circuit_state{model=\"m\",provider=\"a\"} 0",
    )
    .await;
}

async fn wait_for_status(lumen: &Lumen, path: &str, want: u16, limit: Duration) -> Duration {
    lumen_test_support::harness::wait_for_status(lumen.addr, path, want, limit).await
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_mark_a_dead_target_unhealthy_and_readyz_follows() {
    let port = free_port();
    let ma = MockUpstream::start_on(port, true, 1);
    let yaml = format!(
        r#"auth: off
providers:
  a:
    base_url: "http://127.0.0.1:{port}/v1"
    health: {{ interval: 100ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }}
routes:
  - model: fast
    targets: [ {{ provider: a, model: m }} ]
"#
    );
    let lumen = Lumen::start(&yaml);
    wait_for_status(&lumen, "/readyz", 200, Duration::from_secs(3)).await;
    assert!(ma.probes() >= 1);
    assert!(
        ma.requests().is_empty(),
        "probes never bill: no completion was requested"
    );
    let health = request(lumen.addr, "GET", "/health", &[], b"")
        .await
        .unwrap();
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["providers"]["a"]["probe"], "healthy");
    assert!(h["version"].is_string());
    assert_eq!(h["redis"]["configured"], false);

    drop(ma);
    // interval × threshold, plus a probe timeout and scheduling slack.
    let took = wait_for_status(&lumen, "/readyz", 503, Duration::from_secs(2)).await;
    assert!(took <= Duration::from_millis(900), "{took:?}");
    let resp = lumen.post_chat(&[], &chat("fast", "hello")).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains("a: unhealthy"), "{}", resp.text());
    let health = request(lumen.addr, "GET", "/health", &[], b"")
        .await
        .unwrap();
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["providers"]["a"]["probe"], "unhealthy");
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_provider_healthy{provider=\"a\"} 0",
    )
    .await;

    let _ma = MockUpstream::start_on(port, true, 1);
    wait_for_status(&lumen, "/readyz", 200, Duration::from_secs(2)).await;
    assert_eq!(
        lumen.post_chat(&[], &chat("fast", "hello")).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_can_require_any_route_instead_of_all() {
    let mb = MockUpstream::start();
    let dead = free_port();
    let route_yaml = |readiness: &str| {
        format!(
            r#"auth: off
readiness: {readiness}
providers:
  dead: {{ base_url: "http://127.0.0.1:{dead}/v1", health: {{ interval: 100ms }} }}
  b: {{ base_url: "{}", health: {{ interval: 100ms }} }}
routes:
  - model: one
    targets: [ {{ provider: dead, model: m }} ]
  - model: two
    targets: [ {{ provider: b, model: m }} ]
"#,
            mb.base_url()
        )
    };
    let all = Lumen::start(&route_yaml("all_routes"));
    let any = Lumen::start(&route_yaml("any_route"));
    wait_for_status(&any, "/readyz", 200, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = request(all.addr, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(resp.status, 503);
    assert_eq!(resp.json()["routes_not_ready"], json!(["one"]));
    let health = request(all.addr, "GET", "/health", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(health["status"], "degraded");
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_exceeded_returns_the_last_error() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"auth: off
providers:
  a: {{ base_url: "{}", timeout: 30s, health: {{ enabled: false }} }}
  b: {{ base_url: "{}", timeout: 30s, health: {{ enabled: false }} }}
routes:
  - model: hangs
    retry: {{ deadline: 400ms }}
    targets: [ {{ provider: a, model: status-503 }}, {{ provider: b, model: hang }} ]
  - model: keeps-failing
    retry: {{ attempts: 10, deadline: 500ms, backoff: {{ base: 200ms, max: 1s }} }}
    targets: [ {{ provider: a, model: status-502 }} ]
"#,
        ma.base_url(),
        mb.base_url()
    );
    let lumen = Lumen::start(&yaml);
    let started = Instant::now();
    let resp = lumen.post_chat(&[], &chat("hangs", "hello")).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "upstream_timeout");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(resp.header("x-lumen-attempts"), Some("2"));

    // Retries of one target stop at the deadline; the provider's own last answer is passed on.
    let started = Instant::now();
    let resp = lumen.post_chat(&[], &chat("keeps-failing", "hello")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "mock_502");
    assert!(started.elapsed() < Duration::from_secs(2));
    let attempts: u32 = resp.header("x-lumen-attempts").unwrap().parse().unwrap();
    assert!((2..10).contains(&attempts), "{attempts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn statuses_not_retried_pass_through_at_once() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"{}routes:
  - model: fast
    retry: {{ on: [connect, "429"] }}
    targets: [ {{ provider: a, model: status-500 }}, {{ provider: b, model: m }} ]
  - model: bad
    targets: [ {{ provider: a, model: status-400 }}, {{ provider: b, model: m }} ]
"#,
        providers(&[&ma, &mb], "")
    );
    let lumen = Lumen::start(&yaml);
    let resp = lumen.post_chat(&[], &chat("fast", "hello")).await;
    assert_eq!(resp.status, 500);
    assert_eq!(resp.header("x-lumen-provider"), Some("a"));
    let resp = lumen.post_chat(&[], &chat("bad", "hello")).await;
    assert_eq!(resp.status, 400, "a client error is not retried");
    assert!(mb.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_of_three_targets_failing_at_random_every_request_succeeds() {
    let (ma, mb, mc) = (
        MockUpstream::start_on(0, false, 2),
        MockUpstream::start_on(0, false, 2),
        MockUpstream::start_on(0, false, 2),
    );
    let yaml = format!(
        r#"{}routes:
  - model: fast
    strategy: round_robin
    retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 5ms }} }}
    targets: [ {{ provider: a, model: flaky-50 }}, {{ provider: b, model: flaky-50 }}, {{ provider: c, model: good }} ]
"#,
        providers(&[&ma, &mb, &mc], "")
    );
    let lumen = Lumen::start(&yaml);
    let addr = lumen.addr;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                let mut failures = Vec::new();
                for i in 0..125 {
                    let body = if i % 2 == 0 {
                        chat("fast", "hello")
                    } else {
                        chat_with("fast", "hello", json!({"stream": true}))
                    };
                    let resp = match c.post_json("/v1/chat/completions", &[], &body).await {
                        Ok(r) => r,
                        Err(_) => {
                            c = Client::connect(addr).await.unwrap();
                            c.post_json("/v1/chat/completions", &[], &body)
                                .await
                                .unwrap()
                        }
                    };
                    let ok = resp.status == 200
                        && if i % 2 == 0 {
                            resp.json()["choices"][0]["message"]["content"]
                                .as_str()
                                .is_some_and(|t| t.starts_with("mock reply"))
                        } else {
                            resp.sse_data().last().map(String::as_str) == Some("[DONE]")
                        };
                    if !ok {
                        failures.push(format!("{} {}", resp.status, resp.text()));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let metrics =
        lumen_test_support::harness::scrape_until(lumen.admin, "lumen_fallbacks_total").await;
    assert!(metrics.contains("lumen_retries_total{reason="), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_probe_counts_any_answer_below_500_as_reachable() {
    // Many providers answer `GET /models` with 401 or 404 (no key, or no public list): the host
    // is up, so routing may use it. A 5xx there is a provider in trouble.
    let mock = MockUpstream::start();
    let yaml = format!(
        r#"auth: off
providers:
  locked: {{ base_url: "{base}/models-401/v1", health: {{ interval: 100ms, healthy_threshold: 1, unhealthy_threshold: 1 }} }}
  sick: {{ base_url: "{base}/models-503/v1", health: {{ interval: 100ms, healthy_threshold: 1, unhealthy_threshold: 1 }} }}
routes:
  - {{ model: a, targets: [ {{ provider: locked, model: m }} ] }}
  - {{ model: b, targets: [ {{ provider: sick, model: m }} ] }}
readiness: any_route
"#,
        base = mock.base_url().trim_end_matches("/v1")
    );
    let lumen = Lumen::start(&yaml);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let h = request(lumen.addr, "GET", "/health", &[], b"")
            .await
            .unwrap()
            .json();
        if h["providers"]["locked"]["probe"] == "healthy"
            && h["providers"]["sick"]["probe"] == "unhealthy"
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mock.probes() >= 2);
}

/// A target is free again as soon as its answer has arrived, before the client is sent the
/// end: a client that asks again at once gets the preferred target, even while the first
/// request is still winding down (held here by a test pause after its answer went out).
#[tokio::test(flavor = "multi_thread")]
async fn a_target_is_free_once_its_answer_arrived() {
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"auth: off
providers:
  local: {{ base_url: "{}", max_in_flight: 1, health: {{ enabled: false }} }}
  cloud: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: local-first
    targets: [ {{ provider: local, model: m }}, {{ provider: cloud, model: m }} ]
"#,
        ma.base_url(),
        mb.base_url()
    );
    let lumen = Lumen::start_with_env(&yaml, &[("LUMEN_TEST_FAULTS", "1")]);
    for stream in [false, true] {
        let body = chat_with("local-first", "hello", json!({"stream": stream}));
        let first = lumen
            .post_chat(&[("x-lumen-test-pause", "answer-sent")], &body)
            .await;
        assert_eq!(first.header("x-lumen-provider"), Some("local"));
        // The first request is still paused (500 ms) after its answer went out.
        let again = lumen.post_chat(&[], &body).await;
        assert_eq!(
            again.header("x-lumen-provider"),
            Some("local"),
            "stream {stream}: the local target was free again"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_affinity_remembers_the_target_that_answered_not_the_one_that_failed() {
    // `a` always fails (503, retried on `b`). The conversation's first turn is answered by
    // `b`, so its next turn must go straight to `b`: had `a` been remembered as holding it
    // (it was first in line), every turn would pay a failed attempt on `a` first.
    let (ma, mb) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"{}routes:
  - model: chat
    prefix_affinity: true
    targets: [ {{ provider: a, model: status-503 }}, {{ provider: b, model: up }} ]
"#,
        providers(&[&ma, &mb], "")
    );
    let lumen = Lumen::start(&yaml);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let mut messages = vec![
        json!({"role": "system", "content": "You answer questions about the sea."}),
        json!({"role": "user", "content": "Why is it salty?"}),
    ];
    for turn in 0..4 {
        let r = c
            .post_json(
                "/v1/chat/completions",
                &[],
                &json!({"model": "chat", "messages": messages}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-lumen-provider"), Some("b"));
        // Only the first turn tried `a` (first in line, holding nothing yet).
        assert_eq!(ma.requests().len(), 1, "turn {turn}");
        messages.push(r.json()["choices"][0]["message"].clone());
        messages.push(json!({"role": "user", "content": format!("And then? {turn}")}));
    }
}
