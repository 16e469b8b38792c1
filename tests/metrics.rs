//! What Prometheus and humans read off the admin listener: gateway overhead (per response and
//! as a histogram), tokens by key, provider and route, and `/metrics/summary`.

use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::scrape_until;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn overhead_tokens_and_the_summary_move_with_traffic() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: team-a, key: "sk-team-a" }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    let mut c = Client::connect(lumen.addr).await.unwrap();
    for stream in [false, true] {
        let body = json!({"model": "fast", "stream": stream, "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "hi"}]});
        let resp = c
            .post_json(
                "/v1/chat/completions",
                &[("authorization", "Bearer sk-team-a")],
                &body,
            )
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        let overhead: u64 = resp.header("x-lumen-overhead-us").unwrap().parse().unwrap();
        assert!(overhead < 1_000_000, "{overhead}");
    }
    // Non-stream: 7 prompt + 4 completion; stream (3 chunks): 7 + 3.
    let text = scrape_until(
        lumen.admin,
        "lumen_tokens_total{key=\"team-a\",kind=\"prompt\",provider=\"mock\",route=\"fast\"} 14",
    )
    .await;
    assert!(
        text.contains(
            "lumen_tokens_total{key=\"team-a\",kind=\"completion\",provider=\"mock\",route=\"fast\"} 7"
        ),
        "{text}"
    );
    assert!(
        text.contains("lumen_gateway_overhead_seconds_count{endpoint=\"chat\"} 2"),
        "{text}"
    );

    let summary = request(lumen.admin, "GET", "/metrics/summary", &[], b"")
        .await
        .unwrap()
        .json();
    // The harness's own /healthz probe counts too; the route's two are ours.
    assert_eq!(summary["requests"]["by_route"]["fast"], 2, "{summary}");
    assert_eq!(summary["upstream"]["fallbacks"], 0);
    assert_eq!(summary["tokens"]["prompt"], 14);
    assert!(summary["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(summary["gateway_overhead_us"]["p50"].as_f64().is_some());
    assert_eq!(summary["upstream"]["attempts"]["ok"], 2);
}
