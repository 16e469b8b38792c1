//! Reload cost: how long validating a large config takes (10,000 keys, 500 routes), and what
//! a reload does to the requests around it: p99 of a steady load with no reload against the
//! same load while the real `lumen` process reloads every 500 ms.
//!
//! Run: `cargo bench --bench reload` (`LUMEN_BENCH_SECS` sets seconds per measurement).

use std::time::{Duration, Instant};

use lumen_test_support::client::Client;
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::json;

fn big_config(mock: &MockUpstream, keys: usize, routes: usize) -> String {
    let mut text = String::from("keys:\n");
    for i in 0..keys {
        // Distinct digests; any 64 hex digits are a valid stored key.
        text.push_str(&format!(
            "  - {{ id: k{i}, sha256: \"{:064x}\", limits: {{ requests_per_minute: 600 }} }}\n",
            i + 1
        ));
    }
    text.push_str("  - { id: bench, key: \"sk-bench\" }\n");
    text.push_str(&format!(
        "providers:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n",
        mock.base_url()
    ));
    for i in 0..routes {
        text.push_str(&format!(
            "  - {{ model: m{i}, targets: [ {{ provider: mock, model: up }} ], limits: {{ requests_per_second: 1000000 }} }}\n"
        ));
    }
    text
}

fn p99(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 * 0.99) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

async fn steady_load(addr: std::net::SocketAddr, secs: f64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.expect("connect");
                let body = json!({"model": "m7", "messages": [{"role": "user", "content": "hi"}]});
                let mut out = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c
                        .post_json(
                            "/v1/chat/completions",
                            &[("authorization", "Bearer sk-bench")],
                            &body,
                        )
                        .await
                        .expect("request");
                    assert_eq!(r.status, 200, "{}", r.text());
                    out.push(t.elapsed().as_micros() as u64);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

fn main() {
    let secs: f64 = std::env::var("LUMEN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mock = MockUpstream::start_on(0, false, 1);
    let text = big_config(&mock, 10_000, 500);

    // Validation alone, in process: what every reload pays before the swap.
    let rounds = 5;
    let started = Instant::now();
    for _ in 0..rounds {
        lumen::config::parse(&text, "bench.yaml", |_| None).expect("valid config");
    }
    let each = started.elapsed() / rounds;
    println!(
        "Lumen reload benchmark\n\nvalidate + build a snapshot of 10,000 keys and 500 routes: {:.1} ms ({} KiB of YAML)",
        each.as_secs_f64() * 1000.0,
        text.len() / 1024
    );

    let lumen = Lumen::start(&format!(
        "server: {{ threads: 2, watch_config: false }}\n{text}"
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let quiet = runtime.block_on(steady_load(lumen.addr, secs));
    let pid = lumen.pid() as i32;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: kill(2) on our child's pid.
                unsafe { libc::kill(pid, libc::SIGHUP) };
                n += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            n
        })
    };
    let busy = runtime.block_on(steady_load(lumen.addr, secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.join().unwrap_or(0);
    println!(
        "requests at c=4 without reloads: {} done, p99 {} us\nrequests at c=4 with a reload every 500 ms ({reloads} reloads): {} done, p99 {} us",
        quiet.len(),
        p99(quiet.clone()),
        busy.len(),
        p99(busy.clone()),
    );
}
