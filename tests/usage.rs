//! Usage accounting end to end: per key, provider, model and day, through `/admin/usage` and
//! `/admin/providers`; kept in a state file across a restart, shared by two nodes through a
//! real Redis; and the admin listener's key.

use std::time::Duration;

use lumen_test_support::client::request;
use lumen_test_support::harness::{tempdir::Dir, RedisServer};
use lumen_test_support::openai::chat_with;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

const ADMIN: (&str, &str) = ("authorization", "Bearer adm-test-key");

fn config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
server: {{ grace_period: 1s }}
admin_key: {{ key: "adm-test-key" }}
keys:
  - {{ id: team-a, key: "sk-team-a" }}
  - {{ id: team-b, key: "sk-team-b" }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: broken, targets: [ {{ provider: mock, model: status-500 }} ], retry: {{ attempts: 1 }} }}
  - {{ model: cached, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m }} }}
{extra}"#,
        base = mock.base_url()
    )
}

/// The chat these tests account for (greedy, so the `cached` route can hit).
fn usage_chat(model: &str, stream: bool) -> Value {
    chat_with(model, "hi", json!({"stream": stream, "temperature": 0}))
}

async fn usage(lumen: &Lumen, query: &str) -> Value {
    let resp = request(
        lumen.admin,
        "GET",
        &format!("/admin/usage{query}"),
        &[ADMIN],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

fn row<'a>(report: &'a Value, key: &str, model: &str) -> &'a Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key && r["model"] == model)
        .unwrap_or_else(|| panic!("no row for {key}/{model}: {report}"))
}

/// Waits until `/admin/usage{query}` shows `want` requests in total (usage is recorded just
/// after the response is sent).
async fn until_total(lumen: &Lumen, query: &str, want: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let report = usage(lumen, query).await;
        if report["total"]["requests"] == want {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wanted {want}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn traffic(lumen: &Lumen) {
    // team-a: 2 plain (7 + 4 tokens each), 1 stream (7 + 3), 1 error; team-b: a miss and a hit.
    assert_eq!(
        lumen
            .chat_status("sk-team-a", &usage_chat("fast", false))
            .await,
        200
    );
    assert_eq!(
        lumen
            .chat_status("sk-team-a", &usage_chat("fast", false))
            .await,
        200
    );
    assert_eq!(
        lumen
            .chat_status("sk-team-a", &usage_chat("fast", true))
            .await,
        200
    );
    assert_eq!(
        lumen
            .chat_status("sk-team-a", &usage_chat("broken", false))
            .await,
        500
    );
    assert_eq!(
        lumen
            .chat_status("sk-team-b", &usage_chat("cached", false))
            .await,
        200
    );
    assert_eq!(
        lumen
            .chat_status("sk-team-b", &usage_chat("cached", false))
            .await,
        200
    );
}

fn check_counts(report: &Value) {
    let fast = row(report, "team-a", "fast");
    assert_eq!(fast["provider"], "mock");
    assert_eq!(fast["requests"], 3, "{report}");
    assert_eq!(fast["prompt_tokens"], 21);
    assert_eq!(fast["completion_tokens"], 11);
    assert_eq!(fast["errors"], 0);
    let broken = row(report, "team-a", "broken");
    assert_eq!(
        (broken["requests"].as_u64(), broken["errors"].as_u64()),
        (Some(1), Some(1))
    );
    let cached = row(report, "team-b", "cached");
    assert_eq!(cached["requests"], 2);
    assert_eq!(cached["cache_hits"], 1);
    assert_eq!(cached["prompt_tokens"], 7, "only the miss used tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_counted_filtered_and_survives_a_restart() {
    let mock = MockUpstream::start();
    let state = Dir::new("lumen-usage-state");
    // An hour between flushes: only the shutdown flush can have written the file.
    let extra = format!(
        "usage: {{ state_dir: \"{}\", flush_interval: 1h }}\n",
        state.path().display()
    );
    let mut lumen = Lumen::start(&config(&mock, &extra));
    traffic(&lumen).await;
    let report = until_total(&lumen, "", 6).await;
    assert_eq!(report["backend"], "file");
    check_counts(&report);

    // Filters.
    let a = usage(&lumen, "?key=team-a").await;
    assert_eq!(a["total"]["requests"], 4);
    let fast = usage(&lumen, "?key=team-a&provider=mock&model=fast").await;
    assert_eq!(fast["rows"].as_array().unwrap().len(), 1);
    let yesterday = usage(&lumen, "?from=2020-01-01&to=2020-01-02").await;
    assert_eq!(yesterday["total"]["requests"], 0);
    let bad = request(
        lumen.admin,
        "GET",
        "/admin/usage?from=yesterday",
        &[ADMIN],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["code"], "invalid_parameter");

    // /admin/providers carries today's usage per provider.
    let providers = request(lumen.admin, "GET", "/admin/providers", &[ADMIN], b"")
        .await
        .unwrap()
        .json();
    let mock_usage = &providers["providers"][0]["usage_today"];
    assert_eq!(mock_usage["requests"], 6, "{providers}");
    assert_eq!(mock_usage["cache_hits"], 1);

    // SIGTERM: flushed on the way out; a new process reads it back.
    let status = lumen.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", lumen.log());
    let file = std::fs::read_to_string(state.path().join("usage.json"))
        .unwrap_or_else(|e| panic!("usage.json after the exit: {e}\n{}", lumen.log()));
    assert!(file.contains("\"team-a\""), "{file}");
    let config_text = std::fs::read_to_string(&lumen.config_path).unwrap();
    drop(lumen);
    let restarted = Lumen::start(&strip_listeners(&config_text));
    let report = usage(&restarted, "").await;
    check_counts(&report);
    // And it keeps counting from there.
    assert_eq!(
        restarted
            .chat_status("sk-team-a", &usage_chat("fast", false))
            .await,
        200
    );
    let report = until_total(&restarted, "?key=team-a&model=fast", 4).await;
    assert_eq!(report["total"]["prompt_tokens"], 28);
}

/// A connection that never sends its request holds the drain (it may be a client's request on
/// its way) but not past the grace period, and never at the cost of the usage written out.
#[tokio::test(flavor = "multi_thread")]
async fn usage_is_written_at_the_exit_even_when_a_silent_connection_outlives_the_grace_period() {
    let mock = MockUpstream::start();
    let state = Dir::new("lumen-usage-silent");
    // The header timeout (10 s) is far past the grace period (1 s).
    let extra = format!(
        "usage: {{ state_dir: \"{}\", flush_interval: 1h }}\n",
        state.path().display()
    );
    let mut lumen = Lumen::start(&config(&mock, &extra));
    assert_eq!(
        lumen
            .chat_status("sk-team-a", &usage_chat("fast", false))
            .await,
        200
    );
    until_total(&lumen, "", 1).await;
    let _silent = tokio::net::TcpStream::connect(lumen.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped_at = std::time::Instant::now();
    let status = lumen.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", lumen.log());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped_at.elapsed()
    );
    let file = std::fs::read_to_string(state.path().join("usage.json"))
        .unwrap_or_else(|e| panic!("usage.json after the exit: {e}\n{}", lumen.log()));
    assert!(file.contains("\"team-a\""), "{file}");
    assert!(lumen.log().contains("grace period over"), "{}", lumen.log());
}

/// The harness adds fresh listeners unless the YAML names them.
fn strip_listeners(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("listen:") && !l.starts_with("admin_listen:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_usage_through_redis() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let extra = format!(
        "redis: {{ url: \"{}\" }}\nusage: {{ flush_interval: 200ms }}\n",
        redis.url()
    );
    let a = Lumen::start(&config(&mock, &extra));
    let b = Lumen::start(&config(&mock, &extra));
    for _ in 0..3 {
        assert_eq!(
            a.chat_status("sk-team-a", &usage_chat("fast", false)).await,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            b.chat_status("sk-team-a", &usage_chat("fast", false)).await,
            200
        );
    }
    assert_eq!(
        b.chat_status("sk-team-b", &usage_chat("broken", false))
            .await,
        500
    );
    // Each node sees the fleet's total once both flushed.
    for node in [&a, &b] {
        let report = until_total(node, "", 6).await;
        assert_eq!(report["backend"], "redis");
        let fast = row(&report, "team-a", "fast");
        assert_eq!(fast["requests"], 5, "{report}");
        assert_eq!(fast["prompt_tokens"], 35);
        assert_eq!(row(&report, "team-b", "broken")["errors"], 1);
    }
    // A node killed outright after its flush loses nothing.
    drop(a);
    let report = until_total(&b, "?key=team-a", 5).await;
    assert_eq!(report["total"]["completion_tokens"], 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_counted_while_redis_is_down_reaches_it_later() {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let extra = format!(
        "redis: {{ url: \"{}\" }}\nusage: {{ flush_interval: 200ms }}\n",
        redis.url()
    );
    let lumen = Lumen::start(&config(&mock, &extra));
    redis.kill();
    for _ in 0..3 {
        assert_eq!(
            lumen
                .chat_status("sk-team-a", &usage_chat("fast", false))
                .await,
            200
        );
    }
    // Still visible from memory, with the store's error said.
    let report = until_total(&lumen, "", 3).await;
    assert!(report["store_error"].is_string(), "{report}");
    redis.restart();
    // Sent once Redis is back: a second node reads it from Redis alone.
    let other = Lumen::start(&config(&mock, &extra));
    let report = until_total(&other, "", 3).await;
    assert_eq!(row(&report, "team-a", "fast")["prompt_tokens"], 21);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_needs_its_key_when_one_is_set() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    for path in [
        "/metrics",
        "/admin/usage",
        "/admin/providers",
        "/admin/config",
    ] {
        let none = request(lumen.admin, "GET", path, &[], b"").await.unwrap();
        assert_eq!(none.status, 401, "{path}");
        assert_eq!(none.json()["error"]["code"], "invalid_api_key");
        // A client key is not an admin key.
        let client = request(
            lumen.admin,
            "GET",
            path,
            &[("authorization", "Bearer sk-team-a")],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(client.status, 401, "{path}");
        let ok = request(lumen.admin, "GET", path, &[ADMIN], b"")
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "{path}");
    }
    // Nor is the admin key a client key.
    assert_eq!(
        lumen
            .chat_status("adm-test-key", &usage_chat("fast", false))
            .await,
        401
    );
    let log = lumen.log();
    assert!(!log.contains("adm-test-key"), "the admin key was logged");
}

#[test]
fn an_admin_listener_beyond_loopback_needs_a_key() {
    let dir = Dir::new("lumen-admin-check");
    let path = dir.path().join("lumen.yaml");
    let base = "providers:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nadmin_listen: \"0.0.0.0:9091\"\n";
    std::fs::write(&path, base).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("admin_listen") && stderr.contains("admin_key"),
        "{stderr}"
    );
    std::fs::write(&path, format!("{base}admin_key: {{ key: \"adm-x\" }}\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
