//! `lumen status`, `lumen usage`, `lumen models` against a running gateway: tables and `--json`
//! carry the right values after known traffic, exit codes say when something is unhealthy, and
//! a gateway that is not running gives one clear line.

use std::process::Command;
use std::time::{Duration, Instant};

use lumen_test_support::client::request;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn lumen_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(args)
        .env_remove("LUMEN_ADMIN_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_usage_and_models_read_the_admin_api() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
admin_key: {{ key: "adm-cli" }}
keys:
  - {{ id: team-a, key: "sk-a" }}
providers:
  mock: {{ base_url: "{base}", health: {{ interval: 100ms }} }}
  gone: {{ base_url: "http://127.0.0.1:1/v1", health: {{ interval: 100ms, unhealthy_threshold: 1 }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 1m }} }}
  - {{ model: spare, strategy: round_robin, targets: [ {{ provider: gone, model: x }}, {{ provider: mock, model: up }} ] }}
"#,
        base = mock.base_url()
    ));
    let admin = lumen.admin.to_string();
    for _ in 0..3 {
        let body = json!({"model": "fast", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]});
        let r = request(
            lumen.addr,
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-a")],
            body.to_string().as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    // Let the probes mark `gone` down.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let (code, out, err) = lumen_cli(&[
            "status",
            "--admin",
            &admin,
            "--admin-key",
            "adm-cli",
            "--json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
        if v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "gone" && p["probe"]["state"] == "unhealthy")
            // Both probes have run: the refused one can finish before the other has answered.
            && v["providers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "mock" && p["probe"]["state"] == "healthy")
        {
            assert_eq!(code, 1, "a provider is down: exit 1");
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["healthy"], false);
    let mock_row = status["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mock")
        .unwrap();
    assert_eq!(mock_row["probe"]["state"], "healthy");
    assert_eq!(mock_row["usage_today"]["requests"], 3);
    let (code, table, _) = lumen_cli(&["status", "--admin", &admin, "--admin-key", "adm-cli"]);
    assert_eq!(code, 1);
    assert!(
        table.contains("PROVIDER") && table.contains("gone") && table.contains("unhealthy"),
        "{table}"
    );
    assert!(table.contains("no reload since start"), "{table}");

    // Without the admin key: a clear refusal, not a stack trace.
    let (code, _, err) = lumen_cli(&["status", "--admin", &admin]);
    assert_eq!(code, 2);
    assert!(err.contains("HTTP 401"), "{err}");

    let (code, out, _) = lumen_cli(&[
        "usage",
        "--admin",
        &admin,
        "--admin-key",
        "adm-cli",
        "--key",
        "team-a",
        "--since",
        "24h",
        "--json",
    ]);
    assert_eq!(code, 0);
    let usage: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(usage["total"]["requests"], 3);
    assert_eq!(usage["total"]["cache_hits"], 2, "{usage}");
    let (_, table, _) = lumen_cli(&["usage", "--admin", &admin, "--admin-key", "adm-cli"]);
    assert!(
        table.contains("team-a") && table.contains("TOTAL"),
        "{table}"
    );

    let (code, table, _) = lumen_cli(&["models", "--admin", &admin, "--admin-key", "adm-cli"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("spare")
            && table.contains("round_robin")
            && table.contains("gone/x, mock/up"),
        "{table}"
    );
}

#[test]
fn a_gateway_that_is_not_running_gives_one_clear_line() {
    let port = lumen_test_support::free_port();
    for cmd in ["status", "usage", "models"] {
        let (code, out, err) = lumen_cli(&[cmd, "--admin", &format!("127.0.0.1:{port}")]);
        assert_eq!(code, 2, "{cmd}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("no gateway answers at") && !err.contains("panicked"),
            "{err}"
        );
    }
}
