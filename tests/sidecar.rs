//! The gateway and its llama.cpp sidecar, both real: `spawn:` starts `lumen-llama` on a
//! generated tiny GGUF, the gateway routes to it, restarts it when it dies, and stops it on
//! shutdown.

use std::time::{Duration, Instant};

use lumen_test_support::client::Client;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::openai::chat_with;
use lumen_test_support::sidecar::gen_test_model;
use lumen_test_support::{free_port, Lumen};
use serde_json::json;

fn tiny_model(dir: &Dir) -> String {
    let path = dir.path().join("tiny.gguf");
    gen_test_model("chat", &path);
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
    start_with(models, port, "", "", "")
}

/// The gateway with a spawned sidecar serving the tiny model as `tiny` behind the route
/// `fast`: `circuit` and `retry` (YAML flow-map items) for the provider and the route, and
/// `args` (YAML list items) for `lumen-llama serve`.
fn start_with(models: &Dir, port: u16, circuit: &str, retry: &str, args: &str) -> Lumen {
    let model = tiny_model(models);
    Lumen::start(&format!(
        r#"
auth: off
providers:
  local:
    base_url: "http://127.0.0.1:{port}/v1"
    timeout: 60s
    circuit: {{ {circuit} }}
    spawn: {{ model: "{model}", alias: tiny, options: "ctx=512,slots=2", args: [{args}] }}
routes:
  - {{ model: fast, targets: [ {{ provider: local, model: tiny }} ], retry: {{ {retry} }} }}
"#
    ))
}

/// [`start`] with a route that one failure closes for a minute (`failures: 1`, a 60 s cooldown,
/// one attempt), and `args` for `lumen-llama serve`.
fn start_fragile(models: &Dir, port: u16, args: &str) -> Lumen {
    start_with(
        models,
        port,
        "failures: 1, cooldown: 60s",
        "attempts: 1",
        args,
    )
}

/// Polls `/admin/providers` (up to 60 s) until the `local` provider's entry satisfies `ready`.
async fn wait_for_local(lumen: &Lumen, ready: impl Fn(&serde_json::Value) -> bool) {
    wait_for_provider(lumen, "local", ready).await
}

/// Polls `/admin/providers` (up to 60 s) until provider `name`'s entry satisfies `ready`.
async fn wait_for_provider(lumen: &Lumen, name: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let admin =
            lumen_test_support::client::request(lumen.admin, "GET", "/admin/providers", &[], b"")
                .await
                .unwrap()
                .json();
        let local = admin["providers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name);
        if local.is_some_and(&ready) {
            return;
        }
        assert!(Instant::now() < deadline, "{admin}\n{}", lumen.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Chat through the gateway until the sidecar answers (it loads after the gateway is up).
async fn wait_for_chat(lumen: &Lumen, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let body = chat_with("fast", "hello", json!({"max_tokens": 8, "temperature": 0}));
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
    assert_eq!(resp.status, 200, "{}", resp.text());
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
    let metrics = lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_sidecar_up{provider=\"local\"} 1",
    )
    .await;
    assert!(
        metrics.contains("lumen_sidecar_restarts_total{provider=\"local\"} 0"),
        "{metrics}"
    );
    // SAFETY: kill(2) on a pid read from /proc; no memory is touched.
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    let metrics = lumen_test_support::harness::scrape_until(
        lumen.admin,
        "lumen_sidecar_restarts_total{provider=\"local\"} 1",
    )
    .await;
    assert!(
        metrics.contains("lumen_sidecar_up{provider=\"local\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lumen_provider_slots{provider=\"local\"}"),
        "{metrics}"
    );
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
async fn a_restarted_sidecar_reopens_its_circuit_at_once() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    // A long cooldown: without the restart signal the route would stay down for a minute.
    let lumen = start_fragile(&models, port, "");
    // (With `failures: 1`, a chat sent before the sidecar listens would open the circuit for
    // the whole cooldown; it is held back as starting until then.)
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    let before = sidecar_pids(port);
    assert_eq!(before.len(), 1);
    // SAFETY: kill(2) on a pid read from /proc; no memory is touched.
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    // A request while it is down fails and opens the circuit.
    let body =
        json!({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let mut opened = false;
    for _ in 0..50 {
        let mut c = Client::connect(lumen.addr).await.unwrap();
        let resp = c
            .post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap();
        if resp.text().contains("circuit_open") {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(opened, "the circuit opened while the sidecar was down");
    // Back well within the cooldown, once the new sidecar answers its probe.
    let started = Instant::now();
    wait_for_chat(&lumen, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        lumen
            .log()
            .contains("provider recovered; circuit half-open"),
        "{}",
        lumen.log()
    );
}

/// A sidecar still loading its model is not routed to: requests meanwhile get a 503 that says
/// it is starting, with Retry-After, instead of failing on it, and open no circuit (here one
/// failure would close the route for a minute); once it has loaded, requests are answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_loading_sidecar_is_held_back_until_it_is_ready() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    let lumen = start_fragile(&models, port, r#""--load-delay-ms", "1500""#);
    let body =
        json!({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let started = Instant::now();
    let mut held = 0;
    loop {
        let mut c = Client::connect(lumen.addr).await.unwrap();
        let resp = c
            .post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap();
        if resp.status == 200 {
            break;
        }
        assert_eq!(resp.status, 503, "{}", resp.text());
        assert!(resp.text().contains("starting"), "{}", resp.text());
        assert!(resp.header("retry-after").is_some(), "{}", resp.text());
        assert_eq!(
            resp.json()["error"]["code"],
            "no_available_provider",
            "{}",
            resp.text()
        );
        // Held back, so not ready either (a balancer keeps traffic off the node meanwhile).
        let ready = lumen_test_support::client::request(lumen.addr, "GET", "/readyz", &[], b"")
            .await
            .unwrap();
        if ready.status == 200 {
            // Ready between the two calls: the next chat is answered.
            continue;
        }
        assert_eq!(ready.status, 503, "{}", ready.text());
        held += 1;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never answered (a circuit opened?):\n{}",
            lumen.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held >= 5, "held back only {held} times while it loaded");
    assert!(lumen.log().contains("sidecar ready"), "{}", lumen.log());
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

/// Local first: the sidecar while it has a free slot (its `/health` says how many it has),
/// the cloud when it is full or down.
#[tokio::test(flavor = "multi_thread")]
async fn local_first_spills_to_the_cloud_when_the_sidecar_is_full_or_down() {
    let models = Dir::new("lumen-models");
    let model = tiny_model(&models);
    let port = free_port();
    let cloud = lumen_test_support::MockUpstream::start();
    let lumen = Lumen::start(&format!(
        r#"
auth: off
providers:
  local:
    base_url: "http://127.0.0.1:{port}/v1"
    timeout: 60s
    health: {{ interval: 200ms, unhealthy_threshold: 1 }}
    spawn: {{ model: "{model}", alias: tiny, options: "ctx=2048,slots=1" }}
  cloud: {{ base_url: "{}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: local, model: tiny }}, {{ provider: cloud, model: cloud-model }} ]
"#,
        cloud.base_url()
    ));
    // Wait until the sidecar answers, its health has reported its one slot, and the
    // supervisor has let it take requests (a spawned sidecar is "starting" until then, and
    // the prober may call it healthy a moment before).
    wait_for_local(&lumen, |local| {
        local["probe"]["state"] == "healthy"
            && local["capacity"] == 1
            && local["models"][0]["available"] == "yes"
    })
    .await;
    let body = json!({"model": "fast", "stream": true, "max_tokens": 200, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    let alone = Client::connect(lumen.addr)
        .await
        .unwrap()
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(alone.header("x-lumen-provider"), Some("local"));

    // Four at once: one takes the slot, the others do not wait for it.
    let addr = lumen.addr;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                let resp = c
                    .post_json("/v1/chat/completions", &[], &body)
                    .await
                    .unwrap();
                assert_eq!(resp.status, 200);
                assert_eq!(resp.sse_data().last().map(String::as_str), Some("[DONE]"));
                resp.header("x-lumen-provider").unwrap_or("").to_string()
            })
        })
        .collect();
    let mut providers = Vec::new();
    for t in tasks {
        providers.push(t.await.unwrap());
    }
    assert!(providers.iter().any(|p| p == "local"), "{providers:?}");
    assert!(providers.iter().any(|p| p == "cloud"), "{providers:?}");

    // Down: the request falls back at once, and probes then keep it away from the sidecar.
    for pid in sidecar_pids(port) {
        // SAFETY: kill(2) on a pid read from /proc; no memory is touched.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let resp = Client::connect(lumen.addr)
        .await
        .unwrap()
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-lumen-provider"), Some("cloud"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_does_not_outlive_a_killed_gateway() {
    let models = Dir::new("lumen-models");
    let port = free_port();
    let mut lumen = start(&models, port);
    wait_for_chat(&lumen, Duration::from_secs(60)).await;
    assert_eq!(sidecar_pids(port).len(), 1);
    // No graceful shutdown: the kernel tells the sidecar its parent is gone.
    lumen.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sidecar_pids(port).is_empty() {
        assert!(
            Instant::now() < deadline,
            "an orphaned sidecar still holds port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prefix hashes the gateway has read from all its sidecars' health answers.
async fn reported_prefixes(lumen: &Lumen) -> Vec<String> {
    let health = lumen_test_support::client::request(lumen.addr, "GET", "/health", &[], b"")
        .await
        .unwrap()
        .json();
    health["sidecar"]
        .as_object()
        .into_iter()
        .flat_map(|s| s.values())
        .flat_map(|models| models.as_object().into_iter().flat_map(|m| m.values()))
        .filter_map(|m| m["prefixes"].as_array())
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect()
}

/// The cached share of each later turn of `conversations` chats of three turns sent in turn
/// through `model` (each turn resends the history): `(cached_tokens, prompt_tokens)` per turn
/// after the first. Each first turn waits until the gateway has read the sidecar's report of
/// it, so every later conversation is routed knowing what each sidecar holds.
async fn converse(
    lumen: &Lumen,
    model: &str,
    opening: &str,
    conversations: usize,
) -> Vec<(u64, u64)> {
    let system = "You are a careful assistant who answers questions about the sea. ".repeat(5);
    let mut histories: Vec<Vec<serde_json::Value>> = (0..conversations)
        .map(|i| {
            vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": format!("{opening} {i}")}),
            ]
        })
        .collect();
    let mut later = Vec::new();
    for turn in 0..3 {
        for h in histories.iter_mut() {
            let body = json!({"model": model, "messages": h, "temperature": 0, "max_tokens": 10});
            let reported = reported_prefixes(lumen).await;
            let mut c = Client::connect(lumen.addr).await.unwrap();
            let r = c
                .post_json("/v1/chat/completions", &[], &body)
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            let r = r.json();
            if turn == 0 {
                let deadline = Instant::now() + Duration::from_secs(20);
                while reported_prefixes(lumen).await == reported {
                    assert!(
                        Instant::now() < deadline,
                        "no sidecar reported the new conversation"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } else {
                let usage = &r["usage"];
                later.push((
                    usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap(),
                    usage["prompt_tokens"].as_u64().unwrap(),
                ));
            }
            h.push(r["choices"][0]["message"].clone());
            h.push(json!({"role": "user", "content": "Go on."}));
        }
    }
    later
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_affinity_sends_each_conversation_back_to_the_sidecar_that_holds_it() {
    let models = Dir::new("lumen-models");
    let model = tiny_model(&models);
    let (pa, pb) = (free_port(), free_port());
    let sidecar = |port: u16| {
        format!(
            r#"{{ base_url: "http://127.0.0.1:{port}/v1", timeout: 60s, health: {{ interval: 200ms }},
               spawn: {{ model: "{model}", alias: tiny, options: "ctx=1024,slots=2,threads=1" }} }}"#
        )
    };
    let lumen = Lumen::start(&format!(
        r#"
auth: off
providers:
  a: {}
  b: {}
routes:
  - {{ model: sticky, strategy: round_robin, prefix_affinity: true,
       targets: [ {{ provider: a, model: tiny }}, {{ provider: b, model: tiny }} ] }}
  - {{ model: rr, strategy: round_robin,
       targets: [ {{ provider: a, model: tiny }}, {{ provider: b, model: tiny }} ] }}
"#,
        sidecar(pa),
        sidecar(pb)
    ));
    for name in ["a", "b"] {
        wait_for_provider(&lumen, name, |p| {
            p["probe"]["state"] == "healthy" && p["models"][0]["available"] == "yes"
        })
        .await;
    }

    // Three conversations, round robin over two sidecars: each next turn would land on the
    // other sidecar, which holds only the shared system prompt. With affinity it goes back.
    // (And the shared system prompt alone draws nothing: were it to, the first sidecar to
    // report it would take all three, and its two slots would evict each other's history.)
    let sticky = converse(&lumen, "sticky", "Tell me about whales", 3).await;
    assert!(
        sticky.iter().all(|&(cached, prompt)| cached + 45 > prompt),
        "with affinity the history was processed again: {sticky:?}"
    );
    let plain = converse(&lumen, "rr", "Tell me about ships", 3).await;
    assert!(
        plain.iter().all(|&(cached, prompt)| cached + 45 <= prompt),
        "round robin without affinity reused the history: {plain:?}"
    );

    // What the gateway reads: each sidecar lists the conversations its slots hold.
    for port in [pa, pb] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let health = lumen_test_support::client::request(addr, "GET", "/health", &[], b"")
            .await
            .unwrap()
            .json();
        let prefixes = health["models"]["tiny"]["prefixes"].as_array().unwrap();
        assert!(!prefixes.is_empty(), "{health}");
        assert!(prefixes.iter().all(|h| h.as_str().unwrap().len() == 16));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_route_counts_and_reserves_the_prompt_with_the_models_own_tokenizer() {
    // The tiny model reads one token per character, so the estimate from the body's size (about
    // four bytes a token) is far below the real count: the reservation and the count endpoint
    // must use the sidecar's count, not the estimate.
    let models = Dir::new("lumen-models");
    let model = tiny_model(&models);
    let port = free_port();
    let lumen = Lumen::start(&format!(
        r#"
keys:
  - {{ id: roomy, key: "sk-roomy", limits: {{ tokens_per_minute: 10000 }} }}
  - {{ id: tight, key: "sk-tight", limits: {{ tokens_per_minute: 400 }} }}
providers:
  local:
    base_url: "http://127.0.0.1:{port}/v1"
    timeout: 60s
    spawn: {{ model: "{model}", alias: tiny, options: "ctx=1024,slots=2" }}
routes:
  - {{ model: fast, targets: [ {{ provider: local, model: tiny }} ] }}
"#
    ));
    wait_for_local(&lumen, |local| {
        local["probe"]["state"] == "healthy"
            && local["capacity"] == 2
            && local["models"][0]["available"] == "yes"
    })
    .await;
    let text = "Tell me about the tides and the moon. ".repeat(16);
    let body = json!({"model": "fast", "temperature": 0, "max_tokens": 8,
                      "messages": [{"role": "user", "content": text}]});
    let estimate = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4);

    let roomy = [("authorization", "Bearer sk-roomy")];
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let r = c
        .post_json("/v1/chat/completions", &roomy, &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lumen.log());
    let prompt = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt > estimate * 2,
        "{prompt} tokens, estimate {estimate}"
    );
    // Reserved: the real prompt plus max_tokens.
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .expect("token headers")
        .parse()
        .unwrap();
    assert_eq!(10000 - remaining, prompt + 8);

    // The counting endpoint answers the sidecar's count of the chat it would send.
    let count = json!({"model": "fast", "input": text});
    let r = c
        .post_json("/v1/responses/input_tokens", &roomy, &count)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["input_tokens"], prompt);

    // A budget the estimate fits in but the real prompt does not: refused before the sidecar.
    let tight = [("authorization", "Bearer sk-tight")];
    assert!(estimate + 8 < 400);
    let r = c
        .post_json("/v1/chat/completions", &tight, &body)
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
}
