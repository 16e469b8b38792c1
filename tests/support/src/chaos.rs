//! One gateway made of parts that die: three `lumen serve` nodes and a `lumen worker` on a Redis
//! Cluster of three primaries with a replica each (or on a Sentinel-managed master and
//! replica), mixed traffic through the nodes (chat, streams, embeddings, cached answers, jobs)
//! while the Redis primary holding the budgets (the master) dies, one node is SIGKILLed and
//! started again, and another reloads its config.
//!
//! What the clients saw and what the fleet counted come back as a [`Report`]: asserted by
//! `tests/fleet_chaos.rs`, printed as figures by `benches/fleet.rs`.
//!
//! Keys: `sk-mixed` carries the traffic whose totals must add up (a dollar budget and a daily
//! token budget; it only ever reaches nodes that stay up, or the killed node once it is back);
//! `sk-doomed` is the traffic on the node that is killed (its requests in flight are lost with
//! it); `sk-jobs` submits the jobs; `sk-before`, `sk-during`, `sk-after` check the shared
//! request limit of [`N`] per minute.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Client;
use crate::failover::{keys_yaml, limited_keys, traffic_through_failover, Failover, N};
use crate::harness::{away_from_minute_boundary, redis_cli, RedisCluster, RedisSentinels, Worker};
use crate::keyed::{
    admin_at, as_key, budget, chat_burst, micros, primaries_up, topology_until, wait_job, yaml_list,
};
use crate::openai::{bearer, chat, chat_job, chat_with};
use crate::{Lumen, MockUpstream};

/// The Redis the fleet shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Three primaries with a replica each; the primary holding the budgets dies.
    Cluster,
    /// A master, a replica and three Sentinels; the master dies.
    Sentinel,
}

/// How much of everything one run does.
#[derive(Debug, Clone)]
pub struct Scale {
    pub topology: Topology,
    /// Clients sending `sk-mixed` traffic at once, each one request after another.
    pub clients: usize,
    /// Jobs submitted just before the parts die.
    pub jobs: usize,
    /// Distinct cached prompts, stored before the failover and asked for throughout.
    pub cached: usize,
    /// How long traffic runs before the parts die and after the fleet has recovered.
    pub steady: Duration,
}

/// Traffic phases: before anything dies, from the kill until the nodes' Redis calls have
/// stopped failing for two seconds, and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Before,
    During,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Chat,
    Stream,
    Embeddings,
    Cached,
}

/// One `sk-mixed` request as its client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub phase: Phase,
    pub kind: Kind,
    /// 0: no answer at all.
    pub status: u16,
    /// A whole answer: JSON with a usage, or a stream that ended with `[DONE]`.
    pub whole: bool,
    /// Served from the cache (`x-lumen-cache: hit`): costs nothing.
    pub hit: bool,
    /// The usage the answer reported (`total_tokens`), and its price in micro-dollars.
    pub tokens: u64,
    pub cost: u64,
    pub took: Duration,
}

/// What one run saw and counted.
#[derive(Debug)]
pub struct Report {
    pub limit_before: (Vec<u16>, Duration),
    pub limit_after: (Vec<u16>, Duration),
    /// The failover as `sk-during` traffic saw it.
    pub failover: Failover,
    pub outcomes: Vec<Outcome>,
    /// Requests on the node that was killed, and how many of them got an answer.
    pub doomed: (usize, usize),
    /// Cache entries stored, and how many of them the dead primary held.
    pub cached: (usize, usize),
    /// Per job: its final state, and how many `result` events its stream holds.
    pub jobs: Vec<(Value, usize)>,
    /// Jobs the provider saw more than once (a run cut short by the dead node).
    pub jobs_rerun: usize,
    /// `sk-mixed`'s daily dollar budget in Redis: used and still reserved (micro-dollars).
    pub budget_used: u64,
    pub budget_reserved: u64,
    /// `sk-mixed`'s daily token window in Redis.
    pub tokens_used: u64,
    /// `/admin/usage?key=mixed`'s totals.
    pub ledger: Value,
    /// How long after the traffic stopped the totals had settled.
    pub settled_after: Duration,
    /// How long each phase of traffic lasted: before, during, after.
    pub lasted: [Duration; 3],
}

impl Report {
    /// The outcomes of `phase` (all phases: `None`).
    pub fn of(&self, phase: Option<Phase>) -> impl Iterator<Item = &Outcome> {
        self.outcomes
            .iter()
            .filter(move |o| phase.is_none_or(|p| o.phase == p))
    }

    /// What the clients were charged, by their answers: (requests answered, tokens, cost).
    pub fn charged(&self) -> (u64, u64, u64) {
        let ok = self.of(None).filter(|o| o.status == 200);
        ok.fold((0, 0, 0), |(n, t, c), o| (n + 1, t + o.tokens, c + o.cost))
    }

    /// Answered requests per second in `phase`.
    pub fn rate(&self, phase: Phase) -> f64 {
        let ok = self.of(Some(phase)).filter(|o| o.status == 200).count();
        ok as f64 / self.lasted[phase as usize].as_secs_f64().max(0.001)
    }
}

/// Dollars per million tokens of every mock model: one micro-dollar per prompt token, two per
/// completion token, so the clients can price their own answers exactly.
const PRICES: &str = "{ provider: mock, model: \"*\", input: 1.0, output: 2.0 }";

/// The running Redis of a [`Topology`].
enum SharedRedis {
    Cluster(RedisCluster),
    Sentinel(RedisSentinels),
}

impl SharedRedis {
    fn start(topology: Topology) -> SharedRedis {
        match topology {
            Topology::Cluster => SharedRedis::Cluster(RedisCluster::start(3, 1)),
            Topology::Sentinel => SharedRedis::Sentinel(RedisSentinels::start()),
        }
    }

    /// The `redis:` settings that reach it.
    fn yaml(&self) -> String {
        match self {
            SharedRedis::Cluster(c) => format!("cluster: {}", yaml_list(&c.urls())),
            SharedRedis::Sentinel(s) => format!(
                "sentinel: {{ master: {}, nodes: {} }}",
                RedisSentinels::MASTER,
                yaml_list(&s.urls())
            ),
        }
    }

    /// Primaries a node sees when all is well.
    fn primaries(&self) -> usize {
        match self {
            SharedRedis::Cluster(_) => 3,
            SharedRedis::Sentinel(_) => 1,
        }
    }

    /// Keys matching `pattern` on the primaries, with the port holding each.
    fn keys(&self, pattern: &str) -> Vec<(u16, String)> {
        match self {
            SharedRedis::Cluster(c) => c.keys(pattern),
            SharedRedis::Sentinel(s) => {
                let Some(port) = s.master_now() else {
                    return Vec::new();
                };
                redis_cli(&["-p", &port.to_string(), "--scan", "--pattern", pattern])
                    .lines()
                    .map(|k| (port, k.to_string()))
                    .collect()
            }
        }
    }

    /// Waits until the replicas hold what was written so far.
    fn replicated(&self) {
        match self {
            SharedRedis::Cluster(c) => c.wait_replicas_synced(Duration::from_secs(10)),
            SharedRedis::Sentinel(s) => {
                let replica = s.replica_port.to_string();
                redis_cli(&["-p", &replica, "wait", "0", "0"]);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// The server that dies: the primary holding the budgets, or the master.
    fn victim(&self) -> u16 {
        match self {
            SharedRedis::Cluster(c) => c.primary_holding("*budgets*"),
            SharedRedis::Sentinel(s) => s.master_now().unwrap_or(s.master_port),
        }
    }

    /// SIGKILLs the server on `port` once its replica holds every write it acknowledged: its
    /// writes are paused (they wait, and time out at the nodes) until the replica has caught
    /// up. Redis replicates asynchronously, so writes a primary acknowledged in its last
    /// milliseconds can die with it; that loss is Redis's own guarantee, not what this
    /// scenario measures (the fleet's accounting is, to the micro-dollar).
    fn kill(&mut self, port: u16) {
        let p = port.to_string();
        redis_cli(&["-p", &p, "client", "pause", "10000", "write"]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !caught_up(&redis_cli(&["-p", &p, "info", "replication"]))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        match self {
            SharedRedis::Cluster(c) => c.kill(port),
            SharedRedis::Sentinel(s) => s.kill(port),
        }
    }

    /// Whether Redis itself has replaced `victim`: a check that holds only ports, so that it
    /// can run while the kill holds `self`.
    fn recovered(&self, victim: u16) -> Box<dyn Fn() -> bool> {
        match self {
            SharedRedis::Cluster(c) => {
                let live = c.primaries().into_iter().find(|p| *p != victim);
                let live = live.expect("another primary");
                Box::new(move || RedisCluster::failed_over(live, victim))
            }
            SharedRedis::Sentinel(s) => {
                let watcher = s.sentinel_ports[0].to_string();
                Box::new(move || {
                    let answer = redis_cli(&[
                        "-p",
                        &watcher,
                        "sentinel",
                        "get-master-addr-by-name",
                        RedisSentinels::MASTER,
                    ]);
                    let now = answer.lines().nth(1).map(str::trim);
                    now.is_some_and(|p| p != victim.to_string())
                })
            }
        }
    }
}

/// Whether a primary's `INFO replication` shows its replica at the primary's own offset.
fn caught_up(info: &str) -> bool {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let primary = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let replica = info
        .lines()
        .find(|l| l.starts_with("slave0:"))
        .and_then(|l| field(l, "offset="));
    primary.is_some() && primary == replica
}

fn config(mock: &MockUpstream, redis: &SharedRedis) -> String {
    let limited = limited_keys(&["before", "during", "after"]);
    let paying = keys_yaml(
        &["mixed", "doomed", "jobs"],
        "budget: { usd_per_day: 100 }, limits: { tokens_per_day: 100000000 }",
    );
    format!(
        r#"
server: {{ threads: 2 }}
redis: {{ {redis}, timeout: 200ms, on_redis_error: fail_open }}
keys:
{limited}{paying}prices:
  - {PRICES}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
  - {{ model: embed, targets: [ {{ provider: mock, model: up-embed }} ] }}
  - {{ model: cached, targets: [ {{ provider: mock, model: up }} ], cache: {{ ttl: 10m }} }}
cache: {{ redis: true }}
usage: {{ flush_interval: 200ms }}
jobs: {{ workers: 2, visibility_timeout: 2s, max_attempts: 4, max_queued_per_key: 1000 }}
"#,
        redis = redis.yaml(),
        base = mock.base_url()
    )
}

/// Sends `sk-mixed` requests one after another to the nodes in `live`, each kind in turn,
/// until `stop`; records what each got.
async fn client(
    id: usize,
    live: Arc<Mutex<Vec<SocketAddr>>>,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    cached: usize,
    out: Arc<Mutex<Vec<Outcome>>>,
) {
    let kinds = [Kind::Chat, Kind::Stream, Kind::Embeddings, Kind::Cached];
    let mut i = id;
    while !stop.load(Ordering::Relaxed) {
        let node = {
            let live = live.lock().unwrap();
            live[i % live.len()]
        };
        let kind = kinds[i % kinds.len()];
        let phase = phase_of(phase.load(Ordering::Relaxed));
        let outcome = one(
            node,
            "sk-mixed",
            kind,
            &format!("c{id}-{i}"),
            i % cached,
            phase,
        )
        .await;
        out.lock().unwrap().push(outcome);
        i += 1;
    }
}

fn phase_of(n: u8) -> Phase {
    match n {
        0 => Phase::Before,
        1 => Phase::During,
        _ => Phase::After,
    }
}

/// One request of `kind` as `key` to `node`, and what came back.
async fn one(
    node: SocketAddr,
    key: &str,
    kind: Kind,
    words: &str,
    cached: usize,
    phase: Phase,
) -> Outcome {
    let (path, body) = match kind {
        Kind::Chat => ("/v1/chat/completions", chat("fast", words)),
        Kind::Stream => (
            "/v1/chat/completions",
            chat_with(
                "fast",
                words,
                json!({"stream": true, "stream_options": {"include_usage": true}, "mock_chunks": 3}),
            ),
        ),
        Kind::Embeddings => (
            "/v1/embeddings",
            json!({"model": "embed", "input": [words, "and another"]}),
        ),
        Kind::Cached => (
            "/v1/chat/completions",
            // Deterministic (temperature 0): cacheable under the default policy.
            chat_with(
                "cached",
                &format!("cached prompt {cached}"),
                json!({"temperature": 0}),
            ),
        ),
    };
    let started = Instant::now();
    let auth = bearer(key);
    let answer = match Client::connect(node).await {
        Ok(mut c) => c
            .post_json(path, &[("authorization", &auth)], &body)
            .await
            .ok(),
        Err(_) => None,
    };
    let took = started.elapsed();
    let mut outcome = Outcome {
        phase,
        kind,
        status: answer.as_ref().map_or(0, |r| r.status),
        whole: false,
        hit: false,
        tokens: 0,
        cost: 0,
        took,
    };
    let Some(r) = answer.filter(|r| r.status == 200) else {
        return outcome;
    };
    outcome.hit = r.header("x-lumen-cache") == Some("hit");
    let usage = match kind {
        Kind::Stream => {
            let data = r.sse_data();
            outcome.whole = data.last().is_some_and(|d| d == "[DONE]");
            data.iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find(|v| v["usage"].is_object())
                .map(|v| v["usage"].clone())
        }
        _ => serde_json::from_slice::<Value>(&r.body)
            .ok()
            .map(|v| v["usage"].clone()),
    };
    if let Some(usage) = usage.filter(Value::is_object) {
        outcome.whole = outcome.whole || kind != Kind::Stream;
        if !outcome.hit {
            let n = |f: &str| usage[f].as_u64().unwrap_or(0);
            outcome.tokens = n("total_tokens");
            outcome.cost = n("prompt_tokens") + 2 * n("completion_tokens");
        }
    }
    outcome
}

/// Runs the whole scenario against `mock`.
pub async fn run(scale: &Scale, mock: &MockUpstream) -> Report {
    let mut redis = SharedRedis::start(scale.topology);
    let yaml = config(mock, &redis);
    let a = Lumen::start(&yaml);
    let b = Lumen::start(&yaml);
    let mut c = Lumen::start(&yaml);
    let _worker = Worker::start(&yaml);
    let primaries = redis.primaries();
    topology_until(a.admin, |t| primaries_up(t) == primaries).await;

    // Cached answers, stored before anything dies (and copied to the replicas); the cache is
    // the key's own, so `sk-mixed` stores them, and pays for them like any other request.
    let mut stored = Vec::new();
    for j in 0..scale.cached {
        let o = one(a.addr, "sk-mixed", Kind::Cached, "", j, Phase::Before).await;
        assert!(o.status == 200 && !o.hit, "{o:?}");
        stored.push(o);
    }
    redis.replicated();
    let entries = redis.keys("*cache*");

    away_from_minute_boundary().await;
    let started = Instant::now();
    let before = chat_burst(&[a.addr, b.addr, c.addr], "sk-before", 3 * N).await;
    let limit_before = (before, started.elapsed());

    // Traffic: `sk-mixed` on the nodes that stay up, `sk-doomed` on the one that dies.
    let live = Arc::new(Mutex::new(vec![a.addr, b.addr]));
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(stored));
    let clients: Vec<_> = (0..scale.clients)
        .map(|id| {
            tokio::spawn(client(
                id,
                live.clone(),
                phase.clone(),
                stop.clone(),
                scale.cached,
                outcomes.clone(),
            ))
        })
        .collect();
    let doomed = {
        let (node, stop) = (c.addr, stop.clone());
        tokio::spawn(async move {
            let (mut sent, mut answered) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let kind = [Kind::Chat, Kind::Stream][sent % 2];
                let o = one(
                    node,
                    "sk-doomed",
                    kind,
                    &format!("d{sent}"),
                    0,
                    Phase::Before,
                )
                .await;
                sent += 1;
                answered += usize::from(o.status != 0);
                if o.status == 0 {
                    // Its node is gone: nothing more to send there.
                    break;
                }
            }
            (sent, answered)
        })
    };
    let traffic_started = Instant::now();
    tokio::time::sleep(scale.steady).await;

    // Jobs, some of them running on the node about to die.
    let mut ids = Vec::new();
    for i in 0..scale.jobs {
        let node = [a.addr, b.addr, c.addr][i % 3];
        let job = chat_job(
            "fast",
            &format!("job-{i}"),
            json!({"mock_chunks": 4, "mock_delay_ms": 150}),
        );
        let v = as_key(node, "POST", "/v1/jobs", "sk-jobs", Some(&job))
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

    // The primary holding the budgets dies, node c is SIGKILLed, node b reloads.
    let victim = redis.victim();
    let on_victim = entries.iter().filter(|(port, _)| *port == victim).count();
    let recovered = redis.recovered(victim);
    phase.store(1, Ordering::Relaxed);
    let killed = Instant::now();
    let survivors = [(a.addr, a.admin), (b.addr, b.admin)];
    let b_pid = b.pid();
    let failover = traffic_through_failover(
        &survivors,
        || {
            c.kill();
            redis.kill(victim);
            unsafe { libc::kill(b_pid as i32, libc::SIGHUP) };
        },
        recovered,
    )
    .await;
    phase.store(2, Ordering::Relaxed);
    let quiet = Instant::now();
    // Node c comes back and takes traffic again.
    c = Lumen::start(&yaml);
    live.lock().unwrap().push(c.addr);
    tokio::time::sleep(scale.steady).await;
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let lasted = [killed - traffic_started, quiet - killed, stopped - quiet];
    for t in clients {
        t.await.unwrap();
    }
    let doomed = doomed.await.unwrap();

    away_from_minute_boundary().await;
    let started = Instant::now();
    let after = chat_burst(&[a.addr, b.addr, c.addr], "sk-after", 3 * N).await;
    let limit_after = (after, started.elapsed());

    // Every job ends, with one result, read on another node than it was submitted to.
    let mut jobs = Vec::new();
    for id in &ids {
        let done = wait_job(a.addr, "sk-jobs", id, Duration::from_secs(90)).await;
        let path = format!("/v1/jobs/{id}/events");
        let events = as_key(b.addr, "GET", &path, "sk-jobs", None).await.text();
        jobs.push((done, events.matches("event: result\n").count()));
    }
    let mut calls: HashMap<String, usize> = HashMap::new();
    for r in mock.requests() {
        if let Some(content) = r.json()["messages"][0]["content"].as_str() {
            if content.starts_with("job-") {
                *calls.entry(content.to_string()).or_default() += 1;
            }
        }
    }
    let jobs_rerun = calls.values().filter(|n| **n > 1).count();

    // The totals, once every settle sent again after the failover has landed.
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let answered = outcomes.iter().filter(|o| o.status == 200).count() as u64;
    let want: u64 = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .map(|o| o.cost)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (budget_used, budget_reserved, ledger) = loop {
        let day = &budget(&a, "key", "mixed").await["windows"][0];
        let (used, reserved) = (micros(&day["used_usd"]), micros(&day["reserved_usd"]));
        let ledger = admin_at(a.admin, "/admin/usage?key=mixed").await["total"].clone();
        let counted = ledger["requests"].as_u64().unwrap_or(0);
        let settled = used as u64 == want && reserved == 0 && counted == answered;
        if settled || Instant::now() > deadline {
            break (used.max(0) as u64, reserved.max(0) as u64, ledger);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settled_after = stopped.elapsed();
    let tokens_used = redis
        .keys("*mixed*tok:86400000")
        .first()
        .map(|(port, key)| {
            let u = redis_cli(&["-p", &port.to_string(), "HGET", key, "u"]);
            u.trim().parse().unwrap_or(0)
        })
        .unwrap_or(0);
    Report {
        limit_before,
        limit_after,
        failover,
        outcomes,
        doomed,
        cached: (entries.len(), on_victim),
        jobs,
        jobs_rerun,
        budget_used,
        budget_reserved,
        tokens_used,
        ledger,
        settled_after,
        lasted,
    }
}
