//! Authentication at the edge, end to end: static API keys (stored hashed) and JWTs, allow-
//! lists, `/v1/models` filtering, and the `lumen keys` commands.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use lumen_test_support::client::{request, Client};
use lumen_test_support::openai::{chat, chat_job};
use lumen_test_support::{Lumen, MockUpstream, Response};
use serde_json::json;

const JWT_SECRET: &str = "jwt-test-secret-0123456789abcdef";

fn start_env(mock: &MockUpstream) -> Lumen {
    let hashed = keys_hash("sk-hashed-key");
    Lumen::start_with_env(
        &format!(
            r#"
keys:
  - {{ id: hashed, sha256: "{hashed}" }}
  - {{ id: from-env, key: "${{TEAM_KEY}}", models: ["fast", "direct/*"], tenant: acme }}
  - {{ id: old, key: "sk-expired-key", expires_at: "2020-01-01T00:00:00Z" }}
  - {{ id: off, key: "sk-disabled-key", disabled: true }}
jwt:
  - issuer: "https://idp.test"
    audience: lumen
    algorithms: [HS256]
    secret: "{JWT_SECRET}"
    claims: {{ key_id: sub, models: models }}
providers:
  mock: {{ base_url: "{base}" }}
  direct: {{ base_url: "{base}", expose_models: true }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: slow, targets: [ {{ provider: mock, model: up }} ] }}
"#,
            base = mock.base_url()
        ),
        &[("TEAM_KEY", "sk-team-key")],
    )
}

fn keys_hash(key: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn code(resp: &Response) -> String {
    resp.json()["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_in_both_headers_and_every_refusal() {
    let mock = MockUpstream::start();
    let lumen = start_env(&mock);
    let ok = lumen
        .post_chat(
            &[("authorization", "Bearer sk-hashed-key")],
            &chat("fast", "hi"),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ok = lumen
        .post_chat(&[("x-api-key", "sk-team-key")], &chat("fast", "hi"))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    for (headers, what) in [
        (vec![], "missing"),
        (vec![("authorization", "Bearer sk-unknown")], "unknown"),
        (vec![("authorization", "Bearer sk-expired-key")], "expired"),
        (vec![("x-api-key", "sk-disabled-key")], "disabled"),
        (
            vec![("authorization", "Basic c2stdGVhbS1rZXk=")],
            "not a bearer",
        ),
    ] {
        let resp = lumen.post_chat(&headers, &chat("fast", "hi")).await;
        assert_eq!(
            (resp.status, code(&resp).as_str()),
            (401, "invalid_api_key"),
            "{what}"
        );
        assert_eq!(resp.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(
        mock.requests().len(),
        2,
        "refused requests never reach the upstream"
    );

    // Probes need no key.
    let mut c = Client::connect(lumen.addr).await.unwrap();
    assert_eq!(
        c.request("GET", "/healthz", &[], b"").await.unwrap().status,
        200
    );
    lumen_test_support::harness::wait_for_status(
        lumen.addr,
        "/readyz",
        200,
        std::time::Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        c.request("GET", "/v1/models", &[], b"")
            .await
            .unwrap()
            .status,
        401
    );

    // Keys never reach the upstream or the logs; key ids do reach the access log.
    let seen: String = mock
        .requests()
        .iter()
        .flat_map(|r| r.headers.clone())
        .map(|(k, v)| format!("{k}:{v}\n"))
        .collect();
    assert!(!seen.contains("sk-"), "{seen}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = lumen.log();
    for secret in [
        "sk-hashed-key",
        "sk-team-key",
        "sk-unknown",
        "sk-expired-key",
        "sk-disabled-key",
    ] {
        assert!(!log.contains(secret), "{secret} logged");
    }
    assert!(log.contains(r#""key_id":"from-env""#), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_lists_and_the_model_list_follow_the_key() {
    let mock = MockUpstream::start();
    let lumen = start_env(&mock);
    let team = [("authorization", "Bearer sk-team-key")];
    assert_eq!(
        lumen.post_chat(&team, &chat("fast", "hi")).await.status,
        200
    );
    assert_eq!(
        lumen
            .post_chat(&team, &chat("direct/anything", "hi"))
            .await
            .status,
        200,
        "glob allow-list"
    );
    let resp = lumen.post_chat(&team, &chat("slow", "hi")).await;
    assert_eq!(
        (resp.status, code(&resp).as_str()),
        (403, "model_not_allowed")
    );
    // No oracle: a model outside the allow-list is refused the same whether it exists or not.
    let resp = lumen.post_chat(&team, &chat("nope", "hi")).await;
    assert_eq!(
        (resp.status, code(&resp).as_str()),
        (403, "model_not_allowed")
    );
    // A key that may use every model learns that it does not exist.
    let resp = lumen
        .post_chat(
            &[("authorization", "Bearer sk-hashed-key")],
            &chat("nope", "hi"),
        )
        .await;
    assert_eq!(resp.status, 404);

    let mut c = Client::connect(lumen.addr).await.unwrap();
    let ids = |r: Response| -> Vec<String> {
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = c.request("GET", "/v1/models", &team, b"").await.unwrap();
    assert_eq!(ids(listed), ["fast"]);
    let all = c
        .request(
            "GET",
            "/v1/models",
            &[("authorization", "Bearer sk-hashed-key")],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(ids(all), ["fast", "slow"]);
    assert_eq!(
        c.request("GET", "/v1/models/slow", &team, b"")
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jwts_are_verified_and_mapped() {
    let mock = MockUpstream::start();
    let lumen = start_env(&mock);
    let good = token(
        json!({"iss": "https://idp.test", "aud": "lumen", "sub": "svc-7", "exp": now() + 600, "models": ["fast"]}),
    );
    let bearer = format!("Bearer {good}");
    let resp = lumen
        .post_chat(&[("authorization", &bearer)], &chat("fast", "hi"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = lumen
        .post_chat(&[("authorization", &bearer)], &chat("slow", "hi"))
        .await;
    assert_eq!(resp.status, 403, "models claim is the allow-list");

    let refused = [
        token(json!({"iss": "https://idp.test", "aud": "lumen", "sub": "a", "exp": now() - 3600})),
        token(json!({"iss": "https://idp.test", "aud": "other", "sub": "a", "exp": now() + 600})),
        token(json!({"iss": "https://evil.test", "aud": "lumen", "sub": "a", "exp": now() + 600})),
        // alg: none, unsigned.
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(
                r#"{{"iss":"https://idp.test","aud":"lumen","sub":"a","exp":{}}}"#,
                now() + 600
            )
            .as_bytes())
        ),
        // Right claims, wrong signature.
        format!("{}x", &good[..good.len() - 1]),
    ];
    for t in refused {
        let resp = lumen
            .post_chat(
                &[("authorization", &format!("Bearer {t}"))],
                &chat("fast", "hi"),
            )
            .await;
        assert_eq!(
            (resp.status, code(&resp).as_str()),
            (401, "invalid_api_key"),
            "{t}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!lumen.log().contains(&good), "a token was logged");
    assert!(lumen
        .log()
        .contains(r#""key_id":"jwt:https://idp.test:svc-7""#));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_subject_is_not_the_static_key_of_the_same_name() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice", limits: {{ requests_per_minute: 600, burst: 3 }} }}
jwt:
  - {{ issuer: "https://idp.test", algorithms: [HS256], secret: "{JWT_SECRET}" }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m, scope: key }} }}
jobs: {{ workers: 0, default_model: fast }}
"#,
        base = mock.base_url()
    ));
    let alice = [("authorization", "Bearer sk-alice")];
    // A token whose subject is `alice`, with its own limit of 3 requests a minute.
    let jwt = format!(
        "Bearer {}",
        token(json!({"iss": "https://idp.test", "sub": "alice", "exp": now() + 600, "rpm": 3}))
    );
    let jwt = [("authorization", jwt.as_str())];
    let cached =
        json!({"model": "fast", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]});

    let mut c = Client::connect(lumen.addr).await.unwrap();
    let first = c
        .post_json("/v1/chat/completions", &alice, &cached)
        .await
        .unwrap();
    assert_eq!(first.header("x-lumen-cache"), Some("miss"));
    let job = c
        .post_json("/v1/jobs", &alice, &chat_job("fast", "hi", json!({})))
        .await
        .unwrap();
    assert_eq!(job.status, 202, "{}", job.text());
    let id = job.json()["id"].as_str().unwrap().to_string();

    // Cache scope `key`: alice's answer is not the token holder's.
    let theirs = c
        .post_json("/v1/chat/completions", &jwt, &cached)
        .await
        .unwrap();
    assert_eq!(theirs.status, 200, "{}", theirs.text());
    assert_eq!(
        theirs.header("x-lumen-cache"),
        Some("miss"),
        "alice's entry was served"
    );
    // Jobs: alice's job is not theirs to read.
    let read = c
        .request("GET", &format!("/v1/jobs/{id}"), &jwt, b"")
        .await
        .unwrap();
    assert_eq!(read.status, 404, "{}", read.text());
    assert_eq!(read.json()["error"]["code"], "job_not_found");
    let own = c
        .request("GET", &format!("/v1/jobs/{id}"), &alice, b"")
        .await
        .unwrap();
    assert_eq!(own.status, 200);

    // Limits: the token holder uses up its own 3 requests...
    for _ in 0..2 {
        let r = c
            .post_json("/v1/chat/completions", &jwt, &chat("fast", "hi"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let refused = c
        .post_json("/v1/chat/completions", &jwt, &chat("fast", "hi"))
        .await
        .unwrap();
    assert_eq!(refused.status, 429);
    // ...and alice's bucket is untouched by them.
    let r = c
        .post_json("/v1/chat/completions", &alice, &chat("fast", "hi"))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "alice shared the token holder's bucket: {}",
        r.text()
    );

    // Usage and the access log name the token holder by issuer and subject.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(lumen
        .log()
        .contains(r#""key_id":"jwt:https://idp.test:alice""#));
}

#[test]
fn a_static_key_id_may_not_start_with_jwt() {
    let dir = lumen_test_support::harness::tempdir::Dir::new("lumen-jwt-prefix");
    let path = dir.path().join("lumen.yaml");
    std::fs::write(
        &path,
        "keys:\n  - { id: \"jwt:https://idp.test:alice\", key: \"sk-a\" }\nproviders:\n  mock: { base_url: \"http://127.0.0.1:9\" }\nroutes:\n  - { model: fast, targets: [ { provider: mock } ] }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("keys[0].id"), "{text}");
    assert!(text.contains("reserved"), "{text}");
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn generated_keys_hash_to_what_the_config_needs() {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["keys", "generate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("sha256:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(keys_hash(&key), hash);
    assert_eq!(
        keys_hash("test"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_off_only_local_hosts_and_json_bodies_are_served() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
auth: off
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
jobs: {{ workers: 0, default_model: fast }}
"#,
        base = mock.base_url()
    ));
    let body = chat("fast", "hi").to_string();
    let send = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let body = body.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(lumen.addr, "POST", path, &headers, body.as_bytes())
                .await
                .unwrap()
        }
    };
    let json = || ("content-type", "application/json".to_string());
    let port = lumen.addr.port();

    // DNS rebinding: a page on attacker.example, its name re-pointed at 127.0.0.1, sends its
    // own name as Host.
    for host in [
        "attacker.example".to_string(),
        format!("attacker.example:{port}"),
        "localhost.attacker.example".to_string(),
    ] {
        let r = send("/v1/chat/completions", vec![("host", host.clone()), json()]).await;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (403, "host_not_allowed"),
            "{host}"
        );
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let models = c
        .request("GET", "/v1/models", &[("host", "attacker.example")], b"")
        .await
        .unwrap();
    assert_eq!(models.status, 403);
    let probe = c
        .request("GET", "/healthz", &[("host", "attacker.example")], b"")
        .await
        .unwrap();
    assert_eq!(probe.status, 200, "probes answer whatever the Host");
    // This machine's names and addresses are served.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        let r = send("/v1/chat/completions", vec![("host", host.clone()), json()]).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    let served = mock.requests().len();

    // CSRF: what a cross-site form or fetch may send without a preflight is not JSON.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let headers = content_type
            .map(|t| vec![("content-type", t.to_string())])
            .unwrap_or_default();
        let r = send("/v1/chat/completions", headers.clone()).await;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (415, "unsupported_media_type"),
            "{content_type:?}"
        );
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        let job = send("/v1/jobs", headers).await;
        assert_eq!(job.status, 415, "jobs too: {content_type:?}");
    }
    assert_eq!(
        mock.requests().len(),
        served,
        "nothing refused reached the provider"
    );
    let r = send(
        "/v1/chat/completions",
        vec![("content-type", "application/json; charset=utf-8".into())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
