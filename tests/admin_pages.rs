//! The admin listener's pages and documents, against the real gateway: `/openapi.json` fitted
//! to the config, the console's time series, the admin key asked for as a Basic password, and
//! pages that explain how to install their front-end packages when they are missing. (The
//! pages in a real browser, and schemathesis against the spec: tests/python/test_admin_pages.py.)

use std::time::{Duration, Instant};

use lumen_test_support::client::request;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<(String, String)>) {
    let r = request(addr, "GET", path, headers, b"").await.unwrap();
    (r.status, r.text(), r.headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A gateway with auth off, one route (`fast`) to `mock`, and `extra` YAML.
fn open_gateway(mock: &MockUpstream, extra: &str) -> Lumen {
    Lumen::start(&format!(
        "auth: off\nproviders:\n  mock: {{ base_url: \"{}\" }}\nroutes:\n  - {{ model: fast, targets: [ {{ provider: mock }} ] }}\n{extra}\n",
        mock.base_url()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spec_follows_the_config() {
    let mock = MockUpstream::start();
    let lumen = open_gateway(
        &mock,
        "jobs: { workers: 1, compat_prefix: /compat, shape_b: false, default_model: fast }",
    );
    let (status, body, headers) = get(lumen.admin, "/openapi.json", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let spec: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let paths = spec["paths"].as_object().unwrap();
    // Shape A under the prefix; shape B (switched off) nowhere.
    for p in [
        "/compat/generate",
        "/compat/status/{task_id}",
        "/compat/stream/{task_id}",
    ] {
        assert!(paths.contains_key(p), "{p}: {:?}", paths.keys());
    }
    for p in ["/generate", "/chat_completion", "/compat/chat_completion"] {
        assert!(!paths.contains_key(p), "{p}");
    }
    // Served where they are answered: the main listener, and the admin listener for admin paths.
    assert_eq!(
        spec["servers"][0]["url"],
        format!("http://127.0.0.1:{}", lumen.addr.port())
    );
    assert_eq!(
        paths["/admin/usage"]["servers"][0]["url"],
        format!("http://127.0.0.1:{}", lumen.admin.port())
    );
    // The document describes what is answered: a job as submitted validates the job schema's
    // required fields.
    let submitted = request(
        lumen.addr,
        "POST",
        "/v1/jobs",
        &[("content-type", "application/json")],
        json!({"endpoint": "/v1/chat/completions", "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}})
            .to_string()
            .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let job = submitted.json();
    for field in spec["components"]["schemas"]["JobObject"]["required"]
        .as_array()
        .unwrap()
    {
        assert!(
            job.get(field.as_str().unwrap()).is_some(),
            "{field} missing in {job}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listener_on_every_address_is_named_by_the_host_asked_for() {
    let mock = MockUpstream::start();
    let (local, every) = (
        lumen_test_support::free_port(),
        lumen_test_support::free_port(),
    );
    let lumen = open_gateway(
        &mock,
        &format!(
            "listen: [\"127.0.0.1:{local}\", \"0.0.0.0:{every}\"]\nadmin_key: {{ key: \"adm\" }}"
        ),
    );
    let (status, body, _) = get(
        lumen.admin,
        "/openapi.json",
        &[
            ("host", "edge-7.example:9090"),
            ("authorization", "Bearer adm"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let spec: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        spec["servers"][0]["url"],
        format!("http://127.0.0.1:{local}")
    );
    assert_eq!(
        spec["servers"][1]["url"],
        format!("http://edge-7.example:{every}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_say_how_to_install_missing_packages() {
    let mock = MockUpstream::start();
    let lumen = open_gateway(&mock, "admin_assets: /nonexistent/node_modules");
    for page in ["/docs", "/redoc"] {
        let (status, body, headers) = get(lumen.admin, page, &[]).await;
        assert_eq!(status, 503, "{page}");
        assert!(body.contains("npm ci"), "{page}: {body}");
        assert!(header(&headers, "content-type")
            .unwrap()
            .starts_with("text/html"));
    }
    // The console still works (tables), and says why it has no charts.
    let (status, body, headers) = get(lumen.admin, "/ui", &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("charts-missing") && body.contains("npm ci"),
        "{body}"
    );
    assert!(!body.contains("uPlot.iife.min.js"));
    let csp = header(&headers, "content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let (status, js, _) = get(lumen.admin, "/ui/console.js", &[]).await;
    assert_eq!(status, 200);
    assert!(js.contains("/admin/timeseries"));
    // The spec needs no package.
    assert_eq!(get(lumen.admin, "/openapi.json", &[]).await.0, 200);
    // Assets: only listed files, and only when installed; never a path into the disk.
    for path in [
        "/assets/uplot/uPlot.iife.min.js",
        "/assets/../../../etc/passwd",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/assets/",
    ] {
        let (status, body, _) = get(lumen.admin, path, &[]).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn packages_installed_while_it_runs_are_served_without_a_restart() {
    let mock = MockUpstream::start();
    let ui = lumen_test_support::harness::tempdir::Dir::new("lumen-ui-assets");
    let lumen = open_gateway(&mock, &format!("admin_assets: {}", ui.path().display()));
    assert_eq!(get(lumen.admin, "/redoc", &[]).await.0, 503);
    // What `npm ci` would put there (the bundle reduced to the line that names the CDN).
    let redoc = ui.path().join("redoc");
    std::fs::create_dir_all(redoc.join("bundles")).unwrap();
    std::fs::write(redoc.join("package.json"), "{}").unwrap();
    std::fs::write(
        redoc.join("bundles/redoc.standalone.js"),
        "var logo = \"https://cdn.redoc.ly/redoc/logo-mini.svg\";",
    )
    .unwrap();
    let (status, page, _) = get(lumen.admin, "/redoc", &[]).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("/assets/redoc/redoc.standalone.js"));
    let (status, js, headers) = get(lumen.admin, "/assets/redoc/redoc.standalone.js", &[]).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type")
        .unwrap()
        .starts_with("text/javascript"));
    // The one URL of another host in the bundle is replaced by an inline image.
    assert!(!js.contains("cdn.redoc.ly"), "{js}");
    assert!(js.contains("data:image/svg+xml"), "{js}");
    // Admin JSON is never kept by a browser or a proxy.
    let (_, _, headers) = get(lumen.admin, "/admin/timeseries", &[]).await;
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_is_asked_for_the_admin_key_as_a_basic_password() {
    let mock = MockUpstream::start();
    let lumen = open_gateway(&mock, r#"admin_key: { key: "adm-secret" }"#);
    let (status, body, headers) = get(lumen.admin, "/ui", &[]).await;
    assert_eq!(status, 401);
    assert!(header(&headers, "www-authenticate")
        .unwrap()
        .starts_with("Basic realm=\"lumen admin\""));
    assert!(!body.contains("adm-secret"));
    // admin:adm-secret, and a wrong password.
    let (status, _, _) = get(
        lumen.admin,
        "/ui",
        &[("authorization", "Basic YWRtaW46YWRtLXNlY3JldA==")],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = get(
        lumen.admin,
        "/admin/timeseries",
        &[("authorization", "Basic YWRtaW46d3Jvbmc=")],
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = get(
        lumen.admin,
        "/openapi.json",
        &[("authorization", "Bearer adm-secret")],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_admin_key_only_requests_addressed_to_this_host_are_answered() {
    let mock = MockUpstream::start();
    let lumen = open_gateway(&mock, "");
    // A page elsewhere reaching 127.0.0.1 through a DNS name it controls (rebinding).
    let raw = async |host: &str| {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(lumen.admin).await.unwrap();
        s.write_all(
            format!("GET /admin/usage HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let refused = raw("attacker.example:9090").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("host_not_allowed"), "{refused}");
    for host in ["127.0.0.1:9090", "localhost:9090", "[::1]:9090"] {
        let ok = raw(host).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{host}: {ok}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_timeseries_holds_the_last_minutes_of_traffic() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: team, key: "sk-team" }}
providers:
  mock: {{ base_url: "{}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock }} ] }}
  - {{ model: broken, targets: [ {{ provider: mock, model: "status-500" }} ] }}
"#,
        mock.base_url()
    ));
    let chat = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
    };
    for i in 0..20 {
        let body = if i % 4 == 3 {
            chat("broken", false)
        } else {
            chat("fast", i % 2 == 0)
        };
        let r = request(
            lumen.addr,
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-team")],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert!(r.status == 200 || r.status >= 500, "{}", r.text());
    }
    // The sampler takes a point every 2 s: wait for the one that holds the traffic.
    let deadline = Instant::now() + Duration::from_secs(15);
    let busy = loop {
        let (status, body, _) = get(lumen.admin, "/admin/timeseries", &[]).await;
        assert_eq!(status, 200);
        let series: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(series["interval_ms"], 2000);
        let points = series["points"].as_array().unwrap().clone();
        if let Some(p) = points
            .iter()
            .find(|p| p["requests_per_s"].as_f64() > Some(0.0))
        {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no point with traffic: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let ratio = busy["error_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "{busy}");
    assert!(busy["p50_ms"].as_f64().unwrap() > 0.0, "{busy}");
    assert!(busy["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{busy}");
    assert!(busy["tokens_per_s"].as_f64().unwrap() > 0.0, "{busy}");
    // `since` returns only newer points; a bad one is a 400 in OpenAI's shape.
    let t = busy["t"].as_u64().unwrap();
    let (_, body, _) = get(lumen.admin, &format!("/admin/timeseries?since={t}"), &[]).await;
    let newer: Value = serde_json::from_str(&body).unwrap();
    assert!(newer["points"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["t"].as_u64().unwrap() > t));
    let (status, body, _) = get(lumen.admin, "/admin/timeseries?since=yesterday", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "invalid_parameter"
    );
}
