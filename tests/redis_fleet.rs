//! The fleet on a Redis Cluster and on Sentinel-managed replicas: real `redis-server`s (three
//! primaries with a replica each, made by `redis-cli --cluster create`; or a master, a replica
//! and three Sentinels), real `lumen` nodes, and a Redis primary killed while traffic runs.
//!
//! What is asserted: a shared limit of N per minute admits N (± 1, plus what refills during the
//! phase) across three nodes before and after a failover; while a slot has no primary the nodes
//! fail open to their own buckets and no request fails; the nodes see the new topology
//! (`/admin/redis`: primaries, replicas, failovers seen). The figures (failover time, time to
//! full service, excess admitted) are printed for the notes (`--nocapture`).

use std::time::{Duration, Instant};

use lumen_test_support::failover::{
    allowed, assert_limit, limited_keys, traffic_through_failover, N,
};
use lumen_test_support::harness::{
    away_from_minute_boundary, redis_cli, RedisCluster, RedisSentinels,
};
use lumen_test_support::keyed::{chat_burst, chat_status, primaries_up, topology_until, yaml_list};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::Value;

fn config(mock: &MockUpstream, redis: &str) -> String {
    let keys = limited_keys(&["before", "during", "after", "restart"]);
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
    let victim = cluster.primary_holding("*during*");
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

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_an_acl_user_reach_redis_and_a_wrong_password_is_refused() {
    let dir = lumen_test_support::harness::tempdir::Dir::new("redis-tls");
    let at = dir.path();
    // A private CA and a server certificate for 127.0.0.1.
    lumen_test_support::harness::test_ca(at);
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
