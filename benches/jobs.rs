//! Async jobs: how long a job waits between submit and start when workers are idle (p50/p99,
//! in process and through Redis), and jobs/s through 3 workers against the mock, as a ratio
//! to the same requests sent synchronously with 3 connections in the same run.
//!
//! Then batches on a real sidecar (SmolLM2 when fetched, else the generated tiny model, 4
//! slots): an interactive client's p50 alone and while a 48-line batch runs, with batch lines
//! held to half the slots (`capacity_share: 0.5`, the default) and allowed all of them (1.0).
//!
//! Run: `cargo bench --bench jobs` (`LUMEN_BENCH_JOBS` sets jobs per measurement, default 300).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::RedisServer;
use lumen_test_support::openai::{chat, chat_job};
use lumen_test_support::sidecar::{real_model, tiny_chat_model, Sidecar};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

fn config(mock: &MockUpstream, redis: Option<&RedisServer>) -> String {
    format!(
        "server: {{ access_log: false }}\nkeys:\n  - {{ id: bench, key: \"sk-bench\" }}\n{}providers:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}\njobs: {{ workers: 3, queue_size: 100000, max_queued_per_key: 100000 }}\nusage: {{ enabled: false }}\n",
        redis.map_or(String::new(), |r| format!("redis: {{ url: \"{}\" }}\n", r.url())),
        mock.base_url()
    )
}

const AUTH: (&str, &str) = ("authorization", "Bearer sk-bench");

async fn submit(c: &mut Client) -> String {
    let r = c
        .post_json("/v1/jobs", &[AUTH], &chat_job("fast", "hi", json!({})))
        .await
        .expect("submit");
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap_or_default().to_string()
}

async fn finished(c: &mut Client, id: &str) -> Value {
    loop {
        let v = c
            .request("GET", &format!("/v1/jobs/{id}"), &[AUTH], b"")
            .await
            .expect("poll")
            .json();
        match v["status"].as_str() {
            Some("completed") => return v,
            Some("failed" | "cancelled") => panic!("{v}"),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Submit → start, one job at a time (workers idle), from each job's own `queue_wait_time`.
async fn start_latency(addr: SocketAddr, n: usize) -> (f64, f64) {
    let mut c = Client::connect(addr).await.expect("connect");
    let mut waits = Vec::with_capacity(n);
    for _ in 0..n {
        let id = submit(&mut c).await;
        let v = finished(&mut c, &id).await;
        waits.push(v["metrics"]["queue_wait_time"].as_f64().unwrap_or(0.0) * 1e6);
    }
    (pct(&mut waits, 0.5), pct(&mut waits, 0.99))
}

/// Jobs/s: `n` jobs submitted at once, until the last completed.
async fn job_throughput(addr: SocketAddr, n: usize) -> f64 {
    let mut c = Client::connect(addr).await.expect("connect");
    let started = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(submit(&mut c).await);
    }
    // The last submitted is about the last to finish; polling it alone keeps the poller from
    // competing with the workers for the CPU. Then every job is checked once.
    if let Some(last) = ids.last() {
        finished(&mut c, last).await;
    }
    for id in &ids {
        finished(&mut c, id).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The same requests, synchronously, over 3 connections (as many as workers).
async fn sync_throughput(addr: SocketAddr, n: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.expect("connect");
                let body = chat("fast", "hi");
                for _ in 0..n / 3 {
                    let r = c
                        .post_json("/v1/chat/completions", &[AUTH], &body)
                        .await
                        .expect("sync");
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (n / 3 * 3) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("LUMEN_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mock = MockUpstream::start_on(lumen_test_support::free_port(), false, 2);
    let redis = RedisServer::start();
    let memory = Lumen::start(&config(&mock, None));
    let shared = Lumen::start(&config(&mock, Some(&redis)));
    // Warm both (connections, scripts loaded).
    let _ = request(memory.addr, "GET", "/healthz", &[], b"").await;
    start_latency(memory.addr, 20).await;
    start_latency(shared.addr, 20).await;

    println!("async jobs, {n} jobs per measurement, 3 workers, mock upstream");
    for (name, lumen) in [("in process", &memory), ("redis", &shared)] {
        let (p50, p99) = start_latency(lumen.addr, n.min(200)).await;
        let jobs = job_throughput(lumen.addr, n).await;
        let sync = sync_throughput(lumen.addr, n).await;
        println!(
            "  {name:<10}  submit→start p50 {p50:>7.0} us  p99 {p99:>7.0} us   jobs/s {jobs:>7.0} vs sync {sync:>7.0} req/s ({:.2}x)",
            jobs / sync
        );
    }
    batch_beside_interactive().await;
}

/// Interactive p50 on a sidecar alone, then while a batch runs on it, for two capacity shares.
async fn batch_beside_interactive() {
    let model = real_model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cargo run --release -p lumen-llama -- fetch-model smollm2",
    )
    .unwrap_or_else(|| tiny_chat_model().to_path_buf());
    let arg = format!("m={}:ctx=2048,slots=4", model.display());
    // Started (and waited for) off the runtime: its health wait blocks.
    let sidecar = tokio::task::spawn_blocking(move || Sidecar::start(&["--model".into(), arg]))
        .await
        .expect("sidecar");
    let name = model
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    println!("\nbatch beside interactive requests, sidecar {name} (4 slots), batch of 48 lines, concurrency 8");
    for share in ["0.5", "1.0"] {
        let lumen = Lumen::start(&format!(
            "server: {{ access_log: false }}\nkeys:\n  - {{ id: bench, key: \"sk-bench\" }}\nproviders:\n  local: {{ base_url: \"http://127.0.0.1:{}/v1\", timeout: 300s, health: {{ path: /health, interval: 1s }} }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: local }} ] }}\njobs: {{ workers: 8 }}\nbatches: {{ concurrency: 8, capacity_share: {share} }}\nusage: {{ enabled: false }}\n",
            sidecar.port
        ));
        // The sidecar's slots are learnt from its health answer.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ask = || async {
            let mut c = Client::connect(lumen.addr).await.expect("connect");
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16, "temperature": 0});
            let t = Instant::now();
            let r = c
                .post_json("/v1/chat/completions", &[AUTH], &body)
                .await
                .expect("chat");
            assert_eq!(r.status, 200, "{}", r.text());
            t.elapsed().as_secs_f64() * 1e3
        };
        let mut alone = Vec::new();
        for _ in 0..10 {
            alone.push(ask().await);
        }
        let lines: String = (0..48)
            .map(|i| {
                json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": format!("Write a line about the number {i}.")}], "max_tokens": 48, "temperature": 0}})
                .to_string()
                    + "\n"
            })
            .collect();
        let boundary = "bench-boundary";
        let upload = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n{lines}\r\n--{boundary}--\r\n"
        );
        let ct = format!("multipart/form-data; boundary={boundary}");
        let file = request(
            lumen.addr,
            "POST",
            "/v1/files",
            &[AUTH, ("content-type", &ct)],
            upload.as_bytes(),
        )
        .await
        .expect("upload")
        .json();
        let create = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let batch = request(
            lumen.addr,
            "POST",
            "/v1/batches",
            &[AUTH, ("content-type", "application/json")],
            create.to_string().as_bytes(),
        )
        .await
        .expect("create")
        .json();
        let id = batch["id"].as_str().unwrap_or_default().to_string();
        let started = Instant::now();
        let mut during = Vec::new();
        let took = loop {
            let v = request(
                lumen.addr,
                "GET",
                &format!("/v1/batches/{id}"),
                &[AUTH],
                b"",
            )
            .await
            .expect("poll")
            .json();
            if v["status"] == "completed" || v["status"] == "failed" {
                break started.elapsed().as_secs_f64();
            }
            during.push(ask().await);
        };
        if during.is_empty() {
            during.push(f64::NAN);
        }
        println!(
            "  capacity_share {share}: interactive p50 {:>6.0} ms alone, {:>6.0} ms during the batch ({} requests); batch done in {took:.1} s",
            pct(&mut alone, 0.5),
            pct(&mut during, 0.5),
            during.len()
        );
    }
}
