//! The fleet on a Redis Cluster and on Sentinel-managed replicas: real `redis-server`s (three
//! primaries with a replica each, made by `redis-cli --cluster create`; or a master, a replica
//! and three Sentinels), real `lumen` nodes, and a Redis primary killed while traffic runs.
//!
//! What is asserted: a shared limit of N per minute admits N (± 1, plus what refills during the
//! phase) across three nodes before and after a failover; while a slot has no primary the nodes
//! fail open to their own buckets and no request fails; the nodes see the new topology
//! (`/admin/redis`: primaries, replicas, failovers seen). The figures (failover time, time to
//! full service, excess admitted) are printed for the notes (`--nocapture`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen_test_support::client::request;
use lumen_test_support::harness::{
    away_from_minute_boundary, redis_cli, RedisCluster, RedisSentinels,
};
use lumen_test_support::keyed::{
    as_key, budget, by_op, chat_burst, chat_status, count, primaries_up, topology_until, wait_job,
    yaml_list,
};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

/// Requests per minute of each test key: low enough that a burst of 3N shows the limit, high
/// enough that a few seconds' refill is a handful.
const N: usize = 30;

fn config(mock: &MockUpstream, redis: &str) -> String {
    let keys: String = ["before", "during", "after", "restart"]
        .iter()
        .map(|id| {
            format!(
                "  - {{ id: {id}, key: \"sk-{id}\", limits: {{ requests_per_minute: {N}, burst: {N} }} }}\n"
            )
        })
        .collect();
    format!(
        r#"
server: {{ threads: 2 }}
redis: {{ {redis}, timeout: 200ms, on_redis_error: fail_open }}
keys:
{keys}providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        base = mock.base_url()
    )
}

/// What a per-minute limit of N may admit over a phase of `elapsed`: N, plus what refilled.
fn allowed(elapsed: Duration) -> usize {
    N + (elapsed.as_secs_f64() * N as f64 / 60.0).floor() as usize
}

fn assert_limit(statuses: &[u16], elapsed: Duration, phase: &str) {
    let admitted = count(statuses, 200);
    let most = allowed(elapsed);
    assert!(
        admitted + 1 >= N && admitted <= most + 1,
        "{phase}: a shared limit of {N}/min admitted {admitted} (at most {most} + 1): {statuses:?}"
    );
    assert_eq!(
        admitted + count(statuses, 429),
        statuses.len(),
        "{phase}: every request is admitted or limited, none fails: {statuses:?}"
    );
}

/// Failed Redis calls on one node, all operations together.
async fn redis_errors(admin: SocketAddr) -> u64 {
    by_op(admin, "lumen_redis_errors_total")
        .await
        .values()
        .sum::<f64>() as u64
}

/// The figures of one failover, for the notes.
struct Failover {
    /// Until Redis itself served every slot again.
    redis_recovered: Duration,
    /// Until the nodes' Redis calls stopped failing.
    service_recovered: Duration,
    requests: usize,
    failed: usize,
    admitted: usize,
}

/// Kills a Redis server with `kill` while traffic with key `during` runs through `nodes` (one
/// request every 20 ms); ends once `recovered` says Redis is whole again and no node has
/// counted a Redis error for two seconds.
async fn traffic_through_failover(
    nodes: &[(SocketAddr, SocketAddr)],
    kill: impl FnOnce(),
    recovered: impl Fn() -> bool,
) -> Failover {
    let addrs: Vec<SocketAddr> = nodes.iter().map(|(a, _)| *a).collect();
    let mut errors = 0;
    for (_, admin) in nodes {
        errors += redis_errors(*admin).await;
    }
    let killed = Instant::now();
    kill();
    let (mut statuses, mut redis_recovered, mut last_error) = (Vec::new(), None, killed);
    let mut i = 0usize;
    loop {
        let round: Vec<_> = (0..3)
            .map(|k| {
                let addr = addrs[(i + k) % addrs.len()];
                tokio::spawn(async move { chat_status(addr, "sk-during").await })
            })
            .collect();
        for t in round {
            statuses.push(t.await.unwrap());
        }
        i += 3;
        let mut now_errors = 0;
        for (_, admin) in nodes {
            now_errors += redis_errors(*admin).await;
        }
        if now_errors > errors {
            errors = now_errors;
            last_error = Instant::now();
        }
        if redis_recovered.is_none() && recovered() {
            redis_recovered = Some(killed.elapsed());
        }
        if redis_recovered.is_some() && last_error.elapsed() > Duration::from_secs(2) {
            break;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let metrics = request(nodes[0].1, "GET", "/metrics", &[], b"")
                .await
                .map(|r| r.text())
                .unwrap_or_default();
            let errors: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("lumen_redis_errors_total"))
                .collect();
            panic!(
                "no recovery within a minute (redis recovered: {redis_recovered:?}; errors last rose {:?} ago): {errors:?}",
                last_error.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Failover {
        redis_recovered: redis_recovered.unwrap_or_default(),
        service_recovered: last_error.duration_since(killed),
        requests: statuses.len(),
        failed: statuses.len() - count(&statuses, 200) - count(&statuses, 429),
        admitted: count(&statuses, 200),
    }
}

/// The port of the cluster primary holding a key that matches `pattern` (`--scan`).
fn primary_holding(cluster: &RedisCluster, pattern: &str) -> u16 {
    cluster
        .primaries()
        .into_iter()
        .find(|port| {
            !redis_cli(&["-p", &port.to_string(), "--scan", "--pattern", pattern])
                .trim()
                .is_empty()
        })
        .unwrap_or_else(|| panic!("no primary holds {pattern}:\n{}", cluster.view()))
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_limits_on_a_cluster_while_a_primary_dies() {
    let mock = MockUpstream::start();
    let mut cluster = RedisCluster::start(3, 1);

    let yaml = config(&mock, &format!("cluster: {}", yaml_list(&cluster.urls())));
    let a = Lumen::start(&yaml);
    let b = Lumen::start(&yaml);
    let mut c = Lumen::start(&yaml);
    let nodes = [(a.addr, a.admin), (b.addr, b.admin), (c.addr, c.admin)];
    let addrs = [a.addr, b.addr, c.addr];

    // The nodes see the cluster: three primaries serving every slot, three replicas.
    let seen = topology_until(a.admin, |t| primaries_up(t) == 3).await;
    assert_eq!(seen["topology"]["kind"], "cluster", "{seen}");
    let nodes_seen = seen["topology"]["nodes"].as_array().unwrap();
    let slots: u64 = nodes_seen.iter().filter_map(|n| n["slots"].as_u64()).sum();
    assert_eq!(slots, 16384, "{seen}");
    assert_eq!(
        nodes_seen.iter().filter(|n| n["role"] == "replica").count(),
        3,
        "{seen}"
    );

    away_from_minute_boundary().await;
    let started = Instant::now();
    let statuses = chat_burst(&addrs, "sk-before", 3 * N).await;
    assert_limit(&statuses, started.elapsed(), "before the failover");

    // The primary holding the `during` key's slot dies while its traffic runs.
    assert_eq!(chat_status(a.addr, "sk-during").await, 200);
    let victim = primary_holding(&cluster, "*during*");
    let probe = cluster
        .primaries()
        .into_iter()
        .find(|p| *p != victim)
        .unwrap();
    let failover = traffic_through_failover(
        &nodes,
        || cluster.kill(victim),
        || RedisCluster::failed_over(probe, victim),
    )
    .await;
    // Each node may fall back to its own bucket of N while the slot has no primary: the
    // documented excess of fail-open is at most one bucket per node on top of the shared one.
    let bound = allowed(failover.service_recovered + Duration::from_secs(3)) * (1 + nodes.len());
    eprintln!(
        "FIGURES cluster failover: redis recovered in {:?}, nodes' service in {:?}; {} requests, {} failed, {} admitted by a limit of {N}/min (bound {bound})",
        failover.redis_recovered,
        failover.service_recovered,
        failover.requests,
        failover.failed,
        failover.admitted,
    );
    assert_eq!(
        failover.failed, 0,
        "no request fails while a slot has no primary"
    );
    assert!(failover.admitted <= bound);

    // Every node notices the promoted replica.
    for (_, admin) in &nodes {
        let seen = topology_until(*admin, |t| {
            t["topology"]["failovers_seen"].as_u64() >= Some(1) && primaries_up(t) == 3
        })
        .await;
        assert!(seen["topology"]["last_failover_at"].as_u64().is_some());
    }

    // A Lumen node dies (SIGKILL) and comes back; the limit is still one across the fleet.
    c.kill();
    c = Lumen::start(&yaml);
    let addrs = [a.addr, b.addr, c.addr];
    away_from_minute_boundary().await;
    let started = Instant::now();
    let statuses = chat_burst(&addrs, "sk-after", 3 * N).await;
    assert_limit(&statuses, started.elapsed(), "after the failover");

    // The killed primary returns as a replica of the one that replaced it.
    cluster.restart(victim);
    cluster.wait_healthy(Duration::from_secs(30));
    let started = Instant::now();
    let statuses = chat_burst(&addrs, "sk-restart", 3 * N).await;
    assert_limit(
        &statuses,
        started.elapsed(),
        "after the old primary rejoined",
    );
    let seen = topology_until(b.admin, |t| {
        t["topology"]["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().all(|n| n["up"] == true) && n.len() == 6)
    })
    .await;
    let rejoined = seen["topology"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["addr"] == format!("127.0.0.1:{victim}"))
        .cloned()
        .unwrap();
    assert_eq!(rejoined["role"], "replica", "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_failover_is_followed_without_a_restart() {
    let mock = MockUpstream::start();
    let mut sentinels = RedisSentinels::start();

    let yaml = config(
        &mock,
        &format!(
            "sentinel: {{ master: {}, nodes: {} }}",
            RedisSentinels::MASTER,
            yaml_list(&sentinels.urls())
        ),
    );
    let a = Lumen::start(&yaml);
    let b = Lumen::start(&yaml);
    let nodes = [(a.addr, a.admin), (b.addr, b.admin)];
    let addrs = [a.addr, b.addr];
    let old = sentinels.master_port;

    let seen = topology_until(a.admin, |t| primaries_up(t) == 1).await;
    assert_eq!(seen["topology"]["kind"], "sentinel", "{seen}");
    let primary = |t: &Value| {
        t["topology"]["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["role"] == "primary").cloned())
            .map(|n| n["addr"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(primary(&seen), Some(format!("127.0.0.1:{old}")));
    assert_eq!(
        seen["topology"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == "sentinel")
            .count(),
        3,
        "{seen}"
    );

    away_from_minute_boundary().await;
    let started = Instant::now();
    let statuses = chat_burst(&addrs, "sk-before", 2 * N).await;
    assert_limit(&statuses, started.elapsed(), "before the failover");

    let watcher = sentinels.sentinel_ports[0];
    let failover = traffic_through_failover(
        &nodes,
        || sentinels.kill(old),
        || {
            let answer = redis_cli(&[
                "-p",
                &watcher.to_string(),
                "sentinel",
                "get-master-addr-by-name",
                RedisSentinels::MASTER,
            ]);
            answer.lines().nth(1).map(str::trim) != Some(old.to_string().as_str())
                && answer.lines().count() >= 2
        },
    )
    .await;
    eprintln!(
        "FIGURES sentinel failover: sentinels promoted the replica in {:?}, nodes' service in {:?}; {} requests, {} failed, {} admitted by a limit of {N}/min",
        failover.redis_recovered,
        failover.service_recovered,
        failover.requests,
        failover.failed,
        failover.admitted,
    );
    assert_eq!(failover.failed, 0);

    // Both nodes now write to the promoted replica, and say so.
    let new = format!("127.0.0.1:{}", sentinels.replica_port);
    for (_, admin) in &nodes {
        let seen = topology_until(*admin, |t| primary(t).as_deref() == Some(new.as_str())).await;
        assert!(
            seen["topology"]["failovers_seen"].as_u64() >= Some(1),
            "{seen}"
        );
    }
    away_from_minute_boundary().await;
    let started = Instant::now();
    let statuses = chat_burst(&addrs, "sk-after", 2 * N).await;
    assert_limit(&statuses, started.elapsed(), "after the failover");
    let keys = redis_cli(&[
        "-p",
        &sentinels.replica_port.to_string(),
        "--scan",
        "--pattern",
        "*after*",
    ]);
    assert!(
        !keys.trim().is_empty(),
        "the limit's state is on the new master"
    );
}

/// A process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed by scripts/setup.sh");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_an_acl_user_reach_redis_and_a_wrong_password_is_refused() {
    let dir = lumen_test_support::harness::tempdir::Dir::new("redis-tls");
    let at = dir.path();
    // A private CA and a server certificate for 127.0.0.1.
    openssl(
        at,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=lumen-test-ca",
        ],
    );
    openssl(
        at,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(at.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        at,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = lumen_test_support::harness::free_port();
    let _redis = Killed(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            // Only the ACL user `lumen` may log in.
            .args(["--user", "default", "off"])
            .args([
                "--user",
                "lumen",
                "on",
                ">s3cret-redis-pw",
                "~*",
                "&*",
                "+@all",
            ])
            .current_dir(at)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server (TLS) did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mock = MockUpstream::start();
    let yaml = |password_var: &str| {
        format!(
            r#"
redis: {{ url: "rediss://127.0.0.1:{port}", username: lumen, password: "${{{password_var}}}", tls_ca_file: "{ca}", on_redis_error: fail_closed, timeout: 500ms }}
keys:
  - {{ id: tls, key: "sk-tls", limits: {{ requests_per_minute: 3, burst: 3 }} }}
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
            ca = at.join("ca.pem").display(),
            base = mock.base_url()
        )
    };
    let good = Lumen::start_with_env(
        &yaml("REDIS_PASSWORD"),
        &[("REDIS_PASSWORD", "s3cret-redis-pw")],
    );
    away_from_minute_boundary().await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat_status(good.addr, "sk-tls").await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "the limit is kept in Redis over TLS"
    );
    let seen = topology_until(good.admin, |t| t["connected"] == true).await;
    assert_eq!(seen["topology"]["kind"], "server", "{seen}");
    assert_eq!(seen["topology"]["nodes"][0]["role"], "primary", "{seen}");

    // A wrong password: Redis refuses the login, and fail_closed refuses the requests.
    let bad = Lumen::start_with_env(
        &yaml("WRONG_PASSWORD"),
        &[("WRONG_PASSWORD", "not-the-password")],
    );
    assert_eq!(chat_status(bad.addr, "sk-tls").await, 429);
    let seen = topology_until(bad.admin, |t| t["connected"] == false).await;
    assert!(seen["topology"].is_null(), "{seen}");
    for node in [&good, &bad] {
        let log = node.log();
        assert!(
            !log.contains("s3cret-redis-pw") && !log.contains("not-the-password"),
            "{log}"
        );
    }
}

fn chaos_config(mock: &MockUpstream, redis: &str) -> String {
    format!(
        r#"
server: {{ threads: 2 }}
redis: {{ {redis}, timeout: 200ms, on_redis_error: fail_open }}
keys:
  - {{ id: alice, key: "sk-alice", budget: {{ usd_per_day: 100 }} }}
prices:
  - {{ provider: mock, model: up, input: 1, output: 2 }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
usage: {{ flush_interval: 200ms }}
jobs: {{ workers: 2, visibility_timeout: 2s, max_attempts: 4 }}
"#,
        base = mock.base_url()
    )
}

/// Jobs submitted to three nodes while one node is SIGKILLed and restarted, the Redis primary
/// holding the job queue dies, and another node reloads its config: every job ends with exactly
/// one result (a run cut short by the killed node is run again, never recorded twice), and the
/// usage ledger counts no request twice.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_end_once_while_a_node_and_the_queues_primary_die() {
    let mock = MockUpstream::start();
    let mut cluster = RedisCluster::start(3, 1);

    let yaml = chaos_config(&mock, &format!("cluster: {}", yaml_list(&cluster.urls())));
    let a = Lumen::start(&yaml);
    let b = Lumen::start(&yaml);
    let mut c = Lumen::start(&yaml);
    let _worker = lumen_test_support::harness::Worker::start(&yaml);
    topology_until(a.admin, |t| primaries_up(t) == 3).await;

    const JOBS: usize = 24;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let node = [a.addr, b.addr, c.addr][i % 3];
        let job = lumen_test_support::openai::chat_job(
            "fast",
            &format!("job-{i}"),
            json!({"mock_chunks": 4, "mock_delay_ms": 150}),
        );
        let v = as_key(node, "POST", "/v1/jobs", "sk-alice", Some(&job))
            .await
            .json();
        ids.push(
            v["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node c dies with jobs running on its workers; the queue's primary dies; b reloads.
    c.kill();
    let victim = primary_holding(&cluster, "*lumen:jobs*");
    let killed = Instant::now();
    cluster.kill(victim);
    unsafe { libc::kill(b.pid() as i32, libc::SIGHUP) };
    let live = cluster
        .primaries()
        .into_iter()
        .find(|p| *p != victim)
        .unwrap();
    while !RedisCluster::failed_over(live, victim) {
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered = killed.elapsed();
    let _c_again = Lumen::start(&yaml);

    for id in &ids {
        let done = wait_job(a.addr, "sk-alice", id, Duration::from_secs(90)).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(
            done["result"]["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 ",
            "{done}"
        );
        // Recorded once: a second finisher (a run whose worker lost its lease) would add a
        // second `result` event to the job's stream.
        let events = as_key(
            b.addr,
            "GET",
            &format!("/v1/jobs/{id}/events"),
            "sk-alice",
            None,
        )
        .await
        .text();
        assert_eq!(events.matches("event: result\n").count(), 1, "{events}");
    }
    let all_done = killed.elapsed();
    // Upstream calls per job: one, or two where a run was cut short (its worker died or lost
    // its lease while the queue's slot had no primary).
    let mut calls: std::collections::HashMap<String, usize> = Default::default();
    for r in mock.requests() {
        if let Some(content) = r.json()["messages"][0]["content"].as_str() {
            *calls.entry(content.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        calls.len(),
        JOBS,
        "every job reached the provider: {calls:?}"
    );
    let reruns = calls.values().filter(|n| **n > 1).count();
    assert!(calls.values().all(|n| *n <= 2), "{calls:?}");
    let upstream: usize = calls.values().sum();

    // The ledger: every request it counts was made, none counted twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let usage = request(a.admin, "GET", "/admin/usage?key=alice", &[], b"")
        .await
        .unwrap()
        .json();
    let counted = usage["total"]["requests"].as_u64().unwrap_or(0) as usize;
    assert!(
        counted >= JOBS && counted <= upstream,
        "ledger counted {counted} requests for {JOBS} jobs and {upstream} upstream calls: {usage}"
    );
    let used = budget(&a, "key", "alice").await["windows"][0]["used_usd"].clone();
    eprintln!(
        "FIGURES jobs chaos: {JOBS} jobs, one result each, {reruns} run twice upstream ({upstream} calls); queue primary replaced in {recovered:?}, every job final {all_done:?} after the kill; ledger counted {counted} requests, cost {}; budget used {used} (each completed job costs 0.000015)",
        usage["total"]["cost_usd"]
    );
}
