//! The foundation, end to end: the real `lumen` binary in front of the mock provider.

use std::time::Duration;

use lumen_test_support::client::{request, Client};
use lumen_test_support::openai::{chat, chat_with};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

fn config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
auth: off
limits: {{ max_body_bytes: 2MiB }}
providers:
  mock:
    base_url: "{base}"
    api_key: "${{MOCK_PROVIDER_KEY}}"
    timeout: 2s
  direct: {{ base_url: "{base}", expose_models: true }}
  # Probes off: these tests see what a request meets, not what a probe already knows.
  dead: {{ base_url: "http://127.0.0.1:1/v1", connect_timeout: 1s, health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: hangs
    targets: [ {{ provider: mock, model: hang }} ]
  - model: limited
    targets: [ {{ provider: mock, model: status-429 }} ]
  - model: broken
    targets: [ {{ provider: mock, model: status-500 }} ]
  - model: drops
    targets: [ {{ provider: mock, model: drop-mid-stream }} ]
  - model: unreachable
    targets: [ {{ provider: dead, model: x }} ]
  - model: "*embed*"
    targets: [ {{ provider: mock }} ]
{extra}"#,
        base = mock.base_url()
    )
}

const PROVIDER_KEY: &str = "sk-provider-secret-123";

fn start(mock: &MockUpstream) -> Lumen {
    Lumen::start_with_env(&config(mock, ""), &[("MOCK_PROVIDER_KEY", PROVIDER_KEY)])
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_is_forwarded_with_model_rewritten_and_provider_key() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[("authorization", "Bearer client-key-abc")],
            &chat("fast", "hello"),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "mock reply from upstream-fast"
    );
    assert_eq!(resp.header("x-lumen-provider"), Some("mock"));

    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].json()["model"], "upstream-fast");
    assert_eq!(seen[0].json()["messages"][0]["content"], "hello");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(
        seen[0]
            .header("content-length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(seen[0].body.len())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_never_reach_the_upstream() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let headers = [
        ("authorization", "Bearer client-key-abc"),
        ("x-api-key", "client-key-def"),
        ("api-key", "client-key-ghi"),
        ("cookie", "session=client-key-jkl"),
        ("x-custom-trace", "keep-me"),
    ];
    let resp = c
        .post_json("/v1/chat/completions", &headers, &chat("fast", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let seen = &mock.requests()[0];
    let all: String = seen
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect();
    assert!(
        !all.contains("client-key"),
        "client credentials leaked upstream:\n{all}"
    );
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("x-custom-trace"), Some("keep-me"));
    // And the provider key never shows in our logs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!lumen.log().contains(PROVIDER_KEY));
    assert!(!lumen.log().contains("client-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_propagated_or_generated() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[("x-request-id", "trace-42")],
            &chat("fast", "hello"),
        )
        .await
        .unwrap();
    assert_eq!(resp.header("x-request-id"), Some("trace-42"));
    assert_eq!(mock.requests()[0].header("x-request-id"), Some("trace-42"));

    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("fast", "hello"))
        .await
        .unwrap();
    let generated = resp.header("x-request-id").unwrap().to_string();
    assert_eq!(generated.len(), 32);
    assert_eq!(
        mock.requests()[1].header("x-request-id"),
        Some(generated.as_str())
    );
    // Errors carry it too.
    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("nope", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    assert!(resp.header("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_chunks_arrive_as_the_upstream_sends_them() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let body = json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "hi"}],
                      "mock_chunks": 4, "mock_delay_ms": 250});
    let resp = c
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = resp.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let text = resp.chat_stream_text();
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    // Each token chunk left the gateway when it arrived: 250 ms apart, not all at the end.
    let token_chunks: Vec<Duration> = resp
        .chunks
        .iter()
        .filter(|(_, bytes)| String::from_utf8_lossy(bytes).contains("tok"))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(token_chunks.len(), 4, "{:?}", resp.chunks);
    for pair in token_chunks.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(150),
            "chunks bunched: {token_chunks:?}"
        );
    }
}

/// Events that reached the gateway together leave it together: one write to the client (one
/// chunk on the wire) instead of one write and one flush per event.
#[tokio::test(flavor = "multi_thread")]
async fn stream_chunks_that_arrive_together_leave_in_one_write() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let body = json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "hi"}],
                      "mock_chunks": 20, "mock_one_write": true});
    let resp = c
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let data = resp.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let expected: String = (0..20).map(|i| format!("tok{i} ")).collect();
    assert_eq!(resp.chat_stream_text(), expected);
    // 21 events and [DONE] in at most two chunks (a head read may end mid-body).
    assert!(
        resp.chunks.len() <= 2,
        "{} chunks for one upstream write",
        resp.chunks.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_embeddings_and_rerank_are_forwarded() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let resp = c
        .post_json(
            "/v1/completions",
            &[],
            &json!({"model": "fast", "prompt": "Once"}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json()["choices"][0]["text"],
        "mock completion from upstream-fast"
    );

    let resp = c
        .post_json(
            "/v1/embeddings",
            &[],
            &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 2);
    // A pattern route with no target model keeps the client's model name.
    assert_eq!(mock.requests()[1].json()["model"], "text-embedding-3-small");

    let resp = c
        .post_json(
            "/v1/rerank",
            &[],
            &json!({"model": "fast", "query": "q", "documents": ["x", "y", "z"]}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["results"].as_array().unwrap().len(), 3);
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/completions", "/v1/embeddings", "/v1/rerank"]);

    // provider/model reaches an exposing provider directly.
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[],
            &chat("direct/mock-large", "hello"),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(mock.requests()[3].json()["model"], "mock-large");
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[],
            &chat("mock/mock-large", "hello"),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.status, 404,
        "providers do not expose models unless configured"
    );
}

fn error_code(resp: &lumen_test_support::Response) -> String {
    let body = resp.json();
    assert!(
        body["error"]["message"].is_string(),
        "not an OpenAI error: {body}"
    );
    assert!(
        body["error"]["type"].is_string(),
        "not an OpenAI error: {body}"
    );
    body["error"]["code"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_get_openai_shaped_answers() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let post = |body: &'static [u8]| async move {
        request(
            lumen.addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        )
        .await
        .unwrap()
    };
    let resp = post(b"{not json").await;
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (400, "invalid_json")
    );
    let resp = post(b"").await;
    assert_eq!(resp.status, 400);
    let resp = post(br#"{"messages": []}"#).await;
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (400, "missing_model")
    );
    assert_eq!(resp.json()["error"]["param"], "model");
    let resp = post(br#"{"model": "fast"}"#).await;
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (400, "missing_required_parameter")
    );
    let resp = post(br#"{"model": "fast", "messages": [], "stream": "yes"}"#).await;
    assert_eq!(resp.status, 400);
    let resp = post(br#"{"model": "gpt-9", "messages": []}"#).await;
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (404, "model_not_found")
    );

    let resp = c.request("GET", "/v1/unknown", &[], b"").await.unwrap();
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (404, "unknown_url")
    );
    let resp = c
        .request("GET", "/v1/chat/completions", &[], b"")
        .await
        .unwrap();
    assert_eq!(resp.status, 405);
    let resp = c.request("POST", "/v1/models", &[], b"{}").await.unwrap();
    assert_eq!(resp.status, 405);
    assert!(
        mock.requests().is_empty(),
        "no bad request may reach the upstream"
    );

    // Over the body limit: 413, also when the client streams the body without a length.
    let big = vec![b' '; 3 << 20];
    let resp = request(lumen.addr, "POST", "/v1/chat/completions", &[], &big)
        .await
        .unwrap();
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (413, "request_too_large")
    );
    // The gateway still serves after all that.
    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("fast", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_map_to_502_504_and_upstream_errors_pass_through() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("unreachable", "hello"))
        .await
        .unwrap();
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (502, "upstream_unavailable")
    );

    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("hangs", "hello"))
        .await
        .unwrap();
    assert_eq!(
        (resp.status, error_code(&resp).as_str()),
        (504, "upstream_timeout")
    );

    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("limited", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(
        resp.json()["error"]["code"],
        "mock_429",
        "the provider's own error passes through"
    );

    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("broken", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 500);
    assert_eq!(resp.json()["error"]["code"], "mock_500");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_broken_mid_way_ends_with_an_error_event() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let body = json!({"model": "drops", "stream": true, "messages": [], "mock_chunks": 5});
    let resp = c
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let data = resp.sse_data();
    assert!(data.len() >= 3, "{data:?}");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "api_error", "{data:?}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    // The connection is still usable afterwards.
    let resp = c
        .post_json("/v1/chat/completions", &[], &chat("fast", "hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_arrive_byte_exact() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    for size in [16 * 1024, 1024 * 1024] {
        mock.clear();
        let content: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let body = json!({"messages": [{"role": "user", "content": content}], "model": "fast", "temperature": 0.5});
        let resp = c
            .post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "size {size}");
        let seen = mock.requests();
        let expected = serde_json::to_vec(&body).unwrap();
        let expected = String::from_utf8(expected)
            .unwrap()
            .replace(r#""model":"fast""#, r#""model":"upstream-fast""#);
        assert_eq!(
            String::from_utf8_lossy(&seen[0].body),
            expected,
            "size {size}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_streams_arrive_complete_and_in_order() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let addr = lumen.addr;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                let body = json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": format!("req {i}")}],
                                  "mock_chunks": 20, "mock_delay_ms": 5});
                c.post_json("/v1/chat/completions", &[], &body).await.unwrap()
            })
        })
        .collect();
    let expected: String = (0..20).map(|i| format!("tok{i} ")).collect();
    for resp in futures::future::join_all(tasks).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status, 200);
        let data = resp.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let text = resp.chat_stream_text();
        assert_eq!(text, expected);
    }
    assert_eq!(mock.requests().len(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_paths_and_the_model_list() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let resp = c.request("GET", "/healthz", &[], b"").await.unwrap();
    assert_eq!(
        (resp.status, resp.json()["status"].as_str()),
        (200, Some("ok"))
    );
    // Ready once the first probes have found the providers up (within milliseconds).
    lumen_test_support::harness::wait_for_status(
        lumen.addr,
        "/readyz",
        200,
        Duration::from_secs(3),
    )
    .await;
    let resp = c.request("GET", "/v1/models", &[], b"").await.unwrap();
    let ids: Vec<String> = resp.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        ["fast", "hangs", "limited", "broken", "drops", "unreachable"]
    );
    assert_eq!(resp.json()["object"], "list");
    let resp = c.request("GET", "/v1/models/fast", &[], b"").await.unwrap();
    assert_eq!(resp.json()["id"], "fast");
    let resp = c.request("GET", "/v1/models/nope", &[], b"").await.unwrap();
    assert_eq!(resp.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_by_route_provider_and_status() {
    let mock = MockUpstream::start();
    let lumen = start(&mock);
    let mut c = Client::connect(lumen.addr).await.unwrap();
    for _ in 0..3 {
        c.post_json("/v1/chat/completions", &[], &chat("fast", "hello"))
            .await
            .unwrap();
    }
    c.post_json("/v1/chat/completions", &[], &chat("limited", "hello"))
        .await
        .unwrap();
    // Requests are counted in the logging phase, just after the response went out.
    let text = lumen_test_support::harness::scrape_until(
        lumen.admin,
        r#"lumen_requests_total{endpoint="chat",provider="mock",route="limited",status="429"} 1"#,
    )
    .await;
    assert!(
        text.contains(
            r#"lumen_requests_total{endpoint="chat",provider="mock",route="fast",status="200"} 3"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"lumen_requests_total{endpoint="chat",provider="mock",route="limited",status="429"} 1"#
    ));
    assert!(
        text.contains(r#"lumen_request_duration_seconds_count{endpoint="chat",route="fast"} 3"#)
    );
    assert!(text.contains("lumen_upstream_first_byte_seconds_bucket"));
    // The admin listener is not the proxy listener.
    let resp = request(lumen.addr, "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_is_closed_by_default_and_opens_per_config() {
    let mock = MockUpstream::start();
    let closed = start(&mock);
    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let resp = request(
        closed.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &preflight,
        b"",
    )
    .await
    .unwrap();
    assert_ne!(resp.status, 204);
    assert!(resp.header("access-control-allow-origin").is_none());

    let open = Lumen::start_with_env(
        &config(
            &mock,
            "cors: { allow_origins: [\"https://app.example\"] }\n",
        ),
        &[("MOCK_PROVIDER_KEY", PROVIDER_KEY)],
    );
    let resp = request(
        open.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &preflight,
        b"",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 204);
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(mock.requests().is_empty(), "preflight answered at the edge");
    let mut c = Client::connect(open.addr).await.unwrap();
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[("origin", "https://app.example")],
            &chat("fast", "hello"),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(resp
        .header("access-control-expose-headers")
        .unwrap()
        .contains("x-request-id"));
    let resp = c
        .post_json(
            "/v1/chat/completions",
            &[("origin", "https://evil.example")],
            &chat("nope", "hello"),
        )
        .await
        .unwrap();
    assert!(resp.header("access-control-allow-origin").is_none());
}

/// Connections to a provider are kept alive and reused across requests, plain answers and
/// streams alike: with one thread (one pool), one connection carries them all.
#[tokio::test(flavor = "multi_thread")]
async fn provider_connections_are_kept_alive_and_reused() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"auth: off
server: {{ threads: 1 }}
providers:
  mock: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: m, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        mock.base_url()
    ));
    for i in 0..20 {
        let body = chat_with("m", "hi", json!({"stream": i % 2 == 1}));
        let resp = lumen.post_chat(&[], &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(mock.connections(), 1, "one connection carried all twenty");
}
