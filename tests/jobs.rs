//! Async jobs, in process: the native API, the two compatible shapes (shape B driven by
//! `curl`), ownership, idempotency, cancellation and a full queue, against the real `lumen`
//! binary and the mock provider.

use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Response};
use lumen_test_support::keyed::{as_key, wait_job};
use lumen_test_support::openai::chat_job;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn config(mock: &MockUpstream, jobs: &str) -> String {
    format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice" }}
  - {{ id: bob, key: "sk-bob" }}
  - {{ id: limited, key: "sk-limited", limits: {{ requests_per_minute: 2 }} }}
prices:
  - {{ provider: mock, model: up, input: 1, output: 2 }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: broken, targets: [ {{ provider: mock, model: status-500 }} ], retry: {{ attempts: 1 }} }}
  - {{ model: embed, targets: [ {{ provider: mock, model: up-embed }} ] }}
jobs: {{ default_model: fast, {jobs} }}
"#,
        base = mock.base_url()
    )
}

async fn call(lumen: &Lumen, method: &str, path: &str, key: &str, body: Option<Value>) -> Response {
    as_key(lumen.addr, method, path, key, body.as_ref()).await
}

async fn submit(lumen: &Lumen, key: &str, job: Value) -> Response {
    call(lumen, "POST", "/v1/jobs", key, Some(job)).await
}

async fn wait_final(lumen: &Lumen, key: &str, id: &str) -> Value {
    wait_job(lumen.addr, key, id, Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_job_runs_through_the_pipeline_and_reports_its_metrics() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 2"));
    let submitted = submit(&lumen, "sk-alice", chat_job("fast", "hi", json!({}))).await;
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let s = submitted.json();
    assert_eq!(s["status"], "queued");
    assert!(s["created_at"].as_u64().unwrap() > 1_700_000_000);
    let id = s["id"].as_str().unwrap();
    let done = wait_final(&lumen, "sk-alice", id).await;
    assert_eq!(done["status"], "completed", "{done}");
    // The same answer the synchronous endpoint gives: a non-stream chat completion.
    let result = &done["result"];
    assert_eq!(result["object"], "chat.completion");
    assert_eq!(
        result["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 "
    );
    assert_eq!(result["usage"]["completion_tokens"], 3);
    let m = &done["metrics"];
    for field in [
        "queue_wait_time",
        "processing_time",
        "total_time",
        "tokens_per_second",
    ] {
        assert!(m[field].as_f64().is_some(), "{field}: {m}");
    }
    assert_eq!(m["completion_tokens"], 3);
    assert_eq!(m["prompt_tokens"], 7);
    // Its cost at the route's price: 7 prompt tokens at 1 µ$, 3 completion tokens at 2 µ$.
    assert_eq!(m["cost_usd"].as_f64(), Some(13.0 / 1e6), "{m}");
    // Upstream it was a stream (for /events), with the model rewritten by the route, and the
    // worker's token never left the gateway.
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["stream"], true);
    assert_eq!(sent[0].json()["model"], "up");
    assert!(sent[0].header("x-lumen-job-token").is_none());
    assert!(sent[0].header("authorization").is_none());

    // Embeddings run too; a provider failure is a failed job with the provider's error.
    let embed =
        json!({"endpoint": "/v1/embeddings", "body": {"model": "embed", "input": ["a", "b"]}});
    let id = submit(&lumen, "sk-alice", embed).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = wait_final(&lumen, "sk-alice", &id).await;
    assert_eq!(
        done["result"]["data"].as_array().unwrap().len(),
        2,
        "{done}"
    );
    let broken = submit(&lumen, "sk-alice", json!({"endpoint": "/v1/chat/completions", "body": {"model": "broken", "messages": [{"role": "user", "content": "x"}]}}))
    .await;
    let done = wait_final(&lumen, "sk-alice", broken.json()["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert!(done["error"]["message"].is_string(), "{done}");

    // Health and metrics see the jobs.
    let health = request(lumen.addr, "GET", "/health", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(health["jobs"]["backend"], "memory");
    assert_eq!(health["jobs"]["workers"], 2);
    let metrics = lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_jobs_total{outcome=\"failed\"} 1",
    )
    .await;
    assert!(
        metrics.contains("lumen_jobs_total{outcome=\"completed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lumen_job_queue_wait_seconds_count 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_jobs_are_refused_at_submit_with_openai_errors() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    let cases = [
        (
            json!({"endpoint": "/v1/rerank", "body": {}}),
            400,
            "invalid_job",
        ),
        (
            json!({"endpoint": "/v1/chat/completions", "body": {"model": "nope", "messages": []}}),
            404,
            "model_not_found",
        ),
        (
            json!({"endpoint": "/v1/chat/completions", "body": {"messages": []}}),
            400,
            "missing_model",
        ),
        (
            chat_job("fast", "hi", json!({}))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("job_id".into(), json!("bad id!"));
                    Value::Object(o)
                })
                .unwrap(),
            400,
            "invalid_job",
        ),
    ];
    for (body, status, code) in cases {
        let r = submit(&lumen, "sk-alice", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{body}");
    }
    let r = request(lumen.addr, "POST", "/v1/jobs", &[], b"{}")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = call(&lumen, "GET", "/v1/jobs/job_unknown", "sk-alice", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "job_not_found");
    let r = call(&lumen, "PUT", "/v1/jobs/x", "sk-alice", None).await;
    assert_eq!(r.status, 405);
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_private_to_their_key_and_a_job_id_is_idempotent() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    let mut job = chat_job("fast", "hi", json!({}));
    job["job_id"] = json!("order-42");
    let first = submit(&lumen, "sk-alice", job.clone()).await;
    assert_eq!(first.status, 202);
    assert_eq!(first.json()["id"], "order-42");
    let again = submit(&lumen, "sk-alice", job.clone()).await;
    assert_eq!(again.status, 200, "the existing job, not a new one");
    assert_eq!(again.json()["id"], "order-42");
    wait_final(&lumen, "sk-alice", "order-42").await;
    assert_eq!(mock.requests().len(), 1, "ran once");
    for path in [
        "/v1/jobs/order-42",
        "/v1/jobs/order-42/events",
        "/status/order-42",
        "/result/order-42",
    ] {
        let r = call(&lumen, "GET", path, "sk-bob", None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(!r.text().contains("tok0"));
    }
    assert_eq!(
        call(&lumen, "DELETE", "/v1/jobs/order-42", "sk-bob", None)
            .await
            .status,
        404
    );
    // Bob may use the same id for a job of his own.
    let bobs = submit(&lumen, "sk-bob", job).await;
    assert_eq!(bobs.status, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_stream_tokens_live_and_a_late_client_catches_up() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    let job = chat_job(
        "fast",
        "hi",
        json!({"mock_chunks": 6, "mock_delay_ms": 100}),
    );
    let id = submit(&lumen, "sk-alice", job).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let live = call(
        &lumen,
        "GET",
        &format!("/v1/jobs/{id}/events"),
        "sk-alice",
        None,
    )
    .await;
    assert_eq!(live.status, 200);
    assert_eq!(live.header("content-type"), Some("text/event-stream"));
    let text = live.text();
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter_map(|e| {
            let (name, data) = e.split_once('\n')?;
            Some((
                name.strip_prefix("event: ")?,
                serde_json::from_str(data.strip_prefix("data: ")?).ok()?,
            ))
        })
        .collect();
    let deltas: String = events
        .iter()
        .filter(|(n, _)| *n == "delta")
        .map(|(_, v)| {
            v["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{text}"))
                .to_string()
        })
        .collect();
    assert_eq!(deltas, "tok0 tok1 tok2 tok3 tok4 tok5 ", "{text}");
    assert!(
        events.iter().filter(|(n, _)| *n == "delta").count() >= 3,
        "live, not at the end: {text}"
    );
    let (last, result) = events.last().unwrap();
    assert_eq!(*last, "result");
    assert_eq!(result["status"], "completed");
    // Chunks came spread over the generation (about 100 ms apart), not all at the end.
    let spread = live.chunks.last().unwrap().0 - live.chunks[1].0;
    assert!(
        spread >= Duration::from_millis(300),
        "{:?}",
        live.chunks.iter().map(|c| c.0).collect::<Vec<_>>()
    );

    // Connecting after the end: the state, the whole text, the result.
    let late = call(
        &lumen,
        "GET",
        &format!("/v1/jobs/{id}/events"),
        "sk-alice",
        None,
    )
    .await;
    let text = late.text();
    assert!(text.starts_with("event: status\ndata: {\"id\":"), "{text}");
    assert!(
        text.contains("\"content\":\"tok0 tok1 tok2 tok3 tok4 tok5 \""),
        "{text}"
    );
    assert!(text.contains("event: result\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_removes_a_queued_one() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    let slow = chat_job(
        "fast",
        "hi",
        json!({"mock_chunks": 50, "mock_delay_ms": 100}),
    );
    let running = submit(&lumen, "sk-alice", slow.clone()).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let queued = submit(&lumen, "sk-alice", slow).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Wait until the first is running and its request has reached the provider ("processing"
    // comes first: the worker's request is still on its way then).
    let deadline = Instant::now() + Duration::from_secs(5);
    while call(
        &lumen,
        "GET",
        &format!("/v1/jobs/{running}"),
        "sk-alice",
        None,
    )
    .await
    .json()["status"]
        != "processing"
        || mock.requests().is_empty()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = call(
        &lumen,
        "DELETE",
        &format!("/v1/jobs/{queued}"),
        "sk-alice",
        None,
    )
    .await;
    assert_eq!(c.status, 200);
    assert_eq!(c.json()["status"], "cancelled");
    let c = call(
        &lumen,
        "DELETE",
        &format!("/v1/jobs/{running}"),
        "sk-alice",
        None,
    )
    .await;
    assert_eq!(c.status, 200);
    let done = wait_final(&lumen, "sk-alice", &running).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error"]["code"], "cancelled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.requests().len(),
        1,
        "the queued job never reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_and_submits_count_against_the_request_limit() {
    let mock = MockUpstream::start();
    // No workers here: jobs wait until some node's workers take them.
    let lumen = Lumen::start(&config(&mock, "workers: 0, queue_size: 2"));
    for _ in 0..2 {
        assert_eq!(
            submit(&lumen, "sk-alice", chat_job("fast", "hi", json!({})))
                .await
                .status,
            202
        );
    }
    let full = submit(&lumen, "sk-bob", chat_job("fast", "hi", json!({}))).await;
    assert_eq!(full.status, 429, "{}", full.text());
    assert!(full.header("retry-after").is_some());
    assert_eq!(full.json()["error"]["code"], "job_queue_full");

    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            submit(&lumen, "sk-limited", chat_job("fast", "hi", json!({})))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [202, 202, 429]);
    // Reading is not submitting: polls are never refused by the request limit.
    let r = call(&lumen, "GET", "/v1/jobs/nope", "sk-limited", None).await;
    assert_eq!(r.status, 404);
}

fn curl(args: &[&str]) -> (u16, Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed by scripts/setup.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn shape_b_answers_with_the_content_when_the_job_ends_or_202_to_poll() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 2, wait_timeout: 1s"));
    let url = |p: &str| lumen.url(p);
    let generate = json!({"job_id": "b-1", "meta": {"temperature": 0.1, "tokens_limit": 64, "stop_words": ["\n\n"], "model": "fast"}, "content": "Say hi"});
    let (status, body) = curl(&[
        "-X",
        "POST",
        &url("/generate"),
        "-H",
        "X-API-Key: sk-alice",
        "-H",
        "content-type: application/json",
        "-d",
        &generate.to_string(),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"content": "tok0 tok1 tok2 "}));
    let sent = mock.requests()[0].json();
    assert_eq!(sent["messages"][0]["content"], "Say hi");
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["temperature"], 0.1);
    assert_eq!(sent["stop"], json!(["\n\n"]));

    // chat_completion, with the default meta: temperature 0.2, tokens_limit 8096.
    let chat = json!({"job_id": "b-2", "meta": {}, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
    let (status, body) = curl(&[
        "-X",
        "POST",
        &url("/chat_completion"),
        "-H",
        "X-API-Key: sk-alice",
        "-d",
        &chat.to_string(),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "tok0 tok1 tok2 ");
    let sent = mock.requests()[1].json();
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["max_tokens"], 8096);
    assert_eq!(sent["model"], "up");

    // No meta at all, or settings sent as null (Python's None), take the same defaults; one
    // stop word may be a plain string.
    for (i, chat) in [
        json!({"job_id": "b-2a", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"job_id": "b-2b", "meta": null, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"job_id": "b-2c", "meta": {"temperature": null, "tokens_limit": null, "stop_words": "END"}, "messages": [{"role": "user", "content": "hi"}]}),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = curl(&[
            "-X",
            "POST",
            &url("/chat_completion"),
            "-H",
            "X-API-Key: sk-alice",
            "-d",
            &chat.to_string(),
        ]);
        assert_eq!(status, 200, "{chat}: {body}");
        let sent = mock.requests()[2 + i].json();
        assert_eq!(sent["temperature"], 0.2, "{chat}");
        assert_eq!(sent["max_tokens"], 8096, "{chat}");
        if i == 2 {
            assert_eq!(sent["stop"], "END");
        }
    }

    // Longer than wait_timeout: 202 with the id, then poll the native endpoint.
    let slow =
        json!({"job_id": "b-3", "meta": {"model": "fast"}, "content": "long", "mock_chunks": 1});
    let _ = slow;
    let slow = json!({"job_id": "b-3", "meta": {"model": "fast"}, "messages": [{"role": "user", "content": "x"}]});
    mock.clear();
    let lumen_slow = Lumen::start(
        &config(&mock, "workers: 1, wait_timeout: 200ms")
            .replace("model: up }", "model: slow-700 }"),
    );
    let (status, body) = curl(&[
        "-X",
        "POST",
        &lumen_slow.url("/chat_completion"),
        "-H",
        "X-API-Key: sk-alice",
        "-d",
        &slow.to_string(),
    ]);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["job_id"], "b-3");
    assert_eq!(body["poll"], "/v1/jobs/b-3");
    let done = wait_final(&lumen_slow, "sk-alice", "b-3").await;
    assert_eq!(done["status"], "completed");

    // A body that is neither shape names both.
    let (status, body) = curl(&[
        "-X",
        "POST",
        &url("/generate"),
        "-H",
        "X-API-Key: sk-alice",
        "-d",
        "{\"text\": \"hi\"}",
    ]);
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("prompt") && message.contains("meta"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compatible_shapes_move_with_the_prefix_and_can_be_switched_off() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(
        &mock,
        "workers: 1, compat_prefix: /compat, shape_b: false",
    ));
    let a = call(
        &lumen,
        "POST",
        "/compat/generate",
        "sk-alice",
        Some(json!({"prompt": "hi"})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text());
    assert_eq!(
        call(
            &lumen,
            "POST",
            "/generate",
            "sk-alice",
            Some(json!({"prompt": "hi"}))
        )
        .await
        .status,
        404
    );
    let b = call(
        &lumen,
        "POST",
        "/compat/generate",
        "sk-alice",
        Some(json!({"job_id": "x", "meta": {}, "content": "hi"})),
    )
    .await;
    assert_eq!(b.status, 400, "shape B is off: {}", b.text());
    assert_eq!(
        call(
            &lumen,
            "POST",
            "/compat/chat_completion",
            "sk-alice",
            Some(json!({}))
        )
        .await
        .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_jobs_do_not_survive_a_restart_as_documented() {
    let mock = MockUpstream::start();
    let yaml = config(&mock, "workers: 1");
    let lumen = Lumen::start(&yaml);
    let done = submit(&lumen, "sk-alice", chat_job("fast", "hi", json!({})))
        .await
        .json();
    let id = done["id"].as_str().unwrap().to_string();
    wait_final(&lumen, "sk-alice", &id).await;
    drop(lumen);
    // Same config, new process: the job is gone (404), and new jobs work.
    let again = Lumen::start(&yaml);
    let r = call(&again, "GET", &format!("/v1/jobs/{id}"), "sk-alice", None).await;
    assert_eq!(r.status, 404);
    let fresh = submit(&again, "sk-alice", chat_job("fast", "hi", json!({}))).await;
    assert_eq!(fresh.status, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_job_of_a_key_removed_by_a_reload_never_runs() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "workers: 1"));
    // One worker, busy for about 3 s with bob's streamed job, while alice's job waits.
    let blocker = submit(
        &lumen,
        "sk-bob",
        chat_job(
            "fast",
            "hi",
            json!({"stream": true, "mock_chunks": 30, "mock_delay_ms": 100}),
        ),
    )
    .await;
    assert_eq!(blocker.status, 202, "{}", blocker.text());
    let queued = submit(
        &lumen,
        "sk-alice",
        chat_job("fast", "queued-after-removal", json!({})),
    )
    .await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    // Alice's key is removed before her queued job runs.
    let text = std::fs::read_to_string(&lumen.config_path).unwrap();
    let without = text.replace("  - { id: alice, key: \"sk-alice\" }\n", "");
    assert_ne!(text, without);
    std::fs::write(&lumen.config_path, without).unwrap();
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let done = wait_final(&lumen, "sk-bob", blocker.json()["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran = mock
        .requests()
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body).contains("queued-after-removal"));
    assert!(!ran, "a removed key's queued job reached the provider");
    assert!(
        lumen.log().contains("reload"),
        "the reload happened: {}",
        lumen.log()
    );
}
