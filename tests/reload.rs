//! Hot reload, end to end: the real `lumen` binary re-reads its file when it changes or on
//! SIGHUP, swaps the new routing table and keys in without dropping a request, and keeps
//! serving the old config when the new one is invalid.

use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Client};
use lumen_test_support::openai::chat;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

fn config(
    mock: &MockUpstream,
    listen: &str,
    admin: &str,
    extra_keys: &str,
    extra_routes: &str,
) -> String {
    format!(
        r#"listen: ["{listen}"]
admin_listen: "{admin}"
server: {{ watch_config: WATCH }}
keys:
  - {{ id: alice, key: "sk-alice", limits: {{ requests_per_minute: 5, burst: 5 }} }}
{extra_keys}providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
{extra_routes}"#,
        base = mock.base_url()
    )
}

async fn admin_config(lumen: &Lumen) -> serde_json::Value {
    request(lumen.admin, "GET", "/admin/config", &[], b"")
        .await
        .unwrap()
        .json()
}

/// Waits until `/admin/config` reports a reload after `since_hash` changed or an error.
async fn wait_reload(lumen: &Lumen, old_hash: &str, want_error: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = admin_config(lumen).await;
        let errored = c["last_reload"]["result"] == "error";
        if (want_error && errored) || (!want_error && c["hash"] != old_hash) {
            return c;
        }
        assert!(Instant::now() < deadline, "no reload seen: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write(lumen: &Lumen, text: &str) {
    // Like an editor: a new file renamed over the old one.
    let tmp = lumen.config_path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &lumen.config_path).unwrap();
}

fn ports() -> (String, String) {
    let p = lumen_test_support::free_port();
    let a = lumen_test_support::free_port();
    (format!("127.0.0.1:{p}"), format!("127.0.0.1:{a}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_change_applies_keys_and_routes_at_once_and_a_bad_file_keeps_the_old_config() {
    let mock = MockUpstream::start();
    let (listen, admin) = ports();
    let base = config(
        &mock,
        &listen,
        &admin,
        "  - { id: bob, key: \"sk-bob\" }\n",
        "",
    )
    .replace("WATCH", "true");
    let lumen = Lumen::start(&base);
    assert_eq!(lumen.chat_status("sk-bob", &chat("fast", "hi")).await, 200);
    assert_eq!(
        lumen
            .chat_status("sk-alice", &chat("new-route", "hi"))
            .await,
        404
    );
    let hash = admin_config(&lumen).await["hash"]
        .as_str()
        .unwrap()
        .to_string();

    // Bob's key removed, a route added.
    let next = config(
        &mock,
        &listen,
        &admin,
        "",
        "  - { model: new-route, targets: [ { provider: mock, model: up } ] }\n",
    )
    .replace("WATCH", "true");
    write(&lumen, &next);
    let c = wait_reload(&lumen, &hash, false).await;
    assert_eq!(c["last_reload"]["result"], "ok");
    assert_eq!(c["last_reload"]["trigger"], "file");
    assert_eq!(
        lumen.chat_status("sk-bob", &chat("fast", "hi")).await,
        401,
        "a removed key is refused at once"
    );
    assert_eq!(
        lumen
            .chat_status("sk-alice", &chat("new-route", "hi"))
            .await,
        200,
        "a new route works at once"
    );

    // Invalid: the old config keeps serving and the error says where.
    let hash = c["hash"].as_str().unwrap().to_string();
    write(
        &lumen,
        &next.replace(
            "provider: mock, model: up } ] }\n",
            "provider: nope } ] }\n",
        ),
    );
    let c = wait_reload(&lumen, &hash, true).await;
    assert_eq!(c["hash"], hash.as_str(), "still the old config");
    let error = c["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("unknown provider `nope`"), "{error}");
    assert!(
        error.contains(":10:"),
        "file:line:column in the error: {error}"
    );
    assert_eq!(
        lumen
            .chat_status("sk-alice", &chat("new-route", "hi"))
            .await,
        200
    );
    lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_config_reloads_total{result=\"error\"} 1",
    )
    .await;
    assert!(lumen.log().contains("config reload failed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_limit_counters_survive_it() {
    let mock = MockUpstream::start();
    let (listen, admin) = ports();
    let base = config(&mock, &listen, &admin, "", "").replace("WATCH", "false");
    let lumen = Lumen::start(&base);
    // Spend 3 of alice's 5.
    for _ in 0..3 {
        assert_eq!(
            lumen.chat_status("sk-alice", &chat("fast", "hi")).await,
            200
        );
    }
    let hash = admin_config(&lumen).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let next = config(
        &mock,
        &listen,
        &admin,
        "",
        "  - { model: other, targets: [ { provider: mock, model: up } ] }\n",
    )
    .replace("WATCH", "false");
    write(&lumen, &next);
    // Watching is off: nothing happens until SIGHUP.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(admin_config(&lumen).await["hash"], hash.as_str());
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let c = wait_reload(&lumen, &hash, false).await;
    assert_eq!(c["last_reload"]["trigger"], "sighup");
    // The bucket outlived the reload: 2 left, then refused.
    assert_eq!(
        lumen.chat_status("sk-alice", &chat("other", "hi")).await,
        200
    );
    assert_eq!(
        lumen.chat_status("sk-alice", &chat("other", "hi")).await,
        200
    );
    assert_eq!(
        lumen.chat_status("sk-alice", &chat("other", "hi")).await,
        429
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_reloads_under_load_fail_no_request() {
    let mock = MockUpstream::start();
    let (listen, admin) = ports();
    let base = config(
        &mock,
        &listen,
        &admin,
        "  - { id: load, key: \"sk-load\" }\n",
        "",
    )
    .replace("WATCH", "false");
    let lumen = Lumen::start(&base);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = lumen.addr;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let body =
                    json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
                let mut c = Client::connect(addr).await.unwrap();
                let (mut ok, mut bad) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c
                        .post_json(
                            "/v1/chat/completions",
                            &[("authorization", "Bearer sk-load")],
                            &body,
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => bad.push(r.status.to_string()),
                        Err(e) => {
                            bad.push(e.to_string());
                            c = Client::connect(addr).await.unwrap();
                        }
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    for i in 0..50 {
        let routes =
            format!("  - {{ model: extra-{i}, targets: [ {{ provider: mock, model: up }} ] }}\n");
        let next = config(
            &mock,
            &listen,
            &admin,
            "  - { id: load, key: \"sk-load\" }\n",
            &routes,
        )
        .replace("WATCH", "false");
        write(&lumen, &next);
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, bad) = w.await.unwrap();
        assert!(bad.is_empty(), "failed requests during reloads: {bad:?}");
        total += ok;
    }
    assert!(total > 100, "{total}");
    let metrics = lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_config_reloads_total{result=\"ok\"}",
    )
    .await;
    let reloads: u64 = metrics
        .lines()
        .find(|l| l.starts_with("lumen_config_reloads_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(reloads >= 10, "{reloads}");
}

/// An RSA key pair made with the `openssl` CLI: (private PEM, public PEM).
fn rsa_pair(dir: &std::path::Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (
        std::fs::read(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

fn rs256(private_pem: &[u8]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"iss": "https://idp.test", "sub": "svc", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(private_pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_a_jwt_public_key_file_reloads_without_touching_the_config() {
    let mock = MockUpstream::start();
    let keys = lumen_test_support::harness::tempdir::Dir::new("lumen-jwt-rotate");
    let (old_private, old_public) = rsa_pair(keys.path(), "old");
    let (new_private, new_public) = rsa_pair(keys.path(), "new");
    let key_file = keys.path().join("idp.pub.pem");
    std::fs::write(&key_file, &old_public).unwrap();
    let lumen = Lumen::start(&format!(
        r#"jwt:
  - {{ issuer: "https://idp.test", algorithms: [RS256], public_key_file: "{}" }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        key_file.display(),
        mock.base_url()
    ));
    let (old_token, new_token) = (rs256(&old_private), rs256(&new_private));
    assert_eq!(
        lumen.chat_status(&old_token, &chat("fast", "hi")).await,
        200
    );
    assert_eq!(
        lumen.chat_status(&new_token, &chat("fast", "hi")).await,
        401
    );
    let hash = admin_config(&lumen).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    // The identity provider rotated its key: a new file renamed over the old one.
    let tmp = keys.path().join("idp.pub.pem.tmp");
    std::fs::write(&tmp, &new_public).unwrap();
    std::fs::rename(&tmp, &key_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lumen.chat_status(&new_token, &chat("fast", "hi")).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the new key was never picked up:\n{}",
            lumen.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lumen.chat_status(&old_token, &chat("fast", "hi")).await,
        401
    );
    let c = admin_config(&lumen).await;
    assert_eq!(c["last_reload"]["trigger"], "file");
    assert_eq!(c["last_reload"]["result"], "ok");
    // The config file itself did not change.
    assert_eq!(c["hash"], hash.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_listener_is_logged_as_needing_a_restart() {
    let mock = MockUpstream::start();
    let (listen, admin) = ports();
    let base = config(&mock, &listen, &admin, "", "").replace("WATCH", "false");
    let lumen = Lumen::start(&base);
    let hash = admin_config(&lumen).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let (other_listen, _) = ports();
    write(
        &lumen,
        &base.replace(&listen, &other_listen).replace(
            "routes:\n",
            "routes:\n  - { model: added, targets: [ { provider: mock, model: up } ] }\n",
        ),
    );
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    wait_reload(&lumen, &hash, false).await;
    // Everything else applied; the old listener still serves, and the log says why.
    assert_eq!(
        lumen.chat_status("sk-alice", &chat("added", "hi")).await,
        200
    );
    let log = lumen.log();
    assert!(
        log.contains("take effect only after a restart") && log.contains("listen"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reload_reports_every_problem_of_the_file() {
    let mock = MockUpstream::start();
    let (listen, admin) = ports();
    let base = config(&mock, &listen, &admin, "", "").replace("WATCH", "false");
    let lumen = Lumen::start(&base);
    let hash = admin_config(&lumen).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    // Two problems, on two lines.
    write(
        &lumen,
        &config(
            &mock,
            &listen,
            &admin,
            "",
            "  - { model: one, targets: [ { provider: nope-one } ] }\n  - { model: two, targets: [ { provider: nope-two } ] }\n",
        )
        .replace("WATCH", "false"),
    );
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let c = wait_reload(&lumen, &hash, true).await;
    let problems: Vec<&str> = c["last_reload"]["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems list: {c}"))
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("`nope-one`"), "{problems:?}");
    assert!(problems[1].contains("`nope-two`"), "{problems:?}");
    let error = c["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("nope-one") && error.contains("nope-two"),
        "{error}"
    );
    // The log line that says the reload failed names both, not just the first.
    let log = lumen.log();
    let line = log
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap_or_else(|| panic!("no failure logged:\n{log}"));
    assert!(
        line.contains("nope-one") && line.contains("nope-two"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_cannot_remove_the_admin_key_while_the_admin_socket_stays_on_every_address() {
    let mock = MockUpstream::start();
    let (listen, loopback_admin) = ports();
    let port = lumen_test_support::free_port();
    let exposed = format!("0.0.0.0:{port}");
    // The harness finds the admin port as the first `127.0.0.1:PORT` after `admin_listen:`.
    let keyed = |admin: &str, key: &str| {
        config(&mock, &listen, admin, "", "")
            .replace("WATCH", "false")
            .replace(
                "server:",
                &format!("# admin reached at 127.0.0.1:{port}\n{key}server:"),
            )
    };
    let base = keyed(&exposed, "admin_key: { key: \"adm-secret\" }\n");
    let lumen = Lumen::start(&base);
    let config_as_admin = || async {
        request(
            lumen.admin,
            "GET",
            "/admin/config",
            &[("authorization", "Bearer adm-secret")],
            b"",
        )
        .await
        .unwrap()
    };
    let before = config_as_admin().await;
    assert_eq!(before.status, 200);
    let hash = before.json()["hash"].as_str().unwrap().to_string();

    // The new file is valid on its own (a loopback admin needs no key), but the socket stays
    // bound to 0.0.0.0 until a restart.
    write(&lumen, &keyed(&loopback_admin, ""));
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = config_as_admin().await;
        assert_eq!(c.status, 200, "the old key must still be asked for");
        let c = c.json();
        if c["last_reload"]["result"] == "error" {
            break c;
        }
        assert!(Instant::now() < deadline, "no reload seen: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(c["hash"], hash.as_str(), "still the old config");
    let error = c["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("admin_key") && error.contains(&exposed),
        "{error}"
    );
    // The admin listener still refuses requests without the key, and the proxy serves.
    let anonymous = request(lumen.admin, "GET", "/admin/config", &[], b"")
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        lumen.chat_status("sk-alice", &chat("fast", "hi")).await,
        200
    );
    assert!(lumen.log().contains("config reload failed"));
}
