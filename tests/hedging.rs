//! Hedged requests on the real `lumen` and mock providers: a late first target raced by the
//! next, the first answer kept and the other dropped (its in-flight count given back, its
//! prompt charged), fast answers never hedged, the budget capping hedges, and a first target of
//! known capacity hedged only while requests queue on it.

use lumen_test_support::client::{request, Client, Response};
use lumen_test_support::harness::scrape_until;
use lumen_test_support::openai::{chat, chat_with};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn config(a: &MockUpstream, b: &MockUpstream, a_model: &str, hedge: &str, a_extra: &str) -> String {
    format!(
        r#"auth: off
providers:
  a: {{ base_url: "{}", timeout: 10s, health: {{ enabled: false }}{a_extra} }}
  b: {{ base_url: "{}", timeout: 10s, health: {{ enabled: false }} }}
prices:
  - {{ provider: a, input: 1000, output: 1000 }}
  - {{ provider: b, input: 1, output: 2 }}
routes:
  - model: h
    targets: [ {{ provider: a, model: {a_model} }}, {{ provider: b, model: up }} ]
    hedge: {hedge}
"#,
        a.base_url(),
        b.base_url()
    )
}

async fn ask(lumen: &Lumen, body: &Value) -> Response {
    let mut c = Client::connect(lumen.addr).await.unwrap();
    c.post_json("/v1/chat/completions", &[], body)
        .await
        .unwrap()
}

async fn metrics(lumen: &Lumen) -> String {
    request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_first_target_is_raced_and_the_first_answer_wins() {
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    let lumen = Lumen::start(&config(
        &a,
        &b,
        "hang",
        "{ after: 100ms, budget: 100% }",
        "",
    ));
    // Non-stream: the hedge on b answers; a never will.
    let r = ask(&lumen, &chat("h", "hello")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-lumen-provider"), Some("b"));
    assert_eq!(
        r.header("x-lumen-attempts"),
        Some("2"),
        "the hedge is an attempt"
    );
    assert_eq!(r.header("x-lumen-hedged"), Some("1"));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "mock reply from up"
    );
    // The loser's prompt is charged at its price (1000 $/M) on top of the winner's cost
    // (7 × 1 + 3 × 2 µ$): what both attempts really used.
    let cost: f64 = r.header("x-lumen-cost-usd").unwrap().parse().unwrap();
    assert!(cost > 0.001, "{cost}");
    // Stream: the same, the stream intact.
    let r = ask(&lumen, &chat_with("h", "hello", json!({"stream": true}))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-lumen-provider"), Some("b"));
    assert_eq!(r.header("x-lumen-hedged"), Some("1"));
    assert!(
        r.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        r.text()
    );
    assert_eq!(a.requests().len(), 2, "both first attempts were sent");
    assert_eq!(b.requests().len(), 2);
    let m = metrics(&lumen).await;
    assert!(
        m.contains("lumen_hedges_total{outcome=\"won\",route=\"h\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("lumen_upstream_attempts_total{outcome=\"hedge_lost\",provider=\"a\"} 2"),
        "{m}"
    );
    // The dropped attempts gave their in-flight counts back: a is idle again.
    let providers = request(lumen.admin, "GET", "/admin/providers", &[], b"")
        .await
        .unwrap()
        .json();
    let a_state = providers["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "a"))
        .cloned()
        .unwrap_or_else(|| panic!("{providers}"));
    assert_eq!(a_state["in_flight"], 0, "{a_state}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_first_target_is_never_hedged() {
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    let lumen = Lumen::start(&config(&a, &b, "up", "{ after: 500ms, budget: 100% }", ""));
    for _ in 0..5 {
        let r = ask(&lumen, &chat("h", "hello")).await;
        assert_eq!(r.header("x-lumen-provider"), Some("a"));
        assert_eq!(r.header("x-lumen-hedged"), None);
    }
    assert_eq!(b.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_caps_hedges_at_their_share_of_the_routes_requests() {
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    let lumen = Lumen::start(&config(
        &a,
        &b,
        "slow-200",
        "{ after: 20ms, budget: 10% }",
        "",
    ));
    let mut hedged = 0;
    for _ in 0..30 {
        let r = ask(&lumen, &chat("h", "hello")).await;
        assert_eq!(r.status, 200);
        if r.header("x-lumen-hedged").is_some() {
            hedged += 1;
        }
    }
    // 10% of 30 requests: at most 3 hedges; every other late request waited for a.
    assert!((1..=3).contains(&hedged), "{hedged} hedged");
    assert_eq!(b.requests().len(), hedged);
    let m = scrape_until(lumen.admin, "lumen_hedges_total{outcome=\"skipped_budget\"").await;
    let skipped: usize = m
        .lines()
        .find(|l| l.starts_with("lumen_hedges_total{outcome=\"skipped_budget\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(skipped + hedged, 30, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_target_with_room_is_not_hedged_however_slow() {
    // `a` has a known capacity (as a sidecar reports its slots): a request it has room for
    // waits for it; cloud spend buys latency only when requests queue on it.
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    let lumen = Lumen::start(&config(
        &a,
        &b,
        "slow-300",
        "{ after: 20ms, budget: 100% }",
        ", max_in_flight: 2",
    ));
    let r = ask(&lumen, &chat("h", "hello")).await;
    assert_eq!(r.header("x-lumen-provider"), Some("a"));
    assert_eq!(r.header("x-lumen-hedged"), None);
    assert_eq!(b.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_percentile_delay_learns_the_routes_time_to_first_byte() {
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    // 50 ms usually, 2 s for 10% of requests: p80 sits near 50 ms once learnt.
    let lumen = Lumen::start(&config(
        &a,
        &b,
        "ttft-50-10-2000",
        "{ after: p80, budget: 50% }",
        "",
    ));
    let mut hedged = 0;
    for _ in 0..60 {
        let r = ask(&lumen, &chat("h", "hello")).await;
        assert_eq!(r.status, 200);
        if r.header("x-lumen-hedged").is_some() {
            hedged += 1;
            // A hedge starts only when `a` is late, and then `b` (no wait) answers first.
            assert_eq!(r.header("x-lumen-provider"), Some("b"));
        }
    }
    // About one in ten requests hit the tail; each was hedged once the budget allowed.
    assert!(hedged >= 1, "nothing hedged");
    assert_eq!(b.requests().len(), hedged);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hedged_route_reserves_the_hedges_prompt_too() {
    let (a, b) = (MockUpstream::start(), MockUpstream::start());
    let yaml = format!(
        r#"keys:
  - {{ id: k, key: "sk-k", limits: {{ tokens_per_minute: 1800 }} }}
providers:
  a: {{ base_url: "{}", health: {{ enabled: false }} }}
  b: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: plain
    targets: [ {{ provider: a, model: up }}, {{ provider: b, model: up }} ]
  - model: hedged
    targets: [ {{ provider: a, model: up }}, {{ provider: b, model: up }} ]
    hedge: {{ after: 1s, budget: 100% }}
"#,
        a.base_url(),
        b.base_url()
    );
    let lumen = Lumen::start(&yaml);
    // About 1,200 prompt tokens (body bytes / 4): one prompt fits the 1,800 a minute, a prompt
    // and its hedge's do not, whether or not a hedge then starts.
    let prompt = "word ".repeat(960);
    let ask = |model: &str| {
        let body = chat_with(model, &prompt, json!({"max_tokens": 1}));
        let addr = lumen.addr;
        async move {
            let mut c = Client::connect(addr).await.unwrap();
            c.post_json(
                "/v1/chat/completions",
                &[("authorization", "Bearer sk-k")],
                &body,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(ask("plain").await.status, 200);
    let refused = ask("hedged").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    // The plain request was settled with its real usage: there is room for another.
    assert_eq!(ask("plain").await.status, 200);
}
