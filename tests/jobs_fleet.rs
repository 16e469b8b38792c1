//! Async jobs across a fleet: real `redis-server`, two `lumen serve` nodes and a `lumen worker`
//! sharing one queue; a worker killed mid-job; Redis going away and coming back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Response};
use lumen_test_support::harness::{RedisServer, Worker};
use lumen_test_support::keyed::{as_key, event_deltas, wait_job_until};
use lumen_test_support::openai::chat_job;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn config(mock: &MockUpstream, redis: &RedisServer, jobs: &str) -> String {
    format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice" }}
  - {{ id: bob, key: "sk-bob" }}
redis: {{ url: "{redis}" }}
prices:
  - {{ provider: mock, model: up, input: 1, output: 2 }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
jobs: {{ {jobs} }}
"#,
        base = mock.base_url(),
        redis = redis.url()
    )
}

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Response {
    as_key(addr, method, path, key, body.as_ref()).await
}

async fn wait_status(
    addr: std::net::SocketAddr,
    id: &str,
    want: &[&str],
    limit: Duration,
) -> Value {
    wait_job_until(addr, "sk-alice", id, want, limit).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_and_a_worker_run_200_jobs_exactly_once() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let a = Lumen::start(&config(&mock, &redis, "workers: 2"));
    let b = Lumen::start(&config(&mock, &redis, "workers: 2"));
    let _w = Worker::start(&config(&mock, &redis, "workers: 3"));
    let mut ids = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        // A key may have 100 jobs waiting: past that, the client is told to come back when
        // some have started (as a well-behaved client does, on a machine busy enough that
        // the five workers fall behind).
        let deadline = Instant::now() + Duration::from_secs(60);
        let r = loop {
            let r = call(
                node,
                "POST",
                "/v1/jobs",
                "sk-alice",
                Some(chat_job("fast", &format!("job-{i}"), json!({}))),
            )
            .await;
            if r.status != 429 || Instant::now() > deadline {
                break r;
            }
            assert_eq!(r.json()["error"]["code"], "job_queue_full", "{}", r.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(r.status, 202, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    // Every job completes, readable from the node it was not submitted to.
    for (i, id) in ids.iter().enumerate() {
        let other = if i % 2 == 0 { b.addr } else { a.addr };
        let done = wait_status(other, id, &["completed", "failed"], Duration::from_secs(60)).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(
            done["result"]["choices"][0]["message"]["content"],
            "tok0 tok1 tok2 "
        );
        // Its cost, recorded in Redis by whichever process ran it: 7 × 1 + 3 × 2 µ$.
        assert_eq!(
            done["metrics"]["cost_usd"].as_f64(),
            Some(13.0 / 1e6),
            "{done}"
        );
    }
    // Exactly once: one upstream call per job.
    let mut calls: HashMap<String, usize> = HashMap::new();
    for r in mock.requests() {
        let content = r.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *calls.entry(content).or_default() += 1;
    }
    assert_eq!(calls.len(), 200, "every job reached the provider");
    assert!(
        calls.values().all(|n| *n == 1),
        "a job ran twice: {calls:?}"
    );
    // Bob cannot see Alice's job on either node.
    assert_eq!(
        call(
            a.addr,
            "GET",
            &format!("/v1/jobs/{}", ids[0]),
            "sk-bob",
            None
        )
        .await
        .status,
        404
    );

    // /events on node B for a job submitted on node A, tokens as they come.
    let slow = call(
        a.addr,
        "POST",
        "/v1/jobs",
        "sk-alice",
        Some(chat_job(
            "fast",
            "slow",
            json!({"mock_chunks": 5, "mock_delay_ms": 100}),
        )),
    )
    .await
    .json();
    let id = slow["id"].as_str().unwrap();
    let events = call(
        b.addr,
        "GET",
        &format!("/v1/jobs/{id}/events"),
        "sk-alice",
        None,
    )
    .await;
    let text = events.text();
    let deltas = event_deltas(&text);
    assert_eq!(deltas, "tok0 tok1 tok2 tok3 tok4 ", "{text}");
    assert!(text.contains("event: result\n"), "{text}");
    let health = request(b.addr, "GET", "/health", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(health["jobs"]["backend"], "redis");
    assert_eq!(health["jobs"]["redis_connected"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_worker_is_killed_is_finished_by_another() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    // The API node runs no workers; the job can only run on the workers.
    let api = Lumen::start(&config(&mock, &redis, "workers: 0"));
    let worker_yaml = config(&mock, &redis, "workers: 1, visibility_timeout: 500ms");
    let mut first = Worker::start(&worker_yaml);
    let r = call(
        api.addr,
        "POST",
        "/v1/jobs",
        "sk-alice",
        Some(chat_job(
            "fast",
            "survivor",
            json!({"mock_chunks": 10, "mock_delay_ms": 100}),
        )),
    )
    .await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_status(api.addr, &id, &["processing"], Duration::from_secs(10)).await;
    // Let it generate a little, then kill its worker mid-job.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill();
    let _second = Worker::start(&worker_yaml);
    let done = wait_status(
        api.addr,
        &id,
        &["completed", "failed"],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 "
    );
    let runs = mock
        .requests()
        .iter()
        .filter(|r| r.json()["messages"][0]["content"] == "survivor")
        .count();
    assert_eq!(runs, 2, "run once by the killed worker, once by the other");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_a_submit_fails_fast_and_service_resumes_when_it_returns() {
    let mock = MockUpstream::start();
    let mut redis = RedisServer::start();
    let node = Lumen::start(&config(&mock, &redis, "workers: 1"));
    let ok = call(
        node.addr,
        "POST",
        "/v1/jobs",
        "sk-alice",
        Some(chat_job("fast", "before", json!({}))),
    )
    .await;
    assert_eq!(ok.status, 202);
    redis.kill();
    let started = Instant::now();
    let down = call(
        node.addr,
        "POST",
        "/v1/jobs",
        "sk-alice",
        Some(chat_job("fast", "during", json!({}))),
    )
    .await;
    assert_eq!(down.status, 503, "{}", down.text());
    assert_eq!(down.json()["error"]["type"], "api_error");
    // Fails fast: well under a client's timeout, never a hang.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let read = call(node.addr, "GET", "/v1/jobs/whatever", "sk-alice", None).await;
    assert_eq!(read.status, 503);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        let r = call(
            node.addr,
            "POST",
            "/v1/jobs",
            "sk-alice",
            Some(chat_job("fast", "after", json!({}))),
        )
        .await;
        if r.status == 202 {
            break r.json()["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let done = wait_status(
        node.addr,
        &id,
        &["completed", "failed"],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
}

#[test]
fn a_worker_needs_redis() {
    let dir = lumen_test_support::harness::tempdir::Dir::new("lumen-worker-check");
    let path = dir.path().join("lumen.yaml");
    std::fs::write(
        &path,
        "providers:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["worker", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("redis"), "{stderr}");
}
