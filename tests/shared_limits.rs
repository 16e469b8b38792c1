//! Limits shared by a fleet: two real `lumen` processes on one real `redis-server` admit
//! exactly the configured number out of a concurrent burst; Redis dying does not take the edge
//! down (fail-open) or stops traffic (fail-closed); sharing resumes when it returns.

use std::time::Duration;

use lumen_test_support::client::Client;
use lumen_test_support::harness::RedisServer;
use lumen_test_support::keyed::{chat_burst, count};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

fn node(mock: &MockUpstream, redis: &RedisServer, on_error: &str) -> Lumen {
    node_on(mock, redis, on_error, "work_stealing")
}

fn node_on(mock: &MockUpstream, redis: &RedisServer, on_error: &str, runtime: &str) -> Lumen {
    Lumen::start(&format!(
        r#"
server: {{ threads: 2, runtime: {runtime} }}
redis: {{ url: "{url}", timeout: 200ms, on_redis_error: {on_error} }}
keys:
  - {{ id: fleet, key: "sk-fleet", limits: {{ requests_per_minute: 10, burst: 10 }} }}
  - {{ id: budget, key: "sk-budget", limits: {{ tokens_per_minute: 300 }} }}
  - {{ id: narrow, key: "sk-narrow", limits: {{ concurrent_requests: 2 }} }}
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        url = redis.url(),
        base = mock.base_url()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_one_budget_and_survive_redis_failing_open() {
    share_one_budget_across_a_redis_restart("work_stealing").await;
}

/// One single-threaded runtime per thread, each with its own Redis connection: every one of
/// them must find Redis again after the restart, not fail open on its first call.
#[tokio::test(flavor = "multi_thread")]
async fn per_core_nodes_share_one_budget_across_a_redis_restart() {
    share_one_budget_across_a_redis_restart("per_core").await;
}

async fn share_one_budget_across_a_redis_restart(runtime: &str) {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let (a, b) = (
        node_on(&mock, &redis, "fail_open", runtime),
        node_on(&mock, &redis, "fail_open", runtime),
    );
    let statuses = chat_burst(&[a.addr, b.addr], "sk-fleet", 30).await;
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 20, "{statuses:?}");
    assert_eq!(mock.requests().len(), 10);

    // Redis dies: each node falls back to its own bucket and keeps serving.
    redis.kill();
    let statuses = chat_burst(&[a.addr, b.addr], "sk-fleet", 6).await;
    assert_eq!(
        count(&statuses, 200),
        6,
        "fail-open keeps traffic flowing: {statuses:?}"
    );
    lumen_test_support::harness::scrape_until(
        a.admin,
        "lumen_redis_errors_total{op=\"rate_limit\"}",
    )
    .await;

    // Redis returns (empty): the nodes share one budget again.
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let statuses = chat_burst(&[a.addr, b.addr], "sk-fleet", 30).await;
    assert_eq!(count(&statuses, 200), 10, "sharing resumes: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_closed_refuses_while_redis_is_down() {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let a = node(&mock, &redis, "fail_closed");
    assert_eq!(chat_burst(&[a.addr], "sk-fleet", 2).await, [200, 200]);
    redis.kill();
    let statuses = chat_burst(&[a.addr], "sk-fleet", 3).await;
    assert_eq!(statuses, [429, 429, 429]);
    redis.restart();
    // The connection is re-made within about a second of Redis coming back; allow for a
    // loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if count(&chat_burst(&[a.addr], "sk-fleet", 1).await, 200) == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic never resumed after Redis came back"
        );
    }
}

async fn with_budget(node: &Lumen, max_tokens: u64) -> lumen_test_support::Response {
    let mut c = Client::connect(node.addr).await.unwrap();
    let body = json!({"model": "fast", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]});
    c.post_json(
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-budget")],
        &body,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_budgets_are_shared_and_settled_across_nodes() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let (a, b) = (
        node(&mock, &redis, "fail_open"),
        node(&mock, &redis, "fail_open"),
    );
    lumen_test_support::harness::away_from_minute_boundary().await;
    // Node A reserves ~230 of 300, then settles at the 11 the mock reports.
    let first = with_budget(&a, 200).await;
    assert_eq!(first.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Node B sees A's settled usage: another 200 fits (it would not without the refund)...
    let second = with_budget(&b, 200).await;
    assert_eq!(second.status, 200, "{}", second.text());
    // ...and while B's reservation is still unsettled elsewhere, node A's budget is B's too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let too_big = with_budget(&a, 290).await;
    assert_eq!(too_big.status, 429, "{}", too_big.text());
    assert_eq!(too_big.header("x-ratelimit-limit-tokens"), Some("300"));
    let remaining: u64 = too_big
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        remaining,
        300 - 22,
        "both nodes' settled usage, counted once each"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_caps_hold_across_nodes() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let (a, b) = (
        node(&mock, &redis, "fail_open"),
        node(&mock, &redis, "fail_open"),
    );
    let slow = json!({"model": "fast", "stream": true, "messages": [], "mock_chunks": 4, "mock_delay_ms": 300});
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (addr, body) = (a.addr, slow.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                c.post_json(
                    "/v1/chat/completions",
                    &[("authorization", "Bearer sk-narrow")],
                    &body,
                )
                .await
                .unwrap()
                .status
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = Client::connect(b.addr).await.unwrap();
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let on_b = c
        .post_json(
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-narrow")],
            &body,
        )
        .await
        .unwrap();
    assert_eq!(
        on_b.status, 429,
        "node A's two streams hold the fleet's two slots"
    );
    for s in streams {
        assert_eq!(s.await.unwrap(), 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = c
        .post_json(
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-narrow")],
            &body,
        )
        .await
        .unwrap();
    assert_eq!(again.status, 200, "slots were given back in Redis");
}

/// A provider quota is the account's, so the fleet shares it: across two nodes, the primary
/// takes exactly its quota and the rest falls back.
#[tokio::test(flavor = "multi_thread")]
async fn provider_quotas_are_shared_by_the_fleet() {
    let (primary, backup) = (MockUpstream::start(), MockUpstream::start());
    let redis = RedisServer::start();
    let yaml = format!(
        r#"
auth: off
redis: {{ url: "{url}", timeout: 200ms }}
providers:
  primary: {{ base_url: "{p}", quota: {{ requests_per_minute: 5 }}, health: {{ enabled: false }} }}
  backup: {{ base_url: "{b}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: primary, model: m }}, {{ provider: backup, model: m }} ]
"#,
        url = redis.url(),
        p = primary.base_url(),
        b = backup.base_url()
    );
    let (one, two) = (Lumen::start(&yaml), Lumen::start(&yaml));
    lumen_test_support::harness::away_from_minute_boundary().await;
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let mut by_provider = std::collections::HashMap::<String, usize>::new();
    for i in 0..12 {
        let node = if i % 2 == 0 { &one } else { &two };
        let mut c = Client::connect(node.addr).await.unwrap();
        let resp = c
            .post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        *by_provider
            .entry(resp.header("x-lumen-provider").unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(primary.requests().len(), 5, "{by_provider:?}");
    assert_eq!(by_provider.get("backup"), Some(&7), "{by_provider:?}");
}

/// The fleet's token windows themselves, on a real Redis: a settle sent twice (a resend after a
/// lost reply) counts once; a reservation whose reply never came (Redis down) is settled, once
/// Redis is back, with what the request used, in the current window; so the windows add up to
/// what was used however often Redis failed on the way.
#[tokio::test(flavor = "multi_thread")]
async fn token_windows_add_up_to_what_was_used_across_lost_replies() {
    use std::sync::Arc;

    use lumen_plugins::rate_limit::shared::SharedLimiter;
    use lumen_plugins::rate_limit::TokenLimit;
    use lumen_plugins::redis_link::RedisLink;

    let mut redis = RedisServer::start();
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_millis(300)).unwrap());
    let limiter = Arc::new(SharedLimiter::new(link, "t"));
    let per_day = [TokenLimit {
        limit: 1000,
        window: Duration::from_secs(86_400),
    }];
    // What is left of the window now: a reservation of nothing, given back.
    let left = || async {
        let (r, status) = limiter
            .reserve_tokens("k", &per_day, 0)
            .await
            .unwrap()
            .unwrap();
        limiter.settle_tokens(&r, 0).await.unwrap();
        status.remaining
    };

    let (held, status) = limiter
        .reserve_tokens("k", &per_day, 400)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.remaining, 600);
    limiter.settle_tokens(&held, 100).await.unwrap();
    limiter.settle_tokens(&held, 100).await.unwrap();
    assert_eq!(left().await, 900, "settled once");

    // Redis goes away: the reservation comes back unanswered, and the request is served in
    // process; what it used is owed to the window.
    redis.kill();
    let unanswered = limiter
        .reserve_tokens("k", &per_day, 400)
        .await
        .expect_err("redis is down");
    redis.restart();
    // A restarted Redis keeps nothing (no persistence in tests): the window starts again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while limiter
        .settle_tokens(&unanswered.pending, 70)
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    limiter
        .settle_tokens(&unanswered.pending, 70)
        .await
        .unwrap();
    assert_eq!(
        left().await,
        930,
        "the owed 70 counted once in the current window"
    );

    // The same, settled off the request's path (as the gateway does): sent until Redis takes it.
    redis.kill();
    let unanswered = limiter
        .reserve_tokens("k", &per_day, 400)
        .await
        .expect_err("redis is down");
    limiter.settle_tokens_later(unanswered.pending, 30);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Ok((r, status))) = limiter.reserve_tokens("k", &per_day, 0).await {
            limiter.settle_tokens(&r, 0).await.unwrap();
            if status.remaining == 970 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the owed 30 never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
