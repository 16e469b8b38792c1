//! Three `lumen serve` nodes and a `lumen worker` on a real Redis Cluster (three primaries, a
//! replica each), and again on a Sentinel-managed master and replica, behave as one gateway
//! while parts of it die: mixed traffic (chat, streams, embeddings, cached answers, jobs) runs
//! while the primary holding the budgets (the master) is killed, a node is SIGKILLed and
//! started again, and another reloads its config (the scenario is
//! `lumen_test_support::chaos`; `benches/fleet.rs` reports its figures at a larger scale).
//!
//! Asserted: no request that had a live node fails, and every stream ends with `[DONE]`; the
//! shared limit admits N ± 1 before and after, and fail-open's excess during the failover is
//! bounded; the dollar budget and the token window in Redis equal what the clients were
//! charged by their answers, and so does the usage ledger (nothing lost to fail-open, nothing
//! counted twice by a resent settle); every job ends with exactly one result; the cache keeps
//! answering from the surviving slots and, once the replica took over, from all of them.

use std::time::Duration;

use lumen_test_support::chaos::{self, Kind, Phase, Report, Scale, Topology};
use lumen_test_support::failover::{allowed, assert_limit};
use lumen_test_support::keyed::micros;
use lumen_test_support::MockUpstream;

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_stays_one_gateway_while_a_cluster_primary_a_node_and_a_config_change() {
    let scale = Scale {
        topology: Topology::Cluster,
        clients: 4,
        jobs: 24,
        cached: 12,
        steady: Duration::from_secs(2),
    };
    let mock = MockUpstream::start();
    let report = chaos::run(&scale, &mock).await;
    check(&scale, &report);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_stays_one_gateway_while_the_sentinel_master_a_node_and_a_config_change() {
    let scale = Scale {
        topology: Topology::Sentinel,
        clients: 4,
        jobs: 12,
        cached: 6,
        steady: Duration::from_secs(2),
    };
    let mock = MockUpstream::start();
    let report = chaos::run(&scale, &mock).await;
    check(&scale, &report);
}

fn check(scale: &Scale, report: &Report) {
    let f = &report.failover;
    let (answered, tokens, cost) = report.charged();
    let count = |phase: Phase, ok: fn(&chaos::Outcome) -> bool| {
        report.of(Some(phase)).filter(|o| ok(o)).count()
    };
    eprintln!(
        "FIGURES fleet chaos ({:?}): redis recovered in {:?}, nodes' service in {:?}; sk-mixed {} requests ({} before, {} during, {} after), {} failed; doomed node {:?}; jobs {} ({} run twice upstream); cache {:?} (entries, on the dead primary), hits during {}/{}; totals settled {:?} after traffic stopped: budget {} µ$ (reserved {}), tokens {}, ledger {}; clients charged {answered} answers, {tokens} tokens, {cost} µ$",
        scale.topology,
        f.redis_recovered,
        f.service_recovered,
        report.outcomes.len(),
        count(Phase::Before, |_| true),
        count(Phase::During, |_| true),
        count(Phase::After, |_| true),
        report.of(None).filter(|o| o.status != 200).count(),
        report.doomed,
        report.jobs.len(),
        report.jobs_rerun,
        report.cached,
        count(Phase::During, |o| o.hit),
        count(Phase::During, |o| o.kind == Kind::Cached),
        report.settled_after,
        report.budget_used,
        report.budget_reserved,
        report.tokens_used,
        report.ledger,
    );

    // No request with a live node to go to failed; every answer was whole.
    let failed: Vec<_> = report.of(None).filter(|o| o.status != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let broken: Vec<_> = report.of(None).filter(|o| !o.whole).collect();
    assert!(
        broken.is_empty(),
        "answers without usage or [DONE]: {broken:?}"
    );
    for phase in [Phase::Before, Phase::During, Phase::After] {
        for kind in [Kind::Chat, Kind::Stream, Kind::Embeddings, Kind::Cached] {
            assert!(
                report.of(Some(phase)).any(|o| o.kind == kind),
                "no {kind:?} traffic {phase:?} the failover"
            );
        }
    }
    assert_eq!(f.failed, 0, "no limited request failed during the failover");

    // The shared limit: N ± 1 before and after; fail-open's excess bounded during.
    assert_limit(&report.limit_before.0, report.limit_before.1, "before");
    assert_limit(&report.limit_after.0, report.limit_after.1, "after");
    let bound = allowed(f.service_recovered + Duration::from_secs(3)) * 3;
    assert!(
        f.admitted <= bound,
        "{} admitted, bound {bound}",
        f.admitted
    );

    // Money and tokens: what Redis settled is what the answers reported, and so is the ledger.
    assert_eq!(report.budget_reserved, 0, "nothing left reserved");
    assert_eq!(
        report.budget_used, cost,
        "dollar budget = the answers' cost"
    );
    assert_eq!(
        report.tokens_used, tokens,
        "token window = the answers' tokens"
    );
    let ledger = &report.ledger;
    assert_eq!(ledger["requests"].as_u64(), Some(answered), "{ledger}");
    assert_eq!(micros(&ledger["cost_usd"]) as u64, cost, "{ledger}");

    // Jobs: each ends once, with its answer, including those running on the killed node.
    for (done, results) in &report.jobs {
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(
            done["result"]["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 ",
            "{done}"
        );
        assert_eq!(*results, 1, "one result event: {done}");
    }

    // The cache keeps answering hits while a primary is down (from each node's memory tier and
    // the slots that kept their primary), and from every entry once the replica took over.
    let (entries, _on_victim) = report.cached;
    assert_eq!(entries, scale.cached, "one entry per cached prompt");
    assert!(
        report
            .of(Some(Phase::During))
            .any(|o| o.kind == Kind::Cached && o.hit),
        "no cache hit while a primary was down"
    );
    let after: Vec<_> = report
        .of(Some(Phase::After))
        .filter(|o| o.kind == Kind::Cached)
        .collect();
    assert!(after.iter().all(|o| o.hit), "{after:?}");
}
