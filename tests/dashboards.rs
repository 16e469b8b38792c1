//! The operator's Prometheus files: `conf/prometheus/lumen-rules.yml` passes `promtool check
//! rules`, `conf/grafana/lumen.json` parses, and every metric either of them queries exists in
//! a live scrape of the real gateway after a mix of traffic (so a renamed metric cannot leave a
//! dashboard panel or an alert silently empty).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lumen_test_support::client::request;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::harness::{promtool, repo_path};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

/// Every `lumen_*` metric name in a PromQL expression, histogram suffixes removed.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("lumen_") {
        let start = i + at;
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |n| start + n);
        let name = &expr[start..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        into.insert(base.to_string());
        i = end;
    }
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
        _ => {}
    }
}

#[test]
fn the_alert_rules_pass_promtool() {
    let out = std::process::Command::new(promtool())
        .args(["check", "rules"])
        .arg(repo_path("conf/prometheus/lumen-rules.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_and_the_alerts_query_exists_in_a_live_scrape() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("conf/grafana/lumen.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "lumen-gateway");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let rules = std::fs::read_to_string(repo_path("conf/prometheus/lumen-rules.yml")).unwrap();
    all.extend(
        rules
            .lines()
            .filter(|l| l.contains("lumen_"))
            .map(str::to_string),
    );
    let mut wanted = BTreeSet::new();
    for e in &all {
        metric_names(e, &mut wanted);
    }
    assert!(wanted.len() >= 25, "{wanted:?}");

    // A gateway that sees every kind of event those panels and alerts are about.
    let mock = MockUpstream::start();
    let models = Dir::new("lumen-dash-models");
    let bogus = models.path().join("broken.gguf");
    std::fs::write(&bogus, b"not a model").unwrap();
    let sidecar_port = lumen_test_support::free_port();
    let dead_redis = lumen_test_support::free_port();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: team, key: "sk-team" }}
  - {{ id: tight, key: "sk-tight", limits: {{ requests_per_minute: 1 }} }}
  - {{ id: payer, key: "sk-payer", budget: {{ usd_per_day: 1, alert_at: 0.8 }} }}
prices:
  - {{ provider: mock, model: up, input: 1, output: 2 }}
redis: {{ url: "redis://127.0.0.1:{dead_redis}", timeout: 20ms }}
providers:
  mock: {{ base_url: "{base}", health: {{ interval: 100ms }} }}
  down: {{ base_url: "http://127.0.0.1:1/v1", health: {{ enabled: false }}, circuit: {{ failures: 1, cooldown: 60s }} }}
  local:
    base_url: "http://127.0.0.1:{sidecar_port}/v1"
    spawn: {{ model: "{model}", alias: broken }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: cached, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m }} }}
  - {{ model: spill, targets: [ {{ provider: down, model: up }}, {{ provider: mock, model: up }} ] }}
  - {{ model: dead, targets: [ {{ provider: down, model: up }} ] }}
readiness: config_loaded
cache: {{ redis: false }}
jobs: {{ workers: 1 }}
"#,
        base = mock.base_url(),
        model = bogus.display()
    ));
    let post = |key: &'static str, body: Value| {
        let addr = lumen.addr;
        async move {
            let auth = format!("Bearer {key}");
            request(
                addr,
                "POST",
                "/v1/chat/completions",
                &[("authorization", auth.as_str())],
                body.to_string().as_bytes(),
            )
            .await
            .unwrap()
        }
    };
    let chat = |model: &str, stream: bool| json!({"model": model, "stream": stream, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]});
    for stream in [false, true] {
        assert_eq!(post("sk-team", chat("fast", stream)).await.status, 200);
        assert_eq!(post("sk-team", chat("cached", stream)).await.status, 200);
        assert_eq!(post("sk-team", chat("spill", stream)).await.status, 200);
        post("sk-team", chat("dead", stream)).await;
        post("sk-tight", chat("fast", stream)).await;
        assert_eq!(post("sk-payer", chat("fast", stream)).await.status, 200);
    }
    let job = json!({"endpoint": "/v1/chat/completions", "body": chat("fast", false)});
    let r = request(
        lumen.addr,
        "POST",
        "/v1/jobs",
        &[("authorization", "Bearer sk-team")],
        job.to_string().as_bytes(),
    )
    .await
    .unwrap();
    // Redis is unreachable here: the job store says so at once rather than hanging.
    assert_eq!(r.status, 503, "{}", r.text());
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = request(lumen.admin, "GET", "/metrics", &[], b"")
            .await
            .unwrap()
            .text();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|m| !scrape.contains(&format!("# TYPE {m} ")))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queried by conf/grafana or conf/prometheus but not exported: {missing:?}\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
