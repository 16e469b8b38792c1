//! The fleet while parts of it die, at a larger scale than its test (`tests/fleet_chaos.rs`):
//! three `lumen serve` nodes and a `lumen worker` on a real Redis Cluster (three primaries, a
//! replica each), mixed traffic (chat, streams, embeddings, cached answers, jobs) while the
//! primary holding the budgets dies, a node is SIGKILLed and started again, and another reloads.
//!
//! Figures, from one run: the time from the primary's death until Redis and then the nodes'
//! Redis calls recovered; answered requests per second during the failover and after, as
//! ratios to before (same run, same machine); p50/p99 latency the same way; failed requests;
//! jobs run twice upstream; and whether the dollar budget, the token window and the usage
//! ledger equal what the clients were charged, and how long after the traffic they settled.
//!
//! Run: `cargo bench --bench fleet` (`LUMEN_BENCH_CLIENTS`, default 16; `LUMEN_BENCH_STEADY`
//! seconds before and after, default 5).

use std::time::Duration;

use lumen_test_support::chaos::{self, Outcome, Phase, Report, Scale, Topology};
use lumen_test_support::keyed::micros;
use lumen_test_support::MockUpstream;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `q` quantile of the latencies of `phase`'s answered requests.
fn latency(report: &Report, phase: Phase, q: f64) -> Duration {
    let mut took: Vec<Duration> = report
        .of(Some(phase))
        .filter(|o| o.status == 200)
        .map(|o: &Outcome| o.took)
        .collect();
    took.sort();
    took.get(((took.len() as f64 - 1.0) * q).round().max(0.0) as usize)
        .copied()
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    for topology in [Topology::Cluster, Topology::Sentinel] {
        let scale = Scale {
            topology,
            clients: env("LUMEN_BENCH_CLIENTS", 16) as usize,
            jobs: 120,
            cached: 50,
            steady: Duration::from_secs(env("LUMEN_BENCH_STEADY", 5)),
        };
        let mock = MockUpstream::start();
        let report = chaos::run(&scale, &mock).await;
        print(&scale, &report);
    }
}

fn print(scale: &Scale, report: &Report) {
    let f = &report.failover;
    let before = report.rate(Phase::Before);
    let ratio = |v: f64| v / before.max(0.001);
    let (answered, tokens, cost) = report.charged();
    let failed = report.of(None).filter(|o| o.status != 200).count();
    println!("fleet chaos: 3 nodes + 1 worker, {scale:?}");
    println!(
        "  failover: redis recovered {:.2} s, nodes' service {:.2} s; sk-during {} requests, {} failed, {} admitted by a shared 30/min (fail-open)",
        f.redis_recovered.as_secs_f64(),
        f.service_recovered.as_secs_f64(),
        f.requests,
        f.failed,
        f.admitted
    );
    println!(
        "  answered/s: before {before:.0} (2 nodes; the third takes the doomed traffic); during {:.2}x (2 nodes, {:.1} s from the kill until calls were quiet for 2 s); after {:.2}x (the third back once started)",
        ratio(report.rate(Phase::During)),
        report.lasted[1].as_secs_f64(),
        ratio(report.rate(Phase::After)),
    );
    for q in [0.5, 0.99] {
        let base = latency(report, Phase::Before, q).as_secs_f64().max(1e-6);
        println!(
            "  p{:.0}: before {:.1} ms; during {:.2}x; after {:.2}x",
            q * 100.0,
            base * 1e3,
            latency(report, Phase::During, q).as_secs_f64() / base,
            latency(report, Phase::After, q).as_secs_f64() / base,
        );
    }
    println!(
        "  requests {} (failed {failed}); on the killed node {:?} (sent, answered)",
        report.outcomes.len(),
        report.doomed
    );
    let once = report
        .jobs
        .iter()
        .all(|(d, n)| d["status"] == "completed" && *n == 1);
    println!(
        "  jobs {}: each completed with one result: {once}; {} run twice upstream",
        report.jobs.len(),
        report.jobs_rerun
    );
    let ledger = &report.ledger;
    println!(
        "  totals (settled {:.2} s after traffic): budget {} µ$ vs charged {cost} ({}); tokens {} vs {tokens} ({}); ledger {} requests / {} µ$ vs {answered} / {cost}",
        report.settled_after.as_secs_f64(),
        report.budget_used,
        if report.budget_used == cost { "equal" } else { "DIFFERENT" },
        report.tokens_used,
        if report.tokens_used == tokens { "equal" } else { "DIFFERENT" },
        ledger["requests"],
        micros(&ledger["cost_usd"]),
    );
}
