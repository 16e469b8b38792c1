//! Load benchmark: direct-to-mock vs through nginx (the reference proxy) vs a bare Pingora proxy
//! (`lumen-bare-proxy`: a `ProxyHttp` that only picks the peer, same pingora version and
//! features, one thread per core, default settings) vs through Lumen, in the same run, on the
//! same machine, reported as ratios.
//!
//! Run: `cargo bench --bench load` (needs `nginx` on PATH for the reference column; without it
//! the nginx column is skipped). `LUMEN_BENCH_SECS` sets seconds per measurement (default 3);
//! `LUMEN_BENCH_ROUNDS=N` measures each scenario N times, the targets taking turns, and
//! reports medians (and ratios' ranges) across rounds.
//!
//! Measured: added latency p50/p99 at concurrency 1 for 1 KiB and 16 KiB chat bodies, requests/s
//! at concurrency 32 (plain, and streams of 20 chunks), added time to first chunk of a stream,
//! and resident memory of each proxy (idle before any load, peak after the scenarios).
//! `lumen` runs the default thread model (`server.runtime: per_core`); `lumen-steal` and
//! `lumen-nosteal` are the same gateway with `work_stealing` and `no_steal`. Lumen runs as configured for
//! production: API-key authentication, per-key rate and concurrency limits (set high enough
//! never to refuse), access log and metrics on; `lumen+redis` checks the rate limit in a real
//! `redis-server` (one round trip per request); `lumen-open` is the same gateway with auth (and
//! so limits) off, the baseline for what they cost.
//!
//! Syscalls per request (`strace -c -f`, when strace is installed) of every proxy, which,
//! unlike CPU time, the shared cores do not disturb.
//!
//! Cache: hits served from memory against the same request proxied, at c=1 and c=32.
//!
//! Fallback cost: a route whose primary refuses the connection and whose second target
//! answers, against `lumen-open` answering directly, at c=1: once with the circuit breaker
//! kept closed (every request pays the refused connect and the fallback), once with the
//! default circuit (it opens after five failures, so steady state skips the dead primary).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lumen_test_support::client::Client;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::harness::RedisServer;
use lumen_test_support::{bin_path, free_port, Lumen};
use serde_json::json;

/// Every request carries a key, so Lumen's numbers include authentication (direct and nginx
/// ignore the header).
const BENCH_KEY: &str = "lm-bench-key";
const BENCH_AUTH: &str = "Bearer lm-bench-key";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its workers too (a killed master
        // leaves them running, competing for the CPU with the next measurement).
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Latencies (µs) of every request and the throughput of one measurement.
struct Sample {
    latencies: Vec<u64>,
    rps: f64,
    /// Requests per CPU-second of the proxy's processes (none for `direct`).
    per_cpu_sec: Option<f64>,
}

impl Sample {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64
    }
}

/// One figure read off one round's results (each target's sample, in target order).
type RoundFigure<'a> = dyn Fn(&[(&str, Sample)]) -> Option<f64> + 'a;

/// One figure across rounds: its median, and its range.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Spread> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// `1.23x`, or with its range across rounds, `1.23x [1.10–1.31]`.
    fn show(&self, unit: &str, range: bool) -> String {
        let digits = if unit == "x" { 2 } else { 0 };
        let f = |x: f64| format!("{x:.digits$}");
        if range {
            format!("{}{unit} [{}–{}]", f(self.median), f(self.min), f(self.max))
        } else {
            format!("{}{unit}", f(self.median))
        }
    }
}

fn chat_body(bytes: usize, stream: bool) -> Vec<u8> {
    chat_body_chunks(bytes, stream, 5)
}

/// A chat request whose streamed answer has `chunks` content chunks.
fn chat_body_chunks(bytes: usize, stream: bool, chunks: u32) -> Vec<u8> {
    let filler = "x".repeat(bytes.saturating_sub(120));
    serde_json::to_vec(&json!({
        "model": "bench", "stream": stream, "mock_chunks": chunks, "temperature": 0,
        "messages": [{"role": "user", "content": filler}],
    }))
    .unwrap_or_default()
}

/// `conns` connections, each sending requests back to back for `secs`. With `first_chunk`,
/// the latency is time to the first body chunk (streams) instead of the whole response.
async fn load(
    addr: SocketAddr,
    conns: usize,
    secs: f64,
    body: Vec<u8>,
    first_chunk: bool,
) -> Sample {
    load_at(addr, "/v1/chat/completions", conns, secs, body, first_chunk).await
}

/// [`load`] on another endpoint than chat completions.
async fn load_at(
    addr: SocketAddr,
    path: &'static str,
    conns: usize,
    secs: f64,
    body: Vec<u8>,
    first_chunk: bool,
) -> Sample {
    let body = std::sync::Arc::new(body);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    // Warm up connections and pools first.
    let mut warm = Client::connect(addr).await.expect("connect");
    for _ in 0..50 {
        let _ = warm
            .request(
                "POST",
                path,
                &[
                    ("content-type", "application/json"),
                    ("authorization", BENCH_AUTH),
                ],
                &body,
            )
            .await;
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let Ok(mut c) = Client::connect(addr).await else {
                    return latencies;
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match c
                        .request(
                            "POST",
                            path,
                            &[
                                ("content-type", "application/json"),
                                ("authorization", BENCH_AUTH),
                            ],
                            &body,
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => {
                            let us = if first_chunk {
                                r.chunks.first().map_or(t.elapsed(), |(at, _)| *at)
                            } else {
                                t.elapsed()
                            };
                            latencies.push(us.as_micros() as u64);
                        }
                        _ => break,
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Sample {
        rps: latencies.len() as f64 / elapsed,
        latencies,
        per_cpu_sec: None,
    }
}

fn start_nginx(upstream: SocketAddr) -> Option<(Killed, SocketAddr, Dir)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = Dir::new("lumen-bench-nginx");
    let port = free_port();
    let conf = format!(
        r#"worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}; proxy_temp_path {dir};
  client_max_body_size 8m; client_body_buffer_size 1m;
  upstream mock {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"#,
        dir = dir.path().display()
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((Killed(child), addr, dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// `pid` and its children (nginx's workers); empty for pid 0.
fn family(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            let Ok(child) = name.to_string_lossy().parse::<u32>() else {
                continue;
            };
            if proc_stat(child).is_some_and(|(ppid, _)| ppid == pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// (parent pid, CPU seconds used: user + system) of one process, from `/proc`.
fn proc_stat(pid: u32) -> Option<(u32, f64)> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state, ppid, …, utime (14th), stime (15th).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let used = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((ppid, used / ticks))
}

/// Resident memory of `pid` and its children (nginx's workers) in MiB, from
/// `/proc/<pid>/status`: now (`VmRSS`) and at its peak so far (`VmHWM`).
fn rss_mib(pid: u32) -> (f64, f64) {
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    family(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .map(|t| (field(&t, "VmRSS:"), field(&t, "VmHWM:")))
        .fold((0.0, 0.0), |(r, h), (r2, h2)| {
            (r + r2 / 1024.0, h + h2 / 1024.0)
        })
}

/// CPU seconds used so far by process `pid` and its children; 0 for pid 0.
fn cpu_secs(pid: u32) -> f64 {
    family(pid)
        .into_iter()
        .filter_map(proc_stat)
        .map(|(_, t)| t)
        .sum()
}

/// System calls per request of a proxy (its processes and their threads, `strace -c -f`),
/// over `n` requests sent one after another on one connection. Deterministic where CPU time is
/// not: the count does not depend on what else the cores are doing. `None` without strace.
fn syscalls_per_request(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pid: u32,
    n: usize,
    body: &[u8],
) -> Option<f64> {
    let dir = Dir::new("lumen-bench-strace");
    let out = dir.path().join("strace.txt");
    let mut command = Command::new("strace");
    command.args(["-c", "-f", "-qq", "-o"]).arg(&out);
    for p in family(pid) {
        command.arg("-p").arg(p.to_string());
    }
    let strace = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Attaching takes a moment; requests before it would go uncounted.
    std::thread::sleep(Duration::from_millis(500));
    let sent = runtime.block_on(async {
        let mut c = Client::connect(addr).await.ok()?;
        for _ in 0..n {
            let r = c
                .request(
                    "POST",
                    "/v1/chat/completions",
                    &[
                        ("content-type", "application/json"),
                        ("authorization", BENCH_AUTH),
                    ],
                    body,
                )
                .await
                .ok()?;
            if r.status != 200 {
                return None;
            }
        }
        Some(())
    });
    // SIGINT: strace detaches and writes its summary.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = Killed(strace);
    sent?;
    let text = std::fs::read_to_string(&out).ok()?;
    let calls: f64 = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(calls / n as f64)
}

/// `a / b` as `0.00x`, or `-` when either is unknown.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The bare Pingora proxy in front of `upstream`, once it accepts connections.
fn start_bare(upstream: SocketAddr) -> Option<(Killed, SocketAddr)> {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(bin_path("lumen-bare-proxy"))
        .args([
            "--listen",
            &addr.to_string(),
            "--upstream",
            &upstream.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let child = Killed(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((child, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("lumen-bare-proxy did not start: the pingora column is skipped");
    None
}

fn main() {
    // `cargo bench` passes `--bench`; run only when asked for this bench or with no filter.
    let secs: f64 = std::env::var("LUMEN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mock_port = free_port();
    let _mock = Killed(
        Command::new(bin_path("lumen-mock-upstream"))
            .args(["--port", &mock_port.to_string(), "--threads", "1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start lumen-mock-upstream (cargo build --release --workspace first)"),
    );
    let mock = SocketAddr::from(([127, 0, 0, 1], mock_port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(mock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = |redis: &str| {
        format!(
            "server: {{ threads: 2 }}\n{redis}keys: [ {{ id: bench, key: \"{BENCH_KEY}\", limits: {{ requests_per_second: 1000000, concurrent_requests: 10000 }} }} ]\nproviders:\n  mock: {{ base_url: \"http://{mock}/v1\" }}\nroutes:\n  - {{ model: bench, targets: [ {{ provider: mock, model: bench-upstream }} ] }}\n"
        )
    };
    let lumen = Lumen::start(&config(""));
    // The thread models of `server.runtime` other than the default (`per_core`).
    let runtime_config = |model: &str| {
        config("").replace("threads: 2 }", &format!("threads: 2, runtime: {model} }}"))
    };
    let lumen_steal = Lumen::start(&runtime_config("work_stealing"));
    let lumen_nosteal = Lumen::start(&runtime_config("no_steal"));
    // The baseline for what auth and limits cost: the same gateway with `auth: off`.
    let lumen_open = Lumen::start(&config("auth: off\n"));
    // The same, with the request limit checked in a real redis-server (one round trip each).
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
        .then(RedisServer::start);
    let lumen_redis = redis
        .as_ref()
        .map(|r| Lumen::start(&config(&format!("redis: {{ url: \"{}\" }}\n", r.url()))));
    let nginx = start_nginx(mock);
    if nginx.is_none() {
        eprintln!("nginx not found: the nginx column is skipped (apt-get install nginx-light)");
    }
    let bare = start_bare(mock);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Each proxy's process (0: none to measure), whose CPU time (with its children's, for
    // nginx's workers) gives requests per CPU-second: a figure the shared cores disturb less
    // than requests per second.
    let mut targets: Vec<(&str, SocketAddr, u32)> = vec![("direct", mock, 0)];
    if let Some((child, addr, _)) = &nginx {
        targets.push(("nginx", *addr, child.0.id()));
    }
    if let Some((child, addr)) = &bare {
        targets.push(("pingora", *addr, child.0.id()));
    }
    targets.push(("lumen-open", lumen_open.addr, lumen_open.pid()));
    targets.push(("lumen", lumen.addr, lumen.pid()));
    targets.push(("lumen-steal", lumen_steal.addr, lumen_steal.pid()));
    targets.push(("lumen-nosteal", lumen_nosteal.addr, lumen_nosteal.pid()));
    if let Some(l) = &lumen_redis {
        targets.push(("lumen+redis", l.addr, l.pid()));
    }

    println!(
        "Lumen load benchmark ({secs} s per measurement; 2 cores shared by load, mock and proxy)\n"
    );
    // Idle memory, before any load (peaks are read after the last scenario).
    let idle: Vec<(&str, f64)> = targets
        .iter()
        .filter(|(_, _, pid)| *pid != 0)
        .map(|(label, _, pid)| (*label, rss_mib(*pid).0))
        .collect();
    // (name, connections, body bytes, stream, streamed chunks)
    let scenarios: [(&str, usize, usize, bool, u32); 5] = [
        ("c=1 1KiB latency", 1, 1024, false, 5),
        ("c=1 16KiB latency", 1, 16 * 1024, false, 5),
        ("c=32 1KiB throughput", 32, 1024, false, 5),
        ("c=1 stream first chunk", 1, 1024, true, 5),
        ("c=32 stream throughput (20 chunks)", 32, 1024, true, 20),
    ];
    // `LUMEN_BENCH_ONLY=c=32` runs only the scenarios whose name contains it (and skips the
    // cache and fallback sections): for quick A/B runs of one change.
    let only = std::env::var("LUMEN_BENCH_ONLY").ok();
    // `LUMEN_BENCH_ROUNDS=N` measures each scenario N times, the targets taking turns within a
    // round, and reports medians across rounds (ratios are taken within a round, then their
    // median): on shared cores one measurement swings by 15% or more.
    let rounds: usize = std::env::var("LUMEN_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    for (name, conns, bytes, stream, chunks) in scenarios {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut by_round: Vec<Vec<(&str, Sample)>> = Vec::new();
        for _ in 0..rounds {
            let mut results = Vec::new();
            for (label, addr, pid) in &targets {
                let cpu_before = cpu_secs(*pid);
                let mut sample = runtime.block_on(load(
                    *addr,
                    conns,
                    secs,
                    chat_body_chunks(bytes, stream, chunks),
                    stream,
                ));
                let cpu = cpu_secs(*pid) - cpu_before;
                sample.per_cpu_sec = (cpu > 0.0).then(|| sample.latencies.len() as f64 / cpu);
                results.push((*label, sample));
            }
            by_round.push(results);
        }
        // Medians across rounds of `f` of each round's results (`None` when it has none).
        let across = |f: &RoundFigure| -> Option<Spread> {
            Spread::of(by_round.iter().filter_map(|r| f(r)).collect())
        };
        println!(
            "{name}{}",
            if rounds > 1 {
                format!(" (median of {rounds} rounds)")
            } else {
                String::new()
            }
        );
        for (i, (label, _, _)) in targets.iter().enumerate() {
            let m = |f: &dyn Fn(&Sample, &Sample) -> Option<f64>| {
                across(&|r: &[(&str, Sample)]| f(&r[i].1, &r[0].1))
            };
            let rps = m(&|s, _| Some(s.rps));
            let direct_ratio = m(&|s, d| Some(s.rps / d.rps));
            let p50 = m(&|s, _| Some(s.pct(0.5)));
            let p99 = m(&|s, _| Some(s.pct(0.99)));
            let added50 = m(&|s, d| Some(s.pct(0.5) - d.pct(0.5)));
            let added99 = m(&|s, d| Some(s.pct(0.99) - d.pct(0.99)));
            let cpu = m(&|s, _| s.per_cpu_sec);
            let v = |x: &Option<Spread>| x.as_ref().map_or(f64::NAN, |x| x.median);
            println!(
                "  {label:<13} rps {:>9.0} ({:.2}x direct)  p50 {:>7.0} us  p99 {:>7.0} us  added p50 {:>6.0} us  added p99 {:>6.0} us  req/cpu-s {:>7}",
                v(&rps),
                v(&direct_ratio),
                v(&p50),
                v(&p99),
                v(&added50),
                v(&added99),
                cpu.map_or("-".to_string(), |r| format!("{:.0}", r.median))
            );
        }
        let index = |label: &str| targets.iter().position(|(k, _, _)| *k == label);
        for reference in ["nginx", "pingora", "lumen-steal", "lumen-nosteal"] {
            let (Some(l), Some(r)) = (index("lumen"), index(reference)) else {
                continue;
            };
            let pair = |f: &dyn Fn(&Sample, &Sample, &Sample) -> Option<f64>| {
                across(&|round: &[(&str, Sample)]| f(&round[l].1, &round[r].1, &round[0].1))
            };
            let rps = pair(&|l, r, _| Some(l.rps / r.rps));
            let cpu = pair(&|l, r, _| Some(l.per_cpu_sec? / r.per_cpu_sec?));
            let l50 = pair(&|l, _, d| Some(l.pct(0.5) - d.pct(0.5)));
            let r50 = pair(&|_, r, d| Some(r.pct(0.5) - d.pct(0.5)));
            let l99 = pair(&|l, _, d| Some(l.pct(0.99) - d.pct(0.99)));
            let r99 = pair(&|_, r, d| Some(r.pct(0.99) - d.pct(0.99)));
            let show = |x: &Option<Spread>, unit: &str| {
                x.as_ref()
                    .map_or("-".to_string(), |x| x.show(unit, rounds > 1))
            };
            println!(
                "  lumen/{reference}: rps {}, req/cpu-s {}, added p50 {} vs {}, added p99 {} vs {}",
                show(&rps, "x"),
                show(&cpu, "x"),
                show(&l50, " us"),
                show(&r50, " us"),
                show(&l99, " us"),
                show(&r99, " us"),
            );
        }
        println!();
    }

    println!("memory (MiB, resident; the proxy's processes: idle before any load, peak after the scenarios above)");
    for (label, idle_mib) in &idle {
        let Some((_, _, pid)) = targets.iter().find(|(l, _, _)| l == label) else {
            continue;
        };
        println!(
            "  {label:<13} idle {idle_mib:>6.1}  peak {:>6.1}",
            rss_mib(*pid).1
        );
    }
    let mem = |name: &str| idle.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let peak = |name: &str| {
        targets
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, _, pid)| rss_mib(*pid).1)
    };
    println!(
        "  lumen/nginx idle {} peak {}  lumen/pingora idle {} peak {}\n",
        ratio(mem("lumen"), mem("nginx")),
        ratio(peak("lumen"), peak("nginx")),
        ratio(mem("lumen"), mem("pingora")),
        ratio(peak("lumen"), peak("pingora"))
    );

    if only.as_deref().is_none_or(|o| "syscalls".contains(o)) {
        for (what, body) in [
            ("chat", chat_body(1024, false)),
            ("stream of 20 chunks", chat_body_chunks(1024, true, 20)),
        ] {
            println!(
                "syscalls per request, {what} (strace -c -f on the proxy's processes; 500 requests, c=1, 1KiB)"
            );
            let mut counts = Vec::new();
            for (label, addr, pid) in targets.iter().filter(|(_, _, pid)| *pid != 0) {
                let per = syscalls_per_request(&runtime, *addr, *pid, 500, &body);
                println!(
                    "  {label:<11} {}",
                    per.map_or("- (strace not available)".to_string(), |v| format!(
                        "{v:.1}"
                    ))
                );
                counts.push((*label, per));
            }
            let of = |name: &str| {
                counts
                    .iter()
                    .find(|(k, _)| *k == name)
                    .and_then(|(_, v)| *v)
            };
            println!(
                "  lumen/nginx {}  lumen/pingora {}\n",
                ratio(of("lumen"), of("nginx")),
                ratio(of("lumen"), of("pingora"))
            );
        }
    }
    // Translation: the same answer asked for in the Responses and Messages APIs (translated
    // to chat completions and back) against chat completions itself, same gateway, same run.
    // `store: false`: the cost of translation alone (storing is a memory write, or a Redis
    // round trip with `redis:`).
    if only.as_deref().is_none_or(|o| "translation".contains(o)) {
        println!(
            "translation overhead, c=1 1KiB (lumen-open; each API's request for the same answer; median [range] of per-round differences)"
        );
        let filler = "x".repeat(1024 - 120);
        // Rounds, each measuring chat and then both APIs: a difference of a few tens of
        // microseconds is read within a round (median across rounds), not between runs.
        let rounds = rounds.max(5);
        for stream in [false, true] {
            let what = if stream {
                "stream, first chunk"
            } else {
                "whole answer"
            };
            let responses = json!({"model": "bench", "input": filler, "stream": stream,
                               "temperature": 0, "store": false});
            let messages = json!({"model": "bench", "max_tokens": 64, "stream": stream, "temperature": 0,
                              "messages": [{"role": "user", "content": filler}]});
            let apis = [
                (
                    "responses",
                    "/v1/responses",
                    serde_json::to_vec(&responses).unwrap_or_default(),
                ),
                (
                    "messages",
                    "/v1/messages",
                    serde_json::to_vec(&messages).unwrap_or_default(),
                ),
            ];
            // Per API: (added p50, added p99, rps ratio, p50, chat p50) of each round.
            let mut by_api: Vec<Vec<[f64; 5]>> = vec![Vec::new(); apis.len()];
            for _ in 0..rounds {
                let base = runtime.block_on(load(
                    lumen_open.addr,
                    1,
                    secs / 2.0,
                    chat_body_chunks(1024, stream, 3),
                    stream,
                ));
                for (i, (_, path, body)) in apis.iter().enumerate() {
                    let s = runtime.block_on(load_at(
                        lumen_open.addr,
                        path,
                        1,
                        secs / 2.0,
                        body.clone(),
                        stream,
                    ));
                    by_api[i].push([
                        s.pct(0.5) - base.pct(0.5),
                        s.pct(0.99) - base.pct(0.99),
                        s.rps / base.rps,
                        s.pct(0.5),
                        base.pct(0.5),
                    ]);
                }
            }
            for (i, (label, _, _)) in apis.iter().enumerate() {
                let col = |k: usize| Spread::of(by_api[i].iter().map(|r| r[k]).collect());
                let show = |x: Option<Spread>, unit: &str| {
                    x.map_or("-".to_string(), |x| x.show(unit, true))
                };
                let median = |x: Option<Spread>| x.map_or(f64::NAN, |x| x.median);
                println!(
                    "  {label:<9} {what:<19} p50 {:>4.0} vs chat {:>4.0} us, added p50 {}  added p99 {}  rps {}",
                    median(col(3)),
                    median(col(4)),
                    show(col(0), " us"),
                    show(col(1), " us"),
                    show(col(2), "x"),
                );
            }
        }
        println!();
    }
    // Dollar budgets: the same key with token budgets alone, and with prices and a dollar
    // budget on top (reserved before forwarding, settled after, the whole answer read before
    // its head for `x-lumen-cost-usd`), in process and through Redis. Each pair in rounds, the
    // difference read within a round.
    if only.as_deref().is_none_or(|o| "budget".contains(o)) {
        println!(
            "dollar budget overhead over token budgets alone, c=1 1KiB whole answer (median [range] of per-round differences)"
        );
        let budget_config = |redis: &str, dollars: bool| {
            let budget = if dollars {
                ", budget: { usd_per_day: 1000000 }"
            } else {
                ""
            };
            let prices = if dollars {
                "prices: [ { provider: mock, model: bench-upstream, input: 1, output: 2 } ]\n"
            } else {
                ""
            };
            format!(
                "server: {{ threads: 2 }}\n{redis}{prices}keys: [ {{ id: bench, key: \"{BENCH_KEY}\", limits: {{ tokens_per_day: 1000000000000 }}{budget} }} ]\nproviders:\n  mock: {{ base_url: \"http://{mock}/v1\" }}\nroutes:\n  - {{ model: bench, targets: [ {{ provider: mock, model: bench-upstream }} ] }}\n"
            )
        };
        let mut pairs = vec![(
            "in process",
            Lumen::start(&budget_config("", false)),
            Lumen::start(&budget_config("", true)),
        )];
        if let Some(r) = &redis {
            let shared = format!("redis: {{ url: \"{}\" }}\n", r.url());
            pairs.push((
                "through redis",
                Lumen::start(&budget_config(&shared, false)),
                Lumen::start(&budget_config(&shared, true)),
            ));
        }
        let rounds = rounds.max(5);
        for (label, tokens, dollars) in &pairs {
            let mut diffs = Vec::new();
            let mut p50s = Vec::new();
            for _ in 0..rounds {
                let base = runtime.block_on(load(
                    tokens.addr,
                    1,
                    secs / 2.0,
                    chat_body(1024, false),
                    false,
                ));
                let with = runtime.block_on(load(
                    dollars.addr,
                    1,
                    secs / 2.0,
                    chat_body(1024, false),
                    false,
                ));
                diffs.push(with.pct(0.5) - base.pct(0.5));
                p50s.push((with.pct(0.5), base.pct(0.5)));
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
            };
            println!(
                "  {label:<14} p50 {:>4.0} vs tokens alone {:>4.0} us, added p50 {}",
                median(p50s.iter().map(|p| p.0).collect()),
                median(p50s.iter().map(|p| p.1).collect()),
                Spread::of(diffs).map_or("-".to_string(), |d| d.show(" us", true)),
            );
        }
        println!();
    }
    // Hedging against a long-tailed provider (95% answer in 50 ms, 5% in 2 s): time to the
    // answer at c=16 without hedging, and with hedges (a percentile delay, and a fixed one),
    // each within a 6% budget; extra upstream calls from the hedge counters.
    if only.as_deref().is_none_or(|o| "hedge".contains(o)) {
        println!("hedging, c=16, a provider with a long tail (95% at 50 ms, 5% at 2 s)");
        let hedge_config = |hedge: &str| {
            format!(
                "server: {{ threads: 2 }}\nauth: off\nproviders:\n  m1: {{ base_url: \"http://{mock}/v1\", health: {{ enabled: false }} }}\n  m2: {{ base_url: \"http://{mock}/v1\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: bench, targets: [ {{ provider: m1, model: ttft-50-5-2000 }}, {{ provider: m2, model: ttft-50-5-2000 }} ]{hedge} }}\n"
            )
        };
        // Long enough that the warm-up (50 requests, a few of them 2 s) leaves seconds to measure.
        let secs = secs.max(20.0);
        for (label, hedge) in [
            ("no hedging", ""),
            // A 95/5 mix puts p95 on the cliff's edge (it may read the tail itself): p90 is
            // the percentile such a provider wants.
            (
                "after p95, budget 6%",
                ", hedge: { after: p95, budget: 6% }",
            ),
            (
                "after p90, budget 6%",
                ", hedge: { after: p90, budget: 6% }",
            ),
            (
                "after 60ms, budget 6%",
                ", hedge: { after: 60ms, budget: 6% }",
            ),
        ] {
            let gateway = Lumen::start(&hedge_config(hedge));
            let s = runtime.block_on(load(gateway.addr, 16, secs, chat_body(256, false), false));
            let metrics = runtime
                .block_on(lumen_test_support::client::request(
                    gateway.admin,
                    "GET",
                    "/metrics",
                    &[],
                    b"",
                ))
                .map(|r| r.text())
                .unwrap_or_default();
            let count = |prefix: &str| -> f64 {
                metrics
                    .lines()
                    .filter(|l| l.starts_with(prefix))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            let hedges = count("lumen_hedges_total{outcome=\"won\"")
                + count("lumen_hedges_total{outcome=\"lost\"");
            // Requests the route saw (the warm-up's 50 included).
            let requests = s.latencies.len() as f64 + 50.0;
            println!(
                "  {label:<22} p50 {:>7.1} ms  p99 {:>7.1} ms  (p99/p50 {:>5.2})  rps {:>6.0}  extra calls {:>5.2}%  won {}",
                s.pct(0.5) / 1e3,
                s.pct(0.99) / 1e3,
                s.pct(0.99) / s.pct(0.5),
                s.rps,
                100.0 * hedges / requests,
                count("lumen_hedges_total{outcome=\"won\""),
            );
        }
        println!();
    }
    if only.is_some() {
        return;
    }
    // Cache hits from memory against the same request proxied (lumen-open), same run.
    let cached = Lumen::start(&format!(
        "server: {{ threads: 2 }}\nauth: off\nproviders:\n  mock: {{ base_url: \"http://{mock}/v1\" }}\nroutes:\n  - {{ model: bench, targets: [ {{ provider: mock, model: bench-upstream }} ], cache: {{ ttl: 1h }} }}\n"
    ));
    println!("cache hits from memory vs the same request proxied (lumen-open)");
    for (name, conns) in [("c=1 1KiB", 1), ("c=32 1KiB", 32)] {
        let proxied = runtime.block_on(load(
            lumen_open.addr,
            conns,
            secs,
            chat_body(1024, false),
            false,
        ));
        let hits = runtime.block_on(load(
            cached.addr,
            conns,
            secs,
            chat_body(1024, false),
            false,
        ));
        println!(
            "  {name:<10} hit rps {:>8.0} vs proxied {:>8.0} ({:.2}x)  p50 {:>6.0} vs {:>6.0} us  p99 {:>6.0} vs {:>6.0} us",
            hits.rps,
            proxied.rps,
            hits.rps / proxied.rps,
            hits.pct(0.5),
            proxied.pct(0.5),
            hits.pct(0.99),
            proxied.pct(0.99)
        );
    }
    println!();

    // Fallback cost: the primary refuses the connection (nothing listens on its port).
    let dead = free_port();
    let fallback = |circuit: &str| {
        format!(
            "server: {{ threads: 2 }}\nauth: off\nproviders:\n  dead: {{ base_url: \"http://127.0.0.1:{dead}/v1\", health: {{ enabled: false }}{circuit} }}\n  mock: {{ base_url: \"http://{mock}/v1\" }}\nroutes:\n  - {{ model: bench, targets: [ {{ provider: dead, model: x }}, {{ provider: mock, model: bench-upstream }} ] }}\n"
        )
    };
    let every_time = Lumen::start(&fallback(
        ", circuit: { failures: 1000000000, min_requests: 1000000000 }",
    ));
    let with_circuit = Lumen::start(&fallback(""));
    println!("fallback cost, c=1 1KiB (primary refuses the connection; vs lumen-open answering directly)");
    let base = runtime.block_on(load(
        lumen_open.addr,
        1,
        secs,
        chat_body(1024, false),
        false,
    ));
    for (label, addr) in [
        ("every request falls back", every_time.addr),
        ("circuit open (default)", with_circuit.addr),
    ] {
        let s = runtime.block_on(load(addr, 1, secs, chat_body(1024, false), false));
        println!(
            "  {label:<25} p50 {:>7.0} us  p99 {:>7.0} us  added p50 {:>6.0} us  added p99 {:>6.0} us  rps {:.2}x",
            s.pct(0.5),
            s.pct(0.99),
            s.pct(0.5) - base.pct(0.5),
            s.pct(0.99) - base.pct(0.99),
            s.rps / base.rps
        );
    }
}
