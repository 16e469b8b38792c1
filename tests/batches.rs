//! The Batch API (`/v1/files`, `/v1/batches`) on the real `lumen` and the mock provider: a
//! batch run to its end with its output and error files, files private to their key, bad
//! files refused naming their line, a batch cancelled mid-way, and (with a real `redis-server`)
//! a fleet of two nodes and a `lumen worker` killed mid-batch. The official SDK drives it in
//! `tests/python/test_batches.py`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen_test_support::batch::{
    call, chat_line, create, file_lines, multipart, upload, wait_final,
};
use lumen_test_support::client::request;
use lumen_test_support::harness::{RedisServer, Worker};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

fn config(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice" }}
  - {{ id: bob, key: "sk-bob" }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: refused, targets: [ {{ provider: mock, model: status-400 }} ], retry: {{ attempts: 1 }} }}
  - {{ model: "*embed*", targets: [ {{ provider: mock }} ] }}
{extra}
"#,
        base = mock.base_url()
    )
}

/// Waits until at least `n` of the batch's lines completed.
async fn wait_completed(addr: SocketAddr, id: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call(
            addr,
            "GET",
            &format!("/v1/batches/{id}"),
            "sk-alice",
            b"",
            true,
        )
        .await;
        let v = r.json();
        if v["request_counts"]["completed"].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_runs_every_line_once_and_writes_its_output_and_error_files() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(
        &mock,
        "jobs: { workers: 4 }\nbatches: { concurrency: 4 }",
    ));
    let mut lines: Vec<String> = (0..60)
        .map(|i| chat_line(&format!("req-{i}"), "fast", json!({})))
        .collect();
    lines.push(chat_line("refused-1", "refused", json!({})));
    lines.push(chat_line("unknown-1", "no-such-model", json!({})));
    let up = upload(lumen.addr, "sk-alice", &lines).await;
    assert_eq!(up.status, 200, "{}", up.text());
    let file = up.json();
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["filename"], "batch.jsonl");
    let file_id = file["id"].as_str().unwrap();

    // Another key sees nothing of it.
    assert_eq!(
        call(
            lumen.addr,
            "GET",
            &format!("/v1/files/{file_id}"),
            "sk-bob",
            b"",
            true
        )
        .await
        .status,
        404
    );
    let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let r = call(
        lumen.addr,
        "POST",
        "/v1/batches",
        "sk-bob",
        body.to_string().as_bytes(),
        true,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    let batch = create(lumen.addr, "sk-alice", file_id).await;
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["request_counts"]["total"], 62);
    assert_eq!(batch["metadata"]["run"], "test");
    let id = batch["id"].as_str().unwrap();
    let done = wait_final(lumen.addr, "sk-alice", id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 62, "completed": 60, "failed": 2})
    );
    for field in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[field].as_u64().is_some(), "{field}: {done}");
    }

    let out = file_lines(
        lumen.addr,
        "sk-alice",
        done["output_file_id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(out.len(), 60);
    let line = &out["req-7"];
    assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
    assert_eq!(line["response"]["status_code"], 200);
    assert_eq!(line["response"]["body"]["object"], "chat.completion");
    assert_eq!(
        line["response"]["body"]["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 "
    );
    assert!(line["error"].is_null());
    let errors = file_lines(
        lumen.addr,
        "sk-alice",
        done["error_file_id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(errors.len(), 2);
    assert_eq!(
        errors["refused-1"]["response"]["status_code"], 400,
        "{:?}",
        errors["refused-1"]
    );
    assert_eq!(
        errors["unknown-1"]["response"]["status_code"], 404,
        "{:?}",
        errors["unknown-1"]
    );
    assert_eq!(
        errors["unknown-1"]["response"]["body"]["error"]["code"],
        "model_not_found"
    );

    let metrics = request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    for line in [
        "lumen_batch_requests_total{outcome=\"completed\"} 60",
        "lumen_batch_requests_total{outcome=\"failed\"} 2",
        "lumen_batches_total{status=\"completed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing");
    }
    // Each line reached the provider once (the refused one too; the unknown model never).
    let mut calls: HashMap<String, usize> = HashMap::new();
    for r in mock.requests() {
        let content = r.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *calls.entry(content).or_default() += 1;
    }
    assert_eq!(calls.len(), 61, "{calls:?}");
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");

    // Lists: the batch, and the three files (input, output, errors), newest first, paged.
    let list = call(
        lumen.addr,
        "GET",
        "/v1/batches?limit=10",
        "sk-alice",
        b"",
        true,
    )
    .await
    .json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id);
    assert_eq!(list["has_more"], false);
    assert_eq!(
        call(lumen.addr, "GET", "/v1/batches", "sk-bob", b"", true)
            .await
            .json()["data"],
        json!([])
    );
    let files = call(lumen.addr, "GET", "/v1/files", "sk-alice", b"", true)
        .await
        .json();
    assert_eq!(files["data"].as_array().unwrap().len(), 3, "{files}");
    let outputs = call(
        lumen.addr,
        "GET",
        "/v1/files?purpose=batch_output",
        "sk-alice",
        b"",
        true,
    )
    .await
    .json();
    assert_eq!(outputs["data"].as_array().unwrap().len(), 2, "{outputs}");
    let page = call(
        lumen.addr,
        "GET",
        "/v1/files?limit=1",
        "sk-alice",
        b"",
        true,
    )
    .await
    .json();
    assert_eq!(page["has_more"], true, "{page}");
    let after = page["last_id"].as_str().unwrap();
    let next = call(
        lumen.addr,
        "GET",
        &format!("/v1/files?limit=1&after={after}"),
        "sk-alice",
        b"",
        true,
    )
    .await
    .json();
    assert_ne!(next["data"][0]["id"], page["data"][0]["id"]);

    // A final batch cannot be cancelled; a file can be deleted, by its owner only.
    let r = call(
        lumen.addr,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        "sk-alice",
        b"",
        true,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        call(
            lumen.addr,
            "DELETE",
            &format!("/v1/files/{file_id}"),
            "sk-bob",
            b"",
            true
        )
        .await
        .status,
        404
    );
    let r = call(
        lumen.addr,
        "DELETE",
        &format!("/v1/files/{file_id}"),
        "sk-alice",
        b"",
        true,
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": file_id, "object": "file", "deleted": true})
    );
    assert_eq!(
        call(
            lumen.addr,
            "GET",
            &format!("/v1/files/{file_id}/content"),
            "sk-alice",
            b"",
            true
        )
        .await
        .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_uploads_and_batches_are_refused_saying_why() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "batches: { max_file_bytes: 4KiB }"));
    let good = chat_line("a", "fast", json!({}));
    // A bad line is named.
    let r = upload(
        lumen.addr,
        "sk-alice",
        &[good.clone(), "{\"custom_id\": \"b\"}".into()],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2: method must be"),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "file");
    let r = upload(lumen.addr, "sk-alice", &[good.clone(), "not json".into()]).await;
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2: not valid JSON"),
        "{}",
        r.text()
    );
    // Too big: 413 before anything is kept.
    let big: Vec<String> = (0..100)
        .map(|i| chat_line(&format!("r{i}"), "fast", json!({})))
        .collect();
    let r = upload(lumen.addr, "sk-alice", &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "file_too_large");
    // Not multipart, wrong purpose, no file.
    let r = call(lumen.addr, "POST", "/v1/files", "sk-alice", b"{}", true).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = call(
        lumen.addr,
        "POST",
        "/v1/files",
        "sk-alice",
        &multipart("fine-tune", good.as_bytes()),
        false,
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "purpose", "{}", r.text());
    let cut = &multipart("batch", good.as_bytes())[..60];
    let r = call(lumen.addr, "POST", "/v1/files", "sk-alice", cut, false).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // No key: 401, as everywhere.
    let r = request(lumen.addr, "GET", "/v1/files", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 401);

    let file_id = upload(lumen.addr, "sk-alice", &[good]).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad_batches = [
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/rerank", "completion_window": "24h"}),
            400,
            "endpoint",
        ),
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            400,
            "completion_window",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            404,
            "id",
        ),
        (json!({"endpoint": "/v1/chat/completions"}), 400, ""),
    ];
    for (body, status, param) in bad_batches {
        let r = call(
            lumen.addr,
            "POST",
            "/v1/batches",
            "sk-alice",
            body.to_string().as_bytes(),
            true,
        )
        .await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        if !param.is_empty() {
            assert_eq!(r.json()["error"]["param"], param, "{}", r.text());
        }
    }
    // A line asking for another endpoint than the batch's fails the batch's validation.
    let body =
        json!({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"});
    let r = call(
        lumen.addr,
        "POST",
        "/v1/batches",
        "sk-alice",
        body.to_string().as_bytes(),
        true,
    )
    .await;
    let v = r.json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["errors"]["data"][0]["line"], 1, "{v}");
    assert_eq!(v["errors"]["data"][0]["code"], "mismatched_endpoint");
    // Unknown ids, and ids that could name a path, are 404s.
    for path in [
        "/v1/batches/batch_nope",
        "/v1/files/..%2f..%2fetc",
        "/v1/files/file-aaaaaaaaaaaaaaaaaaaaaaaa/content",
    ] {
        assert_eq!(
            call(lumen.addr, "GET", path, "sk-alice", b"", true)
                .await
                .status,
            404,
            "{path}"
        );
    }
    assert_eq!(
        call(lumen.addr, "PUT", "/v1/batches", "sk-alice", b"", true)
            .await
            .status,
        405
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_cancelled_mid_way_keeps_what_finished_and_runs_nothing_more() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(
        &mock,
        "jobs: { workers: 2 }\nbatches: { concurrency: 2 }",
    ));
    let lines: Vec<String> = (0..40)
        .map(|i| {
            chat_line(
                &format!("slow-{i}"),
                "fast",
                json!({"mock_chunks": 2, "mock_delay_ms": 50}),
            )
        })
        .collect();
    let file_id = upload(lumen.addr, "sk-alice", &lines).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let id = create(lumen.addr, "sk-alice", &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Some lines finish, then the batch is cancelled.
    wait_completed(lumen.addr, &id, 4).await;
    // Its input cannot be deleted while it runs (a driver taking over reads it again).
    let r = call(
        lumen.addr,
        "DELETE",
        &format!("/v1/files/{file_id}"),
        "sk-alice",
        b"",
        true,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    let r = call(
        lumen.addr,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        "sk-alice",
        b"",
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        ["cancelling", "cancelled"].contains(&r.json()["status"].as_str().unwrap()),
        "{}",
        r.text()
    );
    let done = wait_final(lumen.addr, "sk-alice", &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(
        done["cancelled_at"].as_u64().is_some() && done["cancelling_at"].as_u64().is_some(),
        "{done}"
    );
    let completed = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((4..40).contains(&completed), "{done}");
    let out = file_lines(
        lumen.addr,
        "sk-alice",
        done["output_file_id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(out.len() as u64, completed);
    // Nothing more reaches the provider once it is cancelled.
    let calls = mock.requests().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mock.requests().len(), calls);
    assert!(calls < 40, "{calls} calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_finishes_a_batch_whose_worker_was_killed_recording_each_line_once() {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let shared = format!(
        "redis: {{ url: \"{}\" }}\nbatches: {{ concurrency: 6 }}",
        redis.url()
    );
    // The API nodes run no workers: every line runs on a `lumen worker`.
    let a = Lumen::start(&config(&mock, &format!("{shared}\njobs: {{ workers: 0 }}")));
    let b = Lumen::start(&config(&mock, &format!("{shared}\njobs: {{ workers: 0 }}")));
    let worker_yaml = config(
        &mock,
        &format!("{shared}\njobs: {{ workers: 4, visibility_timeout: 500ms }}"),
    );
    let mut first = Worker::start(&worker_yaml);
    let lines: Vec<String> = (0..60)
        .map(|i| {
            chat_line(
                &format!("fleet-{i}"),
                "fast",
                json!({"mock_chunks": 3, "mock_delay_ms": 30}),
            )
        })
        .collect();
    let file_id = upload(a.addr, "sk-alice", &lines).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The file is readable on the other node; the batch is made there.
    assert_eq!(
        call(
            b.addr,
            "GET",
            &format!("/v1/files/{file_id}"),
            "sk-alice",
            b"",
            true
        )
        .await
        .status,
        200
    );
    let id = create(b.addr, "sk-alice", &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Kill the worker once lines are running and some have finished.
    wait_completed(a.addr, &id, 6).await;
    first.kill();
    let _second = Worker::start(&worker_yaml);
    let done = wait_final(a.addr, "sk-alice", &id, Duration::from_secs(90)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 60, "completed": 60, "failed": 0})
    );
    let out = file_lines(b.addr, "sk-alice", done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 60, "each line once in the output");
    assert!(done["error_file_id"].is_null(), "{done}");
    // Lines cut short by the kill ran again (at most the worker's 4); none ran more than twice.
    let mut calls: HashMap<String, usize> = HashMap::new();
    for r in mock.requests() {
        let content = r.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *calls.entry(content).or_default() += 1;
    }
    assert_eq!(calls.len(), 60);
    let again = calls.values().filter(|n| **n > 1).count();
    eprintln!("lines run again after the kill: {again}");
    assert!(again <= 4 && calls.values().all(|n| *n <= 2), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_lines_leave_a_local_targets_share_to_interactive_requests() {
    let (local, cloud) = (MockUpstream::start(), MockUpstream::start());
    // `local` takes 2 at once (as a sidecar with 2 slots): batch lines may hold 1 of them;
    // the others go on to `cloud`.
    let yaml = format!(
        r#"
keys:
  - {{ id: alice, key: "sk-alice" }}
providers:
  local: {{ base_url: "{}", max_in_flight: 2, health: {{ enabled: false }} }}
  cloud: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: local, model: slow-150 }}, {{ provider: cloud, model: slow-150 }} ] }}
jobs: {{ workers: 4 }}
batches: {{ concurrency: 4, capacity_share: 0.5 }}
"#,
        local.base_url(),
        cloud.base_url()
    );
    let lumen = Lumen::start(&yaml);
    let lines: Vec<String> = (0..16)
        .map(|i| chat_line(&format!("s{i}"), "fast", json!({})))
        .collect();
    let file_id = upload(lumen.addr, "sk-alice", &lines).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let id = create(lumen.addr, "sk-alice", &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut most_on_local = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let providers = request(lumen.admin, "GET", "/admin/providers", &[], b"")
            .await
            .unwrap()
            .json();
        let on_local = providers["providers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "local"))
            .and_then(|p| p["in_flight"].as_u64())
            .unwrap_or(0);
        most_on_local = most_on_local.max(on_local);
        let v = call(
            lumen.addr,
            "GET",
            &format!("/v1/batches/{id}"),
            "sk-alice",
            b"",
            true,
        )
        .await
        .json();
        if v["status"] == "completed" {
            assert_eq!(v["request_counts"]["completed"], 16, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        most_on_local <= 1,
        "batch lines held {most_on_local} of local's 2 slots"
    );
    assert!(!local.requests().is_empty() && !cloud.requests().is_empty());
    assert_eq!(local.requests().len() + cloud.requests().len(), 16);
}
