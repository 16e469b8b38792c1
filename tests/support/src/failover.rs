//! A Redis failover under traffic, from the clients' side: a shared request limit of [`N`] per
//! minute checked in bursts, and chat traffic kept up through the failover while its figures
//! are taken (how long Redis and then the nodes' Redis calls took to recover, what failed,
//! what fail-open admitted). Shared by the fleet tests and the fleet benchmark.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::request;
use crate::keyed::{chat_status, count, redis_errors};

/// Requests per minute of each test key: low enough that a burst of 3N shows the limit, high
/// enough that a few seconds' refill is a handful.
pub const N: usize = 30;

/// YAML list entries for keys `sk-<id>`, each with `settings` (`{ … }` without the braces).
pub fn keys_yaml(ids: &[&str], settings: &str) -> String {
    ids.iter()
        .map(|id| format!("  - {{ id: {id}, key: \"sk-{id}\", {settings} }}\n"))
        .collect()
}

/// YAML list entries for keys `sk-<id>`, each limited to [`N`] requests per minute.
pub fn limited_keys(ids: &[&str]) -> String {
    keys_yaml(
        ids,
        &format!("limits: {{ requests_per_minute: {N}, burst: {N} }}"),
    )
}

/// What a per-minute limit of N may admit over a phase of `elapsed`: N, plus what refilled.
pub fn allowed(elapsed: Duration) -> usize {
    N + (elapsed.as_secs_f64() * N as f64 / 60.0).floor() as usize
}

pub fn assert_limit(statuses: &[u16], elapsed: Duration, phase: &str) {
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

/// The figures of one failover, for the notes.
#[derive(Debug)]
pub struct Failover {
    /// Until Redis itself served every slot again.
    pub redis_recovered: Duration,
    /// Until the nodes' Redis calls stopped failing.
    pub service_recovered: Duration,
    pub requests: usize,
    pub failed: usize,
    pub admitted: usize,
}

/// Kills a Redis server with `kill` while traffic with key `during` runs through `nodes` (one
/// request every 20 ms); ends once `recovered` says Redis is whole again and no node has
/// counted a Redis error for two seconds.
pub async fn traffic_through_failover(
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
