//! What Prometheus and humans read off the admin listener: gateway overhead (per response and
//! as a histogram), tokens by key, provider and route, and `/metrics/summary`.

use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::{promtool, scrape_until};
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

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_taken_under_load_passes_promtool_and_the_named_metrics_move() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: team-a, key: "sk-team-a" }}
  - {{ id: tight, key: "sk-tight", limits: {{ requests_per_minute: 2 }} }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
  down: {{ base_url: "http://127.0.0.1:1/v1", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: cached, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m }} }}
  - model: spill
    targets: [ {{ provider: down, model: up }}, {{ provider: mock, model: up }} ]
"#,
        base = mock.base_url()
    ));
    let addr = lumen.addr;
    let load = tokio::spawn(async move {
        let mut c = Client::connect(addr).await.unwrap();
        for i in 0..60 {
            let model = ["fast", "cached", "spill"][i % 3];
            let body = json!({"model": model, "stream": i % 2 == 0, "temperature": 0,
                              "mock_delay_ms": 2,
                              "messages": [{"role": "user", "content": "hi"}]});
            let resp = c
                .post_json(
                    "/v1/chat/completions",
                    &[("authorization", "Bearer sk-team-a")],
                    &body,
                )
                .await
                .unwrap();
            assert_eq!(resp.status, 200, "{}", resp.text());
        }
    });
    let mut scrapes = Vec::new();
    while !load.is_finished() {
        scrapes.push(
            request(lumen.admin, "GET", "/metrics", &[], b"")
                .await
                .unwrap()
                .text(),
        );
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    load.await.unwrap();
    for _ in 0..3 {
        let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
        request(
            lumen.addr,
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-tight")],
            body.to_string().as_bytes(),
        )
        .await
        .unwrap();
    }
    let last = scrape_until(lumen.admin, "lumen_rate_limited_total{key=\"tight\"").await;
    scrapes.push(last.clone());
    assert!(scrapes.len() >= 2, "no scrape was taken during the load");

    let dir = lumen_test_support::harness::tempdir::Dir::new("lumen-promtool");
    for (i, text) in scrapes.iter().enumerate() {
        let path = dir.path().join(format!("scrape-{i}.txt"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed on scrape {i}:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The metrics the operations issue names are present, and moved with this traffic.
    let moved =
        |series: &str| assert!(value(&last, series) > 0.0, "{series} did not move:\n{last}");
    moved(
        "lumen_requests_total{endpoint=\"chat\",provider=\"mock\",route=\"fast\",status=\"200\"}",
    );
    moved("lumen_request_duration_seconds_count{endpoint=\"chat\",route=\"fast\"}");
    moved("lumen_time_to_first_token_seconds_count{endpoint=\"chat\",route=\"fast\"}");
    moved("lumen_gateway_overhead_seconds_count{endpoint=\"chat\"}");
    moved(
        "lumen_tokens_total{key=\"team-a\",kind=\"completion\",provider=\"mock\",route=\"fast\"}",
    );
    moved("lumen_cache_requests_total{result=\"hit\",route=\"cached\"}");
    moved("lumen_rate_limited_total{key=\"tight\",reason=\"requests\"}");
    moved("lumen_fallbacks_total{from=\"down\",route=\"spill\",to=\"mock\"}");
    moved("lumen_upstream_attempts_total{outcome=\"connect\",provider=\"down\"}");
    for present in [
        "lumen_circuit_state{",
        "lumen_provider_in_flight{provider=\"mock\"}",
        "lumen_provider_slots{provider=\"mock\"}",
        "lumen_config_reloads_total",
        "lumen_config_last_reload_success_timestamp_seconds",
        "lumen_requests_in_flight",
    ] {
        assert!(last.contains(present), "{present} missing:\n{last}");
    }
}

/// A translated Responses request counts as `endpoint="responses"` everywhere, and its usage
/// (read off the chat answer it was translated from) reaches the token counters, streamed or
/// not. Sent with curl, as a shell user would.
#[tokio::test(flavor = "multi_thread")]
async fn responses_requests_are_counted_under_their_own_endpoint() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"keys: [ {{ id: team-a, key: "sk-team-a" }} ]
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    for stream in [false, true] {
        let body = json!({"model": "fast", "input": "hi", "stream": stream}).to_string();
        let out = std::process::Command::new("curl")
            .args(["-sS", "-N", "-H", "authorization: Bearer sk-team-a"])
            .args(["-H", "content-type: application/json", "-d", &body])
            .arg(format!("http://{}/v1/responses", lumen.addr))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if stream {
            assert!(text.contains("event: response.completed"), "{text}");
        } else {
            assert!(text.contains("\"object\":\"response\""), "{text}");
        }
    }
    // Non-stream: 7 prompt + 4 completion; stream (3 chunks): 7 + 3.
    let text = scrape_until(
        lumen.admin,
        "lumen_tokens_total{key=\"team-a\",kind=\"completion\",provider=\"mock\",route=\"fast\"} 7",
    )
    .await;
    for series in [
        "lumen_requests_total{endpoint=\"responses\",provider=\"mock\",route=\"fast\",status=\"200\"} 2",
        "lumen_request_duration_seconds_count{endpoint=\"responses\",route=\"fast\"} 2",
        "lumen_time_to_first_token_seconds_count{endpoint=\"responses\",route=\"fast\"} 1",
        "lumen_tokens_total{key=\"team-a\",kind=\"prompt\",provider=\"mock\",route=\"fast\"} 14",
    ] {
        assert!(text.contains(series), "{series}:\n{text}");
    }
}
