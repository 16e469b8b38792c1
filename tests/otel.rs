//! OpenTelemetry traces, received by a real OTLP receiver (`tests/support/src/otlp.rs`, the
//! collector's protobuf messages over HTTP and gRPC): one trace from a client through two
//! nodes to the provider, with the GenAI attributes and every attempt; sampling and content
//! capture; and a collector that never answers, which must not slow or fail a request.

use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Response};
use lumen_test_support::harness::{scrape_until, RedisServer, Worker};
use lumen_test_support::keyed::wait_job;
use lumen_test_support::openai::{chat, chat_job};
use lumen_test_support::otlp::{OtlpReceiver, Span};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::Value;

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

async fn post(lumen: &Lumen, body: &Value, headers: &[(&str, &str)]) -> Value {
    send(lumen, "/v1/chat/completions", body, headers)
        .await
        .json()
}

/// POSTs `body` as JSON to `path` with `headers`; the reply must be a 200.
async fn send(lumen: &Lumen, path: &str, body: &Value, headers: &[(&str, &str)]) -> Response {
    let mut headers = headers.to_vec();
    headers.push(("content-type", "application/json"));
    let r = request(
        lumen.addr,
        "POST",
        path,
        &headers,
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// A node serving `fast` from the mock, auth off, with `extra` on top (its `tracing:`).
fn node(mock: &MockUpstream, extra: &str) -> Lumen {
    node_with_env(mock, extra, &[])
}

/// [`node`] with `env` in its environment.
fn node_with_env(mock: &MockUpstream, extra: &str, env: &[(&str, &str)]) -> Lumen {
    Lumen::start_with_env(
        &format!(
            r#"
auth: off
{extra}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: cut, targets: [ {{ provider: mock, model: drop-mid-stream }} ] }}
  - model: hedged
    targets: [ {{ provider: mock, model: slow-2000 }}, {{ provider: mock, model: up }} ]
    hedge: {{ after: 50ms, budget: 100% }}
"#,
            base = mock.base_url()
        ),
        env,
    )
}

fn one<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall: {spans:#?}");
    found[0]
}

/// A client's `traceparent` in [`CLIENT_TRACE`], naming `span`, sampled or not.
fn client_parent(span: &str, sampled: bool) -> String {
    format!(
        "00-{CLIENT_TRACE}-{span}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// Whether a request's server span and an attempt of it have arrived.
fn request_and_attempt(spans: &[Span]) -> bool {
    spans.iter().any(|s| s.kind == 2) && spans.iter().any(|s| s.kind == 3)
}

/// The parent id a W3C `traceparent` names (`00-trace-parent-flags`).
fn parent_of(traceparent: &str) -> (&str, &str, &str) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1], parts[2], parts[3])
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_crosses_the_client_two_nodes_and_the_provider() {
    let receiver = OtlpReceiver::http();
    let mock = MockUpstream::start();
    // Node B serves `inner` from the mock; node A serves `outer`, first from a target that
    // fails with 503 (the fallback shows as a failed attempt), then from node B.
    let b = Lumen::start(&format!(
        r#"
auth: off
tracing: {{ otlp: "{otlp}", service_name: lumen-b, export_every: 200ms }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: inner, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        otlp = receiver.url(),
        base = mock.base_url()
    ));
    let a = Lumen::start(&format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice-secret" }}
tracing: {{ otlp: "{otlp}", service_name: lumen-a, export_every: 200ms }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
  node-b: {{ base_url: "http://{b}/v1", health: {{ enabled: false }} }}
routes:
  - {{ model: outer, targets: [ {{ provider: mock, model: status-503 }}, {{ provider: node-b, model: inner }} ] }}
"#,
        otlp = receiver.url(),
        base = mock.base_url(),
        b = b.addr
    ));
    let traceparent = client_parent(CLIENT_SPAN, true);
    post(
        &a,
        &chat("outer", "the secret prompt"),
        &[
            ("authorization", "Bearer sk-alice-secret"),
            ("traceparent", traceparent.as_str()),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;

    // Two server spans, three attempts (503, then node B; and node B's own).
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().filter(|s| s.kind == 2).count() >= 2
            && s.iter().filter(|s| s.kind == 3).count() >= 3
    });
    assert!(
        spans.iter().all(|s| s.trace_id == CLIENT_TRACE),
        "{spans:#?}"
    );

    let a_server = one(&spans, "node A's server span", |s| {
        s.kind == 2 && s.service == "lumen-a"
    });
    assert_eq!(a_server.parent_span_id, CLIENT_SPAN);
    assert_eq!(a_server.name, "chat outer");
    assert_eq!(a_server.attr("gen_ai.operation.name"), "chat");
    assert_eq!(a_server.attr("gen_ai.request.model"), "outer");
    assert_eq!(a_server.attr("gen_ai.response.model"), "inner");
    assert_eq!(a_server.attr("gen_ai.provider.name"), "node-b");
    assert_eq!(a_server.attr("gen_ai.usage.input_tokens"), 7);
    assert_eq!(a_server.attr("gen_ai.usage.output_tokens"), 4);
    assert_eq!(a_server.attr("http.response.status_code"), 200);
    assert_eq!(a_server.attr("lumen.key_id"), "alice");
    assert_eq!(a_server.attr("lumen.attempts"), 2);

    let a_failed = one(&spans, "the 503 attempt", |s| {
        s.kind == 3 && s.service == "lumen-a" && s.attr("gen_ai.provider.name") == "mock"
    });
    assert_eq!(a_failed.parent_span_id, a_server.span_id);
    assert_eq!(a_failed.name, "chat status-503");
    assert_eq!(a_failed.attr("error.type"), "503");
    assert_eq!(a_failed.status, 2);
    let a_ok = one(&spans, "the attempt on node B", |s| {
        s.kind == 3 && s.service == "lumen-a" && s.attr("gen_ai.provider.name") == "node-b"
    });
    assert_eq!(a_ok.parent_span_id, a_server.span_id);
    assert_eq!(a_ok.attr("gen_ai.request.model"), "inner");
    assert_eq!(a_ok.attr("server.address"), "127.0.0.1");
    assert_eq!(a_ok.attr("server.port"), i64::from(b.addr.port()));
    assert_eq!(a_ok.attr("gen_ai.usage.output_tokens"), 4);
    assert!(a_ok.attr("error.type").is_null());

    // Node B's server span is the child of node A's attempt: one trace across the nodes.
    let b_server = one(&spans, "node B's server span", |s| {
        s.kind == 2 && s.service == "lumen-b"
    });
    assert_eq!(b_server.parent_span_id, a_ok.span_id);
    assert_eq!(b_server.attr("gen_ai.request.model"), "inner");
    let b_attempt = one(&spans, "node B's attempt", |s| {
        s.kind == 3 && s.service == "lumen-b"
    });
    assert_eq!(b_attempt.parent_span_id, b_server.span_id);
    assert_eq!(b_attempt.attr("gen_ai.request.model"), "up");

    // The provider got node B's attempt as its parent, the client's vendor state carried on,
    // and never the client's credential.
    let sent = mock
        .requests()
        .into_iter()
        .find(|r| r.json()["model"] == "up")
        .expect("the provider's request");
    let (trace, parent, flags) = parent_of(sent.header("traceparent").unwrap());
    assert_eq!(
        (trace, parent, flags),
        (CLIENT_TRACE, b_attempt.span_id.as_str(), "01")
    );
    assert_eq!(sent.header("tracestate"), Some("vendor=abc"));
    // Neither prompts (capture_content is off) nor secrets are on any span.
    for s in &spans {
        for (k, v) in &s.attributes {
            let text = v.to_string();
            assert!(!text.contains("secret"), "{k} = {text} on {}", s.name);
        }
        assert!(!s.attributes.contains_key("gen_ai.input.messages"));
        assert!(!s.attributes.contains_key("gen_ai.output.messages"));
    }
    let metrics = scrape_until(a.admin, "lumen_otel_spans_total{result=\"exported\"}").await;
    assert!(
        metrics.contains("lumen_otel_spans_total{result=\"dropped\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_trace_links_its_submit_on_one_node_and_its_run_on_a_worker() {
    let receiver = OtlpReceiver::http();
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let config = |service: &str, workers: u32| {
        format!(
            r#"
keys:
  - {{ id: alice, key: "sk-alice" }}
redis: {{ url: "{redis}" }}
tracing: {{ otlp: "{otlp}", service_name: {service}, export_every: 200ms }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
jobs: {{ workers: {workers} }}
"#,
            redis = redis.url(),
            otlp = receiver.url(),
            base = mock.base_url()
        )
    };
    // The node takes the submit and runs nothing; the worker (another process) runs it.
    let node = Lumen::start(&config("lumen-node", 0));
    let _worker = Worker::start(&config("lumen-worker", 1));
    let traceparent = client_parent(CLIENT_SPAN, true);
    let body = chat_job("fast", "a queued question", serde_json::json!({})).to_string();
    let submitted = request(
        node.addr,
        "POST",
        "/v1/jobs",
        &[
            ("authorization", "Bearer sk-alice"),
            ("content-type", "application/json"),
            ("traceparent", traceparent.as_str()),
        ],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let id = submitted.json()["id"].as_str().unwrap().to_string();
    let done = wait_job(node.addr, "sk-alice", &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");

    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.service == "lumen-worker" && s.kind == 3)
            && s.iter().any(|s| s.service == "lumen-worker" && s.kind == 2)
            && s.iter().any(|s| s.name == "job queue wait")
            && s.iter().any(|s| s.service == "lumen-node" && s.kind == 2)
    });
    let submit = one(&spans, "the submit", |s| {
        s.service == "lumen-node" && s.kind == 2 && s.trace_id == CLIENT_TRACE
    });
    assert_eq!(submit.parent_span_id, CLIENT_SPAN);
    assert_eq!(submit.name, "POST /v1/jobs");
    assert_eq!(submit.attr("http.response.status_code"), 202);
    // Its Redis calls (queueing the job) are its children.
    let queued = spans
        .iter()
        .find(|s| s.parent_span_id == submit.span_id && s.name == "redis jobs")
        .unwrap_or_else(|| panic!("no Redis span under the submit: {spans:#?}"));
    assert_eq!(queued.attr("db.system.name"), "redis");
    assert_eq!(queued.kind, 3);
    // The run, on the worker, is the submit's child; its queue wait and attempt are its own.
    let run = one(&spans, "the run", |s| {
        s.service == "lumen-worker" && s.kind == 2
    });
    assert_eq!(run.trace_id, CLIENT_TRACE);
    assert_eq!(run.parent_span_id, submit.span_id);
    assert_eq!(run.name, "chat fast");
    let wait = one(&spans, "the queue wait", |s| s.name == "job queue wait");
    assert_eq!(wait.parent_span_id, run.span_id);
    let attempt = one(&spans, "the run's attempt", |s| {
        s.service == "lumen-worker" && s.kind == 3
    });
    assert_eq!(attempt.parent_span_id, run.span_id);
    let sent = mock
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/chat/completions"))
        .unwrap();
    let (trace, parent, _) = parent_of(sent.header("traceparent").unwrap());
    assert_eq!((trace, parent), (CLIENT_TRACE, attempt.span_id.as_str()));
    // What only the worker may say never leaves the process.
    assert_eq!(sent.header("x-lumen-job-queued-us"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_export_samples_new_traces_and_follows_the_clients_choice() {
    let receiver = OtlpReceiver::grpc();
    let mock = MockUpstream::start();
    // No new trace is recorded (sample: 0), but one a client samples is; content is captured.
    let lumen = node(
        &mock,
        &format!(
            "tracing: {{ otlp: \"{}\", protocol: grpc, sample: 0, capture_content: true, \
             export_every: 200ms }}",
            receiver.url()
        ),
    );
    post(&lumen, &chat("fast", "not sampled"), &[]).await;
    let sampled = client_parent(CLIENT_SPAN, true);
    post(
        &lumen,
        &chat("fast", "tell me about whales"),
        &[("traceparent", sampled.as_str())],
    )
    .await;
    receiver.wait_for(Duration::from_secs(20), request_and_attempt);
    // Give a stray unsampled span time to arrive, were there one.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.trace_id == CLIENT_TRACE),
        "{spans:#?}"
    );
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.service, "lumen");
    let input = server.attr("gen_ai.input.messages").as_str().unwrap();
    assert!(input.contains("tell me about whales"), "{input}");
    let output = server.attr("gen_ai.output.messages").as_str().unwrap();
    assert!(output.contains("mock reply from up"), "{output}");

    // Embeddings: the input is recorded, the vectors are not.
    let embed_parent = client_parent("00f067aa0ba902b6", true);
    send(
        &lumen,
        "/v1/embeddings",
        &serde_json::json!({"model": "fast", "input": ["vectors please"]}),
        &[("traceparent", embed_parent.as_str())],
    )
    .await;
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.parent_span_id == "00f067aa0ba902b6")
    });
    let embedded = one(&spans, "the embeddings request", |s| {
        s.parent_span_id == "00f067aa0ba902b6"
    });
    let input = embedded.attr("gen_ai.input.messages").as_str().unwrap();
    assert!(input.contains("vectors please"), "{input}");
    assert!(embedded.attr("gen_ai.output.messages").is_null());

    // A stream the provider cuts after it began: a 200 to the client, an error on the trace.
    let cut_parent = client_parent("00f067aa0ba902b7", true);
    let body = serde_json::json!({"model": "cut", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    send(
        &lumen,
        "/v1/chat/completions",
        &body,
        &[("traceparent", cut_parent.as_str())],
    )
    .await;
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.parent_span_id == "00f067aa0ba902b7")
            && s.iter().filter(|s| s.kind == 3).count() >= 2
    });
    let server = one(&spans, "the cut stream", |s| {
        s.parent_span_id == "00f067aa0ba902b7"
    });
    assert_eq!(server.attr("lumen.stream"), true);
    // The answer as far as it got.
    let output = server.attr("gen_ai.output.messages").as_str().unwrap();
    assert!(output.contains("tok0"), "{output}");
    assert_eq!(server.attr("error.type"), "_OTHER");
    assert_eq!(server.status, 2);
    let attempt = one(&spans, "the cut stream's attempt", |s| {
        s.parent_span_id == server.span_id
    });
    assert_eq!(attempt.attr("error.type"), "_OTHER");
    assert_eq!(attempt.status, 2);

    // A hedge that wins: the slow first attempt it beat is given up, and says so.
    let hedge_parent = client_parent("00f067aa0ba902b8", true);
    post(
        &lumen,
        &chat("hedged", "hi"),
        &[("traceparent", hedge_parent.as_str())],
    )
    .await;
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .find(|s| s.parent_span_id == "00f067aa0ba902b8")
            .is_some_and(|h| s.iter().filter(|c| c.parent_span_id == h.span_id).count() >= 2)
    });
    let hedged = one(&spans, "the hedged request", |s| {
        s.parent_span_id == "00f067aa0ba902b8"
    });
    let lost = one(&spans, "the attempt that lost", |s| {
        s.parent_span_id == hedged.span_id && s.attr("gen_ai.request.model") == "slow-2000"
    });
    assert_eq!(lost.attr("error.type"), "cancelled");
    let won = one(&spans, "the hedge that won", |s| {
        s.parent_span_id == hedged.span_id && s.attr("gen_ai.request.model") == "up"
    });
    assert!(won.attr("error.type").is_null());
    assert_eq!(hedged.attr("gen_ai.response.model"), "up");

    // The unsampled request still handed the provider a trace context, marked not sampled.
    let unsampled = mock
        .requests()
        .into_iter()
        .find(|r| r.json()["messages"][0]["content"] == "not sampled")
        .unwrap();
    let (trace, _, flags) = parent_of(unsampled.header("traceparent").unwrap());
    assert_ne!(trace, CLIENT_TRACE);
    assert_eq!(flags, "00");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_traceparent_starts_a_new_trace_linked_to_the_clients() {
    let receiver = OtlpReceiver::http();
    let mock = MockUpstream::start();
    let lumen = node(
        &mock,
        &format!(
            "tracing: {{ otlp: \"{}\", trust_traceparent: false, export_every: 200ms }}",
            receiver.url()
        ),
    );
    // The client says "do not sample"; the gateway records every request all the same
    // (sample: 1), in a trace of its own.
    let unsampled = client_parent(CLIENT_SPAN, false);
    post(
        &lumen,
        &chat("fast", "hi"),
        &[("traceparent", unsampled.as_str())],
    )
    .await;
    let spans = receiver.wait_for(Duration::from_secs(20), request_and_attempt);
    let server = one(&spans, "the request", |s| s.kind == 2);
    assert_ne!(server.trace_id, CLIENT_TRACE);
    assert_eq!(server.parent_span_id, "");
    assert_eq!(
        server.links,
        vec![(CLIENT_TRACE.to_string(), CLIENT_SPAN.to_string())]
    );
    // The provider is sent the gateway's trace, not the client's.
    let sent = mock.requests().pop().unwrap();
    let (trace, _, flags) = parent_of(sent.header("traceparent").unwrap());
    assert_eq!((trace, flags), (server.trace_id.as_str(), "01"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_fails_no_request_and_drops_are_counted() {
    let stuck = OtlpReceiver::stuck();
    let mock = MockUpstream::start();
    let lumen = node(
        &mock,
        &format!(
            "tracing: {{ otlp: \"{}\", timeout: 30s, export_every: 100ms }}",
            stuck.url()
        ),
    );
    // Two spans a request; the export queue holds 4096 and the exporter is stuck on its
    // first batch: past about 2,300 requests, spans are dropped. No request waits for them.
    let total = 3000;
    let (took, failed) = burst(&lumen, total).await;
    assert_eq!(failed, 0);
    // The same burst through a node without traces, for the figures.
    let plain = node(&mock, "");
    let (plain_took, _) = burst(&plain, total).await;
    let dropped = spans_counted(&lumen, "dropped").await;
    println!(
        "FIGURES stuck collector: {total} requests in {:.2} s, 0 failed, {dropped} spans \
         dropped; without traces {:.2} s (ratio {:.2})",
        took.as_secs_f64(),
        plain_took.as_secs_f64(),
        took.as_secs_f64() / plain_took.as_secs_f64()
    );
    assert!(dropped > 0.0, "no dropped span counted");
}

/// `total` chat requests, 16 at a time: how long they took, and how many failed.
async fn burst(lumen: &Lumen, total: usize) -> (Duration, usize) {
    let started = Instant::now();
    let body = chat("fast", "hi").to_string();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let body = body.clone();
        let addr = lumen.addr;
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            for _ in (worker..total).step_by(16) {
                let json = [("content-type", "application/json")];
                let r = request(addr, "POST", "/v1/chat/completions", &json, body.as_bytes()).await;
                if !r.is_ok_and(|r| r.status == 200) {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap();
    }
    (started.elapsed(), failed)
}

/// An https:// collector with a private CA (`tls_ca_file`), and a hosted collector's key in
/// `headers` from the environment: spans arrive over TLS (OTLP/HTTP and gRPC) with the key;
/// the key is in no log line. A collector whose certificate is not trusted gets nothing, and
/// the failed exports are counted; requests are served all the same.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_collector_with_a_private_ca_gets_spans_with_the_configured_headers() {
    let dir = lumen_test_support::harness::tempdir::Dir::new("otlp-tls");
    lumen_test_support::harness::test_ca(dir.path());
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let (cert, key) = (read("server.pem"), read("server.key"));
    let ca = dir.path().join("ca.pem");
    let mock = MockUpstream::start();
    for protocol in ["http", "grpc"] {
        let receiver = OtlpReceiver::tls(protocol == "grpc", &cert, &key);
        assert!(receiver.url().starts_with("https://"));
        let lumen = node_with_env(
            &mock,
            &format!(
                "tracing: {{ otlp: \"{}\", protocol: {protocol}, tls_ca_file: \"{}\", \
                 headers: {{ X-Collector-Key: \"${{OTLP_KEY}}\" }}, export_every: 200ms }}",
                receiver.url(),
                ca.display()
            ),
            &[("OTLP_KEY", "otlp-s3cret-key")],
        );
        post(&lumen, &chat("fast", "over tls"), &[]).await;
        receiver.wait_for(Duration::from_secs(20), request_and_attempt);
        let keys = receiver.headers("x-collector-key");
        assert!(
            !keys.is_empty() && keys.iter().all(|k| k == "otlp-s3cret-key"),
            "{protocol}: {keys:?}"
        );
        assert!(!lumen.log().contains("otlp-s3cret-key"), "{}", lumen.log());
    }

    // The system's roots do not hold the test CA: the handshake fails, nothing arrives, the
    // failures are counted, and requests are served.
    let receiver = OtlpReceiver::tls(false, &cert, &key);
    let lumen = node(
        &mock,
        &format!(
            "tracing: {{ otlp: \"{}\", export_every: 200ms, timeout: 1s }}",
            receiver.url()
        ),
    );
    post(&lumen, &chat("fast", "untrusted"), &[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans_counted(&lumen, "failed").await == 0.0 {
        assert!(Instant::now() < deadline, "no failed export counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.spans().is_empty());
}

/// `lumen_otel_spans_total{result}` on `lumen` now.
async fn spans_counted(lumen: &Lumen, result: &str) -> f64 {
    let metrics = request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    let line = format!("lumen_otel_spans_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
