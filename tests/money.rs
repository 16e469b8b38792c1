//! Money through the real gateway: every answer's cost at the configured prices (header,
//! access log, usage ledger, metrics), cache hits free; dollar budgets per key, per tenant and
//! per JWT claim, refused before a provider is called; a fallback charged at the dearer price;
//! a stream cut by its client charged what it generated; a reload repricing the next request
//! only; and across a fleet, two real nodes on one real Redis keeping 1,000 concurrent requests
//! within one budget to the micro-dollar, and `on_redis_error` deciding when Redis dies.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::RedisServer;
use lumen_test_support::keyed::{admin, budget, micros};
use lumen_test_support::openai::chat_with;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

const SECRET: &str = "money-test-secret-0123456789abcdef";

/// Prices: `up` $1 in, $2 out, $0.50 cached per million tokens (so a token is 1 µ$ in, 2 out);
/// `dear` ten times that; the failing `status-*` targets next to nothing.
fn config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
server: {{ watch_config: false }}
keys:
  - {{ id: free, key: "sk-free" }}
  - {{ id: payer, key: "sk-payer", budget: {{ usd_per_day: 0.01, alert_at: 0.5 }} }}
  - {{ id: rich, key: "sk-rich", budget: {{ usd_per_day: 1, usd_per_month: 10 }} }}
  - {{ id: a, key: "sk-a", tenant: acme }}
  - {{ id: b, key: "sk-b", tenant: acme }}
tenants:
  acme: {{ budget: {{ usd_per_day: 0.005 }} }}
jwt:
  - {{ issuer: "https://idp.test", algorithms: [HS256], secret: "{SECRET}" }}
prices:
  - {{ provider: mock, model: up, input: 1.0, output: 2.0, cached_input: 0.5 }}
  - {{ provider: mock, model: "slow-*", input: 1.0, output: 2.0 }}
  - {{ provider: mock, model: dear, input: 10.0, output: 20.0 }}
  - {{ provider: mock, model: "status-*", input: 0.1, output: 0.1 }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: cached, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 60s }} }}
  - {{ model: fallback, targets: [ {{ provider: mock, model: status-503 }}, {{ provider: mock, model: dear }} ] }}
  - {{ model: slow, targets: [ {{ provider: mock, model: slow-600 }} ] }}
  - {{ model: unpriced, targets: [ {{ provider: mock, model: up }}, {{ provider: mock, model: nameless }} ] }}
{extra}"#,
        base = mock.base_url()
    )
}

/// The `usage` the mock reports.
fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A chat request for `model` that the mock answers with `usage`.
fn priced(model: &str, usage: Value, extra: Value) -> Value {
    let mut body = chat_with(model, "hi", extra);
    body["mock_usage"] = usage;
    body
}

fn header_micros(r: &lumen_test_support::client::Response, name: &str) -> i64 {
    micros(&Value::String(
        r.header(name)
            .unwrap_or_else(|| panic!("no {name}: {}", r.text()))
            .to_string(),
    ))
}

fn token(claims: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims = claims;
    claims["iss"] = json!("https://idp.test");
    claims["exp"] = json!(exp);
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_has_its_cost_and_cache_hits_cost_nothing() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    // 800 fresh prompt tokens at 1 µ$, 200 cached at 0.5, 500 completion at 2: 1,900 µ$.
    let mut u = usage(1000, 500);
    u["prompt_tokens_details"] = json!({"cached_tokens": 200});
    let whole = lumen
        .post_chat_as("sk-free", &priced("fast", u, json!({})))
        .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.header("x-lumen-cost-usd"), Some("0.001900"));
    // A stream's cost is known only at its end: recorded, not in its head.
    let stream = lumen
        .post_chat_as(
            "sk-free",
            &priced("fast", usage(100, 50), json!({"stream": true})),
        )
        .await;
    assert_eq!(stream.status, 200);
    assert!(stream.text().contains("[DONE]"));
    assert_eq!(stream.header("x-lumen-cost-usd"), None);
    // The same deterministic request twice: the second is a hit, and free.
    let body = priced("cached", usage(1000, 500), json!({"temperature": 0}));
    let miss = lumen.post_chat_as("sk-free", &body).await;
    assert_eq!(miss.header("x-lumen-cost-usd"), Some("0.002000"));
    let hit = lumen.post_chat_as("sk-free", &body).await;
    assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    assert_eq!(hit.header("x-lumen-cost-usd"), Some("0.000000"));
    // A budgeted caller's hit (answers are cached per key) is free too, and still says what
    // is left of its budget: $1 a day less the miss's 2,000 µ$.
    let miss = lumen.post_chat_as("sk-rich", &body).await;
    assert_eq!(miss.header("x-lumen-cost-usd"), Some("0.002000"));
    let hit = lumen.post_chat_as("sk-rich", &body).await;
    assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    assert_eq!(hit.header("x-lumen-cost-usd"), Some("0.000000"));
    assert_eq!(hit.header("x-lumen-budget-remaining-usd"), Some("0.998000"));

    // The ledger: dollars next to tokens (1,900 + 200 + 2,000 µ$), read before any flush.
    let report = admin(&lumen, "/admin/usage?key=free").await;
    assert_eq!(micros(&report["total"]["cost_usd"]), 4_100, "{report}");
    assert_eq!(report["total"]["cost_micros"], 4_100);
    // The access log: each line says what its request cost.
    // (Each line is written as its request ends, after the client has its answer: a line
    // may follow the next request's.)
    let deadline = Instant::now() + Duration::from_secs(5);
    for cost in ["0.000200", "0.001900", "0.000000"] {
        let needle = format!("\"cost_usd\":{cost}");
        while !lumen.log().contains(&needle) {
            assert!(Instant::now() < deadline, "{needle}: {}", lumen.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The metric, per key, provider and route.
    let metrics = request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("lumen_cost_usd_total{")
                && l.contains("key=\"free\"")
                && l.contains("route=\"fast\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let usd: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((usd - 0.0021).abs() < 1e-9, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_budget_refuses_before_the_provider_until_its_window_resets() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    // Each answer costs 2,000 µ$ (1,000 in, 500 out); the budget is 10,000 µ$ a day.
    let body = priced("fast", usage(1000, 500), json!({"max_tokens": 500}));
    for i in 0..5 {
        let ok = lumen.post_chat_as("sk-payer", &body).await;
        assert_eq!(ok.status, 200, "request {i}: {}", ok.text());
        assert_eq!(ok.header("x-lumen-cost-usd"), Some("0.002000"));
        // What is left after this request's reservation (its worst case, 500 completion
        // tokens at 2 µ$ and its prompt's estimate at 1 µ$).
        let left = header_micros(&ok, "x-lumen-budget-remaining-usd");
        assert!(left <= 10_000 - 2_000 * i - 1_000, "request {i}: {left}");
    }
    let sent = mock.requests().len();
    let refused = lumen.post_chat_as("sk-payer", &body).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "budget_exceeded");
    assert_eq!(error["code"], "key_budget_exceeded");
    assert!(
        error["message"].as_str().unwrap().contains("day"),
        "{error}"
    );
    assert_eq!(
        refused.header("x-lumen-budget-remaining-usd"),
        Some("0.000000")
    );
    // Until the UTC day ends.
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&wait), "{wait}");
    assert_eq!(
        mock.requests().len(),
        sent,
        "refused before any provider call"
    );
    // Another key is not affected.
    assert_eq!(lumen.post_chat_as("sk-free", &body).await.status, 200);

    let b = budget(&lumen, "key", "payer").await;
    let day = &b["windows"][0];
    assert_eq!(day["period"], "day");
    assert_eq!(micros(&day["limit_usd"]), 10_000);
    assert_eq!(micros(&day["used_usd"]), 10_000);
    assert_eq!(micros(&day["reserved_usd"]), 0, "settled: nothing held");
    assert_eq!(micros(&day["remaining_usd"]), 0);
    assert_eq!(b["alert_at"], 0.5);
    let metrics = request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("lumen_budget_used_ratio{name=\"payer\",scope=\"key\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("lumen_budget_alert_ratio{name=\"payer\",scope=\"key\"} 0.5"));
    assert!(metrics.contains("lumen_rate_limited_total{key=\"payer\",reason=\"budget\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_counts_every_choice_and_refuses_what_it_cannot_price() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    // `n: 8` of up to 1,000 tokens each at 2 µ$: a worst case of 16,000 µ$, more than the
    // whole budget of 10,000, though one choice alone would fit.
    let many = priced("fast", usage(10, 10), json!({"max_tokens": 1000, "n": 8}));
    let refused = lumen.post_chat_as("sk-payer", &many).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    let one = priced("fast", usage(10, 10), json!({"max_tokens": 1000}));
    assert_eq!(lumen.post_chat_as("sk-payer", &one).await.status, 200);
    // A route with a target that has no price: a budgeted key is not sent there (its cost
    // could not be counted); a key without a budget is, and its answer says no cost.
    let unpriced = priced("unpriced", usage(10, 10), json!({}));
    let r = lumen.post_chat_as("sk-payer", &unpriced).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["code"], "model_not_priced");
    assert!(
        error["message"].as_str().unwrap().contains("`mock`"),
        "{error}"
    );
    let free = lumen.post_chat_as("sk-free", &unpriced).await;
    assert_eq!(free.status, 200);
    assert_eq!(
        free.header("x-lumen-cost-usd"),
        Some("0.000030"),
        "the first target is priced"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_reserves_and_charges_the_dearer_target() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let body = priced("fallback", usage(1000, 500), json!({"max_tokens": 100}));
    let r = lumen.post_chat_as("sk-rich", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-lumen-attempts"),
        Some("2"),
        "the cheap target failed"
    );
    // 1,000 × 10 + 500 × 20 µ$ at `dear`'s price.
    assert_eq!(r.header("x-lumen-cost-usd"), Some("0.020000"));
    // The reservation was the worst case at `dear`: 100 completion tokens at 20 µ$ at least
    // (at the cheap price it would have been 10 µ$).
    let left = header_micros(&r, "x-lumen-budget-remaining-usd");
    assert!(left <= 1_000_000 - 2_000, "{left}");
    let day = &budget(&lumen, "key", "rich").await["windows"][0];
    assert_eq!(micros(&day["used_usd"]), 20_000);
    let month = &budget(&lumen, "key", "rich").await["windows"][1];
    assert_eq!(month["period"], "month");
    assert_eq!(micros(&month["used_usd"]), 20_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_by_its_client_is_charged_what_it_generated() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let body = priced(
        "fast",
        usage(1, 1),
        json!({"stream": true, "max_tokens": 1000, "mock_chunks": 200, "mock_delay_ms": 10}),
    );
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let bytes = serde_json::to_vec(&body).unwrap();
    let head = c
        .request_head(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer sk-rich"),
                ("content-type", "application/json"),
            ],
            &bytes,
        )
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    let mut seen = 0;
    while seen < 5 {
        let chunk = c.next_chunk().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    drop(c);
    // Settled once the gateway notices: the prompt's estimate and the events streamed, at
    // the price; far below the reservation (1,000 completion tokens at 2 µ$).
    let deadline = Instant::now() + Duration::from_secs(10);
    let day = loop {
        let b = budget(&lumen, "key", "rich").await;
        let day = b["windows"][0].clone();
        if micros(&day["reserved_usd"]) == 0 && micros(&day["used_usd"]) > 0 {
            break day;
        }
        assert!(Instant::now() < deadline, "never settled: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let used = micros(&day["used_usd"]);
    assert!((10..1_000).contains(&used), "charged {used} µ$");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_budget_is_shared_by_its_keys_and_counted_per_tenant() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    // 3,000 µ$ an answer (2,000 in, 500 out).
    let body = priced("fast", usage(2000, 500), json!({"max_tokens": 10}));
    assert_eq!(lumen.post_chat_as("sk-a", &body).await.status, 200);
    assert_eq!(lumen.post_chat_as("sk-b", &body).await.status, 200);
    // 6,000 µ$ spent, past the tenant's 5,000 (the second request's reservation fitted; its
    // usage was larger): nothing more, whichever key sends it.
    for key in ["sk-a", "sk-b"] {
        let refused = lumen.post_chat_as(key, &body).await;
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert_eq!(refused.json()["error"]["code"], "tenant_budget_exceeded");
    }
    let tenant = &budget(&lumen, "tenant", "acme").await["windows"][0];
    assert_eq!(micros(&tenant["used_usd"]), 6_000);
    // The ledger counts per tenant too.
    let report = admin(&lumen, "/admin/usage?tenant=acme").await;
    // (The refusals are rows too, as errors with no provider.)
    let rows: Vec<&Value> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["provider"] == "mock")
        .collect();
    assert_eq!(rows.len(), 2, "{report}");
    assert!(rows
        .iter()
        .all(|r| r["tenant"] == "acme" && micros(&r["cost_usd"]) == 3_000));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_budget_claim_limits_its_caller() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let svc = token(json!({"sub": "svc", "budget_usd": 0.003}));
    // 3,000 µ$ an answer: the whole budget.
    let body = priced("fast", usage(2000, 500), json!({"max_tokens": 10}));
    assert_eq!(lumen.post_chat_as(&svc, &body).await.status, 200);
    let refused = lumen.post_chat_as(&svc, &body).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "key_budget_exceeded");
    // Another subject of the same issuer has its own.
    let other = token_for("svc-2");
    assert_eq!(lumen.post_chat_as(&other, &body).await.status, 200);
    let b = budget(&lumen, "key", "jwt:https://idp.test:svc").await;
    assert_eq!(micros(&b["windows"][0]["limit_usd"]), 3_000);
    assert_eq!(micros(&b["windows"][0]["used_usd"]), 3_000);
    // A claim that is not an amount is refused like any bad token.
    let bad = token(json!({"sub": "svc", "budget_usd": "lots"}));
    assert_eq!(lumen.post_chat_as(&bad, &body).await.status, 401);
}

fn token_for(sub: &str) -> String {
    token(json!({"sub": sub, "budget_usd": 0.003}))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_reprices_the_next_request_never_one_in_flight() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let body = priced("slow", usage(1000, 500), json!({}));
    let addr = lumen.addr;
    let in_flight = {
        let body = body.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            c.post_json(
                "/v1/chat/completions",
                &[("authorization", "Bearer sk-free")],
                &body,
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let old_hash = admin(&lumen, "/admin/config").await["hash"].clone();
    let repriced = config(&mock, "").replace(
        r#"model: "slow-*", input: 1.0, output: 2.0"#,
        r#"model: "slow-*", input: 10.0, output: 20.0"#,
    );
    let text = format!(
        "listen: [\"{}\"]\nadmin_listen: \"{}\"\n{repriced}",
        lumen.addr, lumen.admin
    );
    std::fs::write(&lumen.config_path, text).unwrap();
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin(&lumen, "/admin/config").await["hash"] == old_hash {
        assert!(Instant::now() < deadline, "no reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = in_flight.await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("x-lumen-cost-usd"),
        Some("0.002000"),
        "old price"
    );
    let next = lumen.post_chat_as("sk-free", &body).await;
    assert_eq!(
        next.header("x-lumen-cost-usd"),
        Some("0.020000"),
        "new price"
    );
}

/// The fleet's budget store itself, on a real Redis: a settlement retried after a lost reply
/// counts once; a reservation whose node never settles it (it died) is released once held
/// past its time, so it cannot hold a month's budget until the month ends.
#[tokio::test(flavor = "multi_thread")]
async fn redis_reservations_settle_once_and_expire_when_their_node_is_gone() {
    use lumen_plugins::budget::shared::SharedBudgets;
    use lumen_plugins::budget::{Budget, BudgetConfig, BudgetId, Charge};
    let redis = RedisServer::start();
    let link = std::sync::Arc::new(
        lumen_plugins::redis_link::RedisLink::new(&redis.url(), Duration::from_millis(500))
            .unwrap(),
    );
    let budgets =
        std::sync::Arc::new(SharedBudgets::new(link, "t").holding_for(Duration::from_millis(300)));
    let charge = Charge {
        id: BudgetId::key("jwt:https://idp:with\nnewline"),
        budget: std::sync::Arc::new(
            Budget::from_config(&BudgetConfig {
                usd_per_day: Some(1.0),
                usd_per_month: Some(2.0),
                alert_at: None,
            })
            .unwrap(),
        ),
    };
    let charges = std::slice::from_ref(&charge);
    let (held, standing) = budgets.reserve(charges, 400_000).await.unwrap().unwrap();
    assert_eq!(standing.remaining, 600_000);
    // Settled twice (a retry): spent once, nothing left held.
    assert_eq!(
        budgets.settle(&held, 100_000).await.unwrap(),
        [100_000, 100_000]
    );
    assert_eq!(
        budgets.settle(&held, 100_000).await.unwrap(),
        [100_000, 100_000]
    );
    let day = &budgets.status(&charge).await.unwrap()[0];
    assert_eq!((day.used, day.reserved), (100_000, 0));
    // A reservation never settled (its node died): held, then released once held past its
    // time.
    let (_orphan, _) = budgets.reserve(charges, 800_000).await.unwrap().unwrap();
    assert!(
        budgets.reserve(charges, 200_000).await.unwrap().is_err(),
        "held"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past its time it no longer counts, even before another reservation comes.
    let day = &budgets.status(&charge).await.unwrap()[0];
    assert_eq!((day.used, day.reserved), (100_000, 0));
    let (late, standing) = budgets.reserve(charges, 200_000).await.unwrap().unwrap();
    assert_eq!(standing.remaining, 1_000_000 - 100_000 - 200_000);
    // Cancelled (settled at nothing), as when its reply was lost; twice, as a retry would.
    budgets.settle(&late, 0).await.unwrap();
    budgets.settle(&late, 0).await.unwrap();
    let day = &budgets.status(&charge).await.unwrap()[0];
    assert_eq!((day.used, day.reserved), (100_000, 0));
}

fn fleet_node(mock: &MockUpstream, redis: &RedisServer, on_error: &str, extra: &str) -> Lumen {
    Lumen::start(&format!(
        r#"
server: {{ threads: 2 }}
redis: {{ url: "{url}", timeout: 200ms, on_redis_error: {on_error}, local_budget_share: 0.5 }}
keys:
  - {{ id: fleet, key: "sk-fleet", budget: {{ usd_per_day: 1.0 }} }}
  - {{ id: small, key: "sk-small", budget: {{ usd_per_day: 0.01 }} }}
prices:
  - {{ provider: mock, model: up, input: 3.0, output: 15.0 }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
{extra}"#,
        url = redis.url(),
        base = mock.base_url()
    ))
}

/// 1,000 requests at once, half on each node, each answered with random usage no larger than
/// its reservation (a prompt within its estimate, a completion within `max_tokens`): no
/// request may overshoot, so the settled total stays within $1.00, and equals the sum of the
/// costs the answers reported, to the micro-dollar.
/// The fleet key's settled spend once it reaches `spent`, or what it is after 10 s. A settle
/// that Redis did not answer in time (a loaded machine) is sent again off the request's path
/// a second later, so the total may trail the answers' costs for that long.
async fn settled_to(node: &Lumen, spent: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let day = &budget(node, "key", "fleet").await["windows"][0];
        let used = micros(&day["used_usd"]);
        if used == spent || std::time::Instant::now() > deadline {
            return used;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_keep_a_thousand_concurrent_requests_within_one_budget_exactly() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let nodes = [
        fleet_node(&mock, &redis, "fail_closed", ""),
        fleet_node(&mock, &redis, "fail_closed", ""),
    ];
    // ~4,000 bytes of prompt: an estimate of ~1,000 tokens.
    let prompt = "lorem ipsum ".repeat(340);
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let addr = nodes[i % 2].addr;
            let prompt = prompt.clone();
            tokio::spawn(async move {
                let mut body = chat_with("fast", &prompt, json!({"max_tokens": 500}));
                let (p, c) = (fastrand::u64(100..=1000), fastrand::u64(1..=500));
                body["mock_usage"] = usage(p, c);
                let mut client = Client::connect(addr).await.unwrap();
                let r = client
                    .post_json(
                        "/v1/chat/completions",
                        &[("authorization", "Bearer sk-fleet")],
                        &body,
                    )
                    .await
                    .unwrap();
                let expected = (p * 3 + c * 15) as i64;
                (
                    r.status,
                    r.header("x-lumen-cost-usd").map(str::to_string),
                    expected,
                )
            })
        })
        .collect();
    let mut spent = 0i64;
    let mut admitted = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, cost, expected) = t.await.unwrap();
        match status {
            200 => {
                let cost = micros(&Value::String(cost.unwrap()));
                assert_eq!(cost, expected, "the header is the price times the usage");
                spent += cost;
                admitted += 1;
            }
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // Each reservation is at most ~10,700 µ$ (~1,060 prompt tokens × 3 + 500 × 15): at
    // least 93 fit in $1.00 even while all of them are held at once.
    assert!(
        admitted >= 93 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );
    let used = settled_to(&nodes[0], spent).await;
    let day = &budget(&nodes[0], "key", "fleet").await["windows"][0];
    assert_eq!(used, spent, "settled = the sum of the answers' costs");
    assert!(used <= 1_000_000, "within the budget: {used} µ$");
    assert_eq!(micros(&day["reserved_usd"]), 0, "nothing left held");
    // What the burst's reservations kept free is spent by requests one at a time, until
    // less than one worst case is left.
    for i in 0.. {
        let mut body = chat_with("fast", &prompt, json!({"max_tokens": 500}));
        body["mock_usage"] = usage(1000, 500);
        let r = nodes[i % 2].post_chat_as("sk-fleet", &body).await;
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        spent += header_micros(&r, "x-lumen-cost-usd");
    }
    let used = settled_to(&nodes[0], spent).await;
    assert_eq!(used, spent);
    assert!(
        used <= 1_000_000 && 1_000_000 - used < 11_000,
        "used {used} µ$"
    );
    // Both nodes read the same.
    let other = &budget(&nodes[1], "key", "fleet").await["windows"][0];
    assert_eq!(micros(&other["used_usd"]), used);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_fail_open_spends_the_local_share_and_fail_closed_refuses() {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let open = fleet_node(&mock, &redis, "fail_open", "");
    let closed = fleet_node(&mock, &redis, "fail_closed", "");
    // 3,495 µ$ an answer (1,000 in at 3, 33 out at 15); a reservation of under 1,000.
    let body = priced("fast", usage(1000, 33), json!({"max_tokens": 33}));
    assert_eq!(open.post_chat_as("sk-small", &body).await.status, 200);
    redis.kill();
    let refused = closed.post_chat_as("sk-small", &body).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"]["type"], "rate_limit_exceeded");
    // Fail-open: this node's half of the $0.01 (5,000 µ$), counted here from nothing: two
    // requests fit, the third does not.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(open.post_chat_as("sk-small", &body).await.status);
    }
    assert_eq!(statuses, [200, 200, 429]);
    let metrics = request(open.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lumen_redis_errors_total{op=\"budget\"}")),
        "{metrics}"
    );
}
