//! `server.runtime` through the real binary (an unknown model is refused in `cli.rs`): every
//! thread model serves; in `per_core` the per-thread proxies are one node to the limits and the
//! connection cap; the deferrable background services run on threads niced below the proxy's.

use std::time::Duration;

use lumen_test_support::client::Client;
use lumen_test_support::openai::{chat, chat_with};
use lumen_test_support::{Lumen, MockUpstream};

fn config(mock: &MockUpstream, server: &str) -> String {
    format!(
        r#"
server: {{ {server} }}
keys:
  - {{ id: bursty, key: "sk-bursty", limits: {{ requests_per_minute: 6, burst: 6 }} }}
  - {{ id: free, key: "sk-free" }}
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        base = mock.base_url()
    )
}

/// (thread name, niceness) of every thread of `pid`, from `/proc`.
fn threads(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // After the command name: state is field 3, nice field 19 (proc(5)).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i32 = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((name.trim().to_string(), nice));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_thread_model_serves() {
    let mock = MockUpstream::start();
    for model in ["per_core", "work_stealing", "no_steal"] {
        let lumen = Lumen::start(&config(&mock, &format!("threads: 2, runtime: {model}")));
        let resp = lumen.post_chat_as("sk-free", &chat("fast", "hi")).await;
        assert_eq!(resp.status, 200, "runtime {model}: {}", resp.text());
        let proxies = threads(lumen.pid())
            .into_iter()
            .filter(|(name, _)| name.starts_with("lumen proxy"))
            .count();
        // per_core: one proxy service (one thread) per core; the others: one service with
        // two threads (Pingora names them after the service, too).
        assert!(proxies >= 2, "runtime {model}: {proxies} proxy threads");
    }
}

/// Requests spread over both per-core proxies draw on one bucket per key: a key allowed six
/// requests gets six, however the kernel hands the connections to the threads.
#[tokio::test(flavor = "multi_thread")]
async fn per_core_proxies_share_one_rate_limit() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "threads: 2, runtime: per_core"));
    let names: Vec<String> = threads(lumen.pid()).into_iter().map(|t| t.0).collect();
    assert!(
        names.iter().any(|n| n == "lumen proxy") && names.iter().any(|n| n == "lumen proxy 2"),
        "one proxy service per core: {names:?}"
    );
    // Twenty connections at once, so both threads accept some.
    let sends = (0..20).map(|_| {
        let lumen = &lumen;
        async move { lumen.chat_status("sk-bursty", &chat("fast", "hi")).await }
    });
    let statuses = futures::future::join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (6, 14), "{statuses:?}");
}

/// `lumen_connections_open{thread}` as scraped: (thread 1, thread 2).
async fn open_per_thread(lumen: &Lumen) -> (i64, i64) {
    let scrape = lumen_test_support::client::request(lumen.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    let of = |thread: &str| {
        let series = format!("lumen_connections_open{{thread=\"{thread}\"}} ");
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in the scrape"))
    };
    (of("1"), of("2"))
}

/// Connections opened together are spread over the per-core threads, however the kernel
/// wakes them: whichever thread wins the listening socket hands connections to the other
/// once it serves two more. (Without it, a burst could land every connection on one thread:
/// 2 runs of 6 with 32 connections did.) Three bursts, each checked while held.
#[tokio::test(flavor = "multi_thread")]
async fn per_core_threads_share_a_burst_of_connections_evenly() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "threads: 2, runtime: per_core"));
    for burst in 0..3 {
        let opens = (0..32).map(|_| async {
            let mut c = Client::connect(lumen.addr).await.unwrap();
            let answer = c.request("GET", "/healthz", &[], b"").await.unwrap();
            assert_eq!(answer.status, 200);
            c
        });
        let held = futures::future::join_all(opens).await;
        // The harness's own probe may still be counted a moment after it closed.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let (a, b) = loop {
            let (a, b) = open_per_thread(&lumen).await;
            if a + b == 32 || std::time::Instant::now() > deadline {
                break (a, b);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(a + b, 32, "burst {burst}: {a} + {b} connections counted");
        assert!(
            (a - b).abs() <= 2,
            "burst {burst}: {a} on one thread, {b} on the other"
        );
        // A connection handed over is served there: a second request on each.
        for mut c in held {
            let answer = c.request("GET", "/healthz", &[], b"").await.unwrap();
            assert_eq!(answer.status, 200);
        }
        // Closed connections are no longer counted.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while open_per_thread(&lumen).await != (0, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "closed connections still counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // And they were served: a chat request through a handed-over connection's thread works.
    let resp = lumen.post_chat_as("sk-free", &chat("fast", "hi")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// `server.max_connections` counts the connections of every per-core proxy together.
#[tokio::test(flavor = "multi_thread")]
async fn per_core_proxies_share_one_connection_cap() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(
        &mock,
        "threads: 2, runtime: per_core, max_connections: 4",
    ));
    // Four open connections take every slot, wherever they were accepted. The harness's
    // readiness probe closed its connection, but on a loaded machine the gateway may not
    // have seen it go yet: a connection refused while that slot is still held is tried again.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tries = 0;
        let c = loop {
            let mut c = Client::connect(lumen.addr).await.unwrap();
            match c.request("GET", "/healthz", &[], b"").await {
                Ok(answer) if answer.status == 200 => break c,
                answer => {
                    tries += 1;
                    assert!(tries < 30, "no slot for a connection: {:?}", answer.err());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        held.push(c);
    }
    // Each further connection is closed at once, on whichever thread takes it.
    for _ in 0..6 {
        let mut extra = Client::connect(lumen.addr).await.unwrap();
        let _ = extra
            .send_raw(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        let closed = extra.closed_within(Duration::from_secs(3)).await;
        assert!(closed.is_ok(), "a fifth connection was kept open");
    }
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let status = lumen_test_support::client::request(lumen.addr, "GET", "/healthz", &[], b"")
            .await
            .map_or(0, |r| r.status);
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "freed slots were not reused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The deferrable background services (usage flusher, traffic sampler, job workers) run
/// niced, so under load they leave the cores to the proxy; the proxy's threads and the timely
/// services (the health prober, the reloader that pings systemd's watchdog) keep the
/// process's priority.
#[tokio::test(flavor = "multi_thread")]
async fn deferrable_background_services_run_below_the_proxy() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "threads: 2"));
    let all = threads(lumen.pid());
    let nice_of = |prefix: &str| -> Vec<i32> {
        all.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, nice)| *nice)
            .collect()
    };
    let proxy = nice_of("lumen proxy");
    let base = proxy[0];
    assert!(proxy.iter().all(|n| *n == base), "{all:?}");
    let niced = (base + 10).min(19);
    for (service, nice) in [
        ("lumen usage", niced),
        ("lumen traffic", niced),
        ("lumen job", niced),
        ("lumen health", base),
        ("lumen config", base),
    ] {
        let seen = nice_of(service);
        assert!(!seen.is_empty(), "no thread named {service}…: {all:?}");
        assert!(
            seen.iter().all(|n| *n == nice),
            "{service} at {seen:?}, expected {nice}: {all:?}"
        );
    }
}

/// No thread of the gateway wakes on a clock while it has nothing to do: Pingora's millisecond
/// timer thread, which its read and write timeouts start by default, never runs (plain answers
/// and streams, each read and write under a timeout, included).
#[tokio::test(flavor = "multi_thread")]
async fn no_millisecond_timer_thread_runs() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, "threads: 2"));
    for stream in [false, true] {
        let body = chat_with("fast", "hi", serde_json::json!({ "stream": stream }));
        let resp = lumen.post_chat_as("sk-free", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let names: Vec<String> = threads(lumen.pid()).into_iter().map(|(n, _)| n).collect();
    assert!(
        !names.iter().any(|n| n == "Timer thread"),
        "threads: {names:?}"
    );
    assert!(names.iter().any(|n| n.starts_with("lumen proxy")));
}
