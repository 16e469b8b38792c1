//! The gateway and its llama.cpp sidecar, both real: `spawn:` starts `lumen-llama` on a
//! generated tiny GGUF, the gateway routes to it, restarts it when it dies, and stops it on
//! shutdown.

use std::process::Command;
use std::time::{Duration, Instant};

use lumen_test_support::client::Client;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::{bin_path, free_port, Lumen};
use serde_json::json;

fn tiny_model(dir: &Dir) -> String {
    let path = dir.path().join("tiny.gguf");
    let status = Command::new(bin_path("lumen-llama"))
        .args(["gen-test-model", "--out"])
        .arg(&path)
        .status()
        .expect("run lumen-llama gen-test-model");
    assert!(status.success());
    path.display().to_string()
}

/// Pids of `lumen-llama` processes serving on `port`.
fn sidecar_pids(port: u16) -> Vec<u32> {
    let needle = format!("--port\0{port}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            text.contains("lumen-llama") && text.contains(&needle)
        })
        .collect()
}

fn start(models: &Dir, port: u16) -> Lumen {
    let model = tiny_model(models);
    Lumen::start(&format!(
        r#"
auth: off
providers:
  local:
    base_url: "http://127.0.0.1:{port}/v1"
    timeout: 60s
    spawn: {{ model: "{model}", alias: tiny, options: "ctx=512,slots=2" }}
routes:
  - {{ model: fast, targets: [ {{ provider: local, model: tiny }} ] }}
"#
    ))
}

/// Chat through the gateway until the sidecar answers (it loads after the gateway is up).
async fn wait_for_chat(lumen: &Lumen, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let body = json!({"model": "fast", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    loop {
        if let Ok(mut c) = Client::connect(lumen.addr).await {
            if let Ok(resp) = c.post_json("/v1/chat/completions", &[], &body).await {
                if resp.status == 200 {
                    return resp.json();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "sidecar never answered through the gateway:\n{}",
            lumen.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_spawns_the_sidecar_and_routes_to_it() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    let lumen = start(&models, port);
    let answer = wait_for_chat(&lumen, Duration::from_secs(60)).await;
    assert_eq!(answer["usage"]["completion_tokens"], 8);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(sidecar_pids(port).len(), 1);

    // Streaming through the gateway, from real llama.cpp.
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let body = json!({"model": "fast", "stream": true, "max_tokens": 6, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    let resp = c
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let data = resp.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let text = resp.chat_stream_text();
    assert_eq!(
        text,
        answer["choices"][0]["message"]["content"].as_str().unwrap()[..text.len()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_sidecar_is_restarted() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    let lumen = start(&models, port);
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    let before = sidecar_pids(port);
    assert_eq!(before.len(), 1);
    // SAFETY: kill(2) on a pid read from /proc; no memory is touched.
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    let after = sidecar_pids(port);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "a new sidecar process answers");
    assert!(
        lumen.log().contains("sidecar exited; restarting"),
        "{}",
        lumen.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_stops_with_the_gateway() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    let lumen = start(&models, port);
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    assert_eq!(sidecar_pids(port).len(), 1);
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sidecar_pids(port).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sidecar still running after the gateway stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
