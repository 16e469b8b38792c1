//! Every feature that keeps state in Redis, run on a real Redis Cluster (three primaries,
//! made by `redis-cli --cluster create`) through two real `lumen` nodes: limits, token windows,
//! provider quotas, budgets, the cache (one key and many), the usage ledger, stored responses,
//! jobs (with their event streams), files and batches. Each script and pipeline must stay in
//! one hash slot: a CROSSSLOT error anywhere fails a request here, or shows in
//! `lumen_redis_errors_total{op}`, which must stay at zero. Reads go to the node that did not
//! write, so a pass proves the state went through Redis.

use std::net::SocketAddr;
use std::time::Duration;

use lumen_test_support::batch::{call, chat_line, create, file_lines, upload, wait_final};
use lumen_test_support::client::{request, Client};
use lumen_test_support::harness::RedisCluster;
use lumen_test_support::keyed::{
    admin, as_key, budget, by_op, event_deltas, micros, primaries_up, topology_until, wait_job,
    yaml_list,
};
use lumen_test_support::openai::{chat, chat_job, chat_with, message_content};
use lumen_test_support::{Lumen, MockUpstream};
use serde_json::{json, Value};

/// The caller in every step.
const K: &str = "sk-cluster";

/// Every Redis-backed feature at once. `redis` is the whole `redis:` line; `upstream` the mock's
/// base URL.
fn config(upstream: &str, redis: &str) -> String {
    // The `sha256:` form of a key, as `lumen keys hash` prints it.
    let hashed = lumen_plugins::auth::hash_key("sk-cluster-hashed");
    format!(
        r#"
server: {{ threads: 2, watch_config: false }}
{redis}
limits:
  per_ip: {{ requests_per_minute: 6000 }}
keys:
  - id: cluster
    key: "sk-cluster"
    tenant: acme
    limits: {{ requests_per_minute: 600, burst: 600, concurrent_requests: 8, tokens_per_minute: 200000, tokens_per_day: 2000000 }}
    budget: {{ usd_per_day: 10, usd_per_month: 100, alert_at: 0.9 }}
  - {{ id: hashed, sha256: "{hashed}", limits: {{ requests_per_minute: 600 }} }}
  - {{ id: narrow, key: "sk-narrow", limits: {{ concurrent_requests: 1 }} }}
  - {{ id: tight, key: "sk-tight", limits: {{ requests_per_minute: 3, burst: 3 }} }}
tenants:
  acme: {{ budget: {{ usd_per_day: 10 }} }}
prices:
  - {{ provider: mock, model: "*", input: 1.0, output: 2.0 }}
providers:
  mock: {{ base_url: "{upstream}", health: {{ enabled: false }}, quota: {{ requests_per_minute: 100000, tokens_per_minute: 100000000 }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: up }} ]
    limits: {{ requests_per_minute: 6000 }}
  - model: cached
    targets: [ {{ provider: mock, model: up }} ]
    cache: {{ ttl: 10m }}
  - model: embed
    targets: [ {{ provider: mock, model: up-embed }} ]
    cache: {{ ttl: 10m }}
cache: {{ redis: true }}
usage: {{ enabled: true, flush_interval: 200ms }}
responses: {{ store_ttl: 1h }}
jobs: {{ workers: 2 }}
batches: {{ concurrency: 2 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_redis_feature_runs_on_a_cluster() {
    let mock = MockUpstream::start();
    let cluster = RedisCluster::start(3, 0);

    // fail_closed: a Redis error in limits or budgets is a visible refusal, not a quiet
    // fallback to this node's own counts.
    let redis = format!(
        "redis: {{ cluster: {}, timeout: 500ms, on_redis_error: fail_closed }}",
        yaml_list(&cluster.urls())
    );
    let yaml = config(&mock.base_url(), &redis);
    let one = Lumen::start(&yaml);
    let two = Lumen::start(&yaml);
    let seen = topology_until(one.admin, |t| primaries_up(t) == 3).await;
    assert_eq!(seen["topology"]["kind"], "cluster", "{seen}");

    // 1. A chat, non-streamed: limits, quota, tokens, budgets, the ledger.
    let r = one
        .post_chat_as("sk-cluster", &chat("fast", "hello cluster"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(message_content(&r.json()), "mock reply from up");
    assert_eq!(r.header("x-lumen-cost-usd"), Some("0.000015"));
    assert!(
        r.header("x-lumen-budget-remaining-usd").is_some(),
        "budget reserved through Redis"
    );
    assert!(r.header("x-ratelimit-limit-requests").is_some());
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());
    // A key stored as its SHA-256.
    assert_eq!(
        one.chat_status("sk-cluster-hashed", &chat("fast", "hashed"))
            .await,
        200
    );

    // 2. A stream: settled at its end, its slot given back.
    let r = one
        .post_chat_as(
            "sk-cluster",
            &chat_with("fast", "stream please", json!({"stream": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.chat_stream_text(), "tok0 tok1 tok2 "); // mock: 3 chunks by default
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(r.header("x-lumen-cost-usd"), None);

    // 3. A cached chat: node two hits what node one stored.
    let body = chat_with("cached", "cache me", json!({"temperature": 0}));
    let miss = one.post_chat_as("sk-cluster", &body).await;
    assert_eq!(miss.header("x-lumen-cache"), Some("miss"));
    let hit = one.post_chat_as("sk-cluster", &body).await;
    assert_eq!(hit.header("x-lumen-cache"), Some("hit"));
    assert_eq!(hit.header("x-lumen-cost-usd"), Some("0.000000"));
    assert!(hit.header("x-lumen-budget-remaining-usd").is_some());
    // Node two has nothing in memory: a hit there came from Redis. The store happens just after
    // the response, so poll.
    let mut from_redis = None;
    for _ in 0..50 {
        let r = two.post_chat_as("sk-cluster", &body).await;
        if r.header("x-lumen-cache") == Some("hit") {
            from_redis = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        from_redis
            .expect("node two hits what node one stored")
            .json(),
        miss.json()
    );

    // 4. Embeddings, a list: several keys on several slots, read at once.
    let emb = json!({"model": "embed", "input": ["alpha", "beta", "gamma"]});
    let post = |addr: SocketAddr, body: Value| async move {
        Client::connect(addr)
            .await
            .unwrap()
            .post_json(
                "/v1/embeddings",
                &[("authorization", "Bearer sk-cluster")],
                &body,
            )
            .await
            .unwrap()
    };
    let first = post(one.addr, emb.clone()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-lumen-cache"), Some("miss"));
    assert_eq!(first.header("x-lumen-cache-items"), Some("0/3"));
    let vectors: Vec<Value> = first.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].clone())
        .collect();
    assert_eq!(vectors.len(), 3);
    // Same node: a hit (from memory first; a multi-item Redis MGET when memory misses).
    let again = post(one.addr, emb.clone()).await;
    assert_eq!(again.header("x-lumen-cache"), Some("hit"));
    assert_eq!(again.header("x-lumen-cache-items"), Some("3/3"));
    // The Redis check: node two has only Redis to look in. Had node one's items not reached
    // Redis (a pipeline across slots fails as CROSSSLOT), node two would answer "miss", "0/3".
    // Do not poll: each miss on node two would store the items itself, and a later poll would
    // pass even with nothing stored. Wait once for node one's spawned store, then ask once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upstream_before = mock
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/embeddings"))
        .count();
    let hit2 = post(two.addr, emb.clone()).await;
    assert_eq!(hit2.status, 200, "{}", hit2.text());
    assert_eq!(
        hit2.header("x-lumen-cache-items"),
        Some("3/3"),
        "node one's items are in Redis (C3)"
    );
    assert_eq!(hit2.header("x-lumen-cache"), Some("hit"));
    assert_eq!(hit2.json()["data"][2]["embedding"], vectors[2]);
    assert_eq!(
        mock.requests()
            .iter()
            .filter(|r| r.path.ends_with("/embeddings"))
            .count(),
        upstream_before,
        "no embeddings call upstream for node two's request"
    );

    // 5. Stored responses: create, read and continue on the other node, delete.
    let created = as_key(
        one.addr,
        "POST",
        "/v1/responses",
        K,
        Some(&json!({"model": "fast", "input": "hello responses", "store": true})),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    let v = created.json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["store"], true);
    assert_eq!(v["output"][0]["content"][0]["text"], "mock reply from up");
    let id = v["id"].as_str().unwrap().to_string();
    // GET on the OTHER node: it can only come from Redis.
    let got = call(
        two.addr,
        "GET",
        &format!("/v1/responses/{id}"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["id"], id.as_str());
    let items = call(
        two.addr,
        "GET",
        &format!("/v1/responses/{id}/input_items"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(items.status, 200, "{}", items.text());
    assert_eq!(items.json()["object"], "list");
    assert_eq!(
        items.json()["data"][0]["content"][0]["text"],
        "hello responses"
    );
    // Continuation: the stored response read inside the request pipeline.
    let next = as_key(
        two.addr,
        "POST",
        "/v1/responses",
        K,
        Some(&json!({"model": "fast", "input": "and then?", "previous_response_id": id})),
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.json()["previous_response_id"], id.as_str());
    // DELETE, then it is gone on both nodes.
    let del = call(
        one.addr,
        "DELETE",
        &format!("/v1/responses/{id}"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(
        del.json(),
        json!({"id": id, "object": "response", "deleted": true})
    );
    assert_eq!(
        call(
            two.addr,
            "GET",
            &format!("/v1/responses/{id}"),
            K,
            b"",
            true
        )
        .await
        .status,
        404
    );

    // 6. A job: submitted on one node, followed and read on the other; a cancel.
    let s = as_key(
        one.addr,
        "POST",
        "/v1/jobs",
        K,
        Some(&chat_job("fast", "job one", json!({}))),
    )
    .await;
    assert_eq!(s.status, 202, "{}", s.text());
    assert_eq!(s.json()["status"], "queued");
    let job = s.json()["id"].as_str().unwrap().to_string();
    let done = wait_job(two.addr, K, &job, Duration::from_secs(30)).await; // read on the other node: Redis
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 "
    );
    assert_eq!(
        done["metrics"]["cost_usd"].as_f64(),
        Some(13.0 / 1e6),
        "{done}"
    );

    // /events: XRANGE, then XREAD on a dedicated cluster connection.
    let slow = as_key(
        one.addr,
        "POST",
        "/v1/jobs",
        K,
        Some(&chat_job(
            "fast",
            "slow job",
            json!({"mock_chunks": 5, "mock_delay_ms": 50}),
        )),
    )
    .await
    .json();
    let sid = slow["id"].as_str().unwrap();
    let events = call(
        two.addr,
        "GET",
        &format!("/v1/jobs/{sid}/events"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(events.status, 200);
    let text = events.text();
    let deltas = event_deltas(&text);
    assert_eq!(deltas, "tok0 tok1 tok2 tok3 tok4 ", "{text}");
    assert!(text.contains("event: result\n"), "{text}");

    // A cancel.
    let long = as_key(
        one.addr,
        "POST",
        "/v1/jobs",
        K,
        Some(&chat_job(
            "fast",
            "long job",
            json!({"mock_chunks": 50, "mock_delay_ms": 100}),
        )),
    )
    .await
    .json();
    let lid = long["id"].as_str().unwrap().to_string();
    let c = call(one.addr, "DELETE", &format!("/v1/jobs/{lid}"), K, b"", true).await;
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(
        wait_job(one.addr, K, &lid, Duration::from_secs(30)).await["status"],
        "cancelled"
    );

    // /health: jobs on Redis (its queue depth read there).
    let health = request(one.addr, "GET", "/health", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(health["jobs"]["backend"], "redis");
    assert_eq!(health["jobs"]["redis_connected"], true);

    // 7. Files: upload, list, read, delete.
    let small = vec![chat_line("f-1", "fast", json!({}))];
    let up = upload(one.addr, K, &small).await;
    assert_eq!(up.status, 200, "{}", up.text());
    let f = up.json();
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "batch");
    assert_eq!(f["status"], "processed");
    assert_eq!(f["filename"], "batch.jsonl");
    let fid = f["id"].as_str().unwrap().to_string();
    let list = call(two.addr, "GET", "/v1/files", K, b"", true).await;
    assert_eq!(list.status, 200);
    assert!(
        list.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == fid.as_str()),
        "{}",
        list.text()
    );
    let meta = call(two.addr, "GET", &format!("/v1/files/{fid}"), K, b"", true).await;
    assert_eq!(meta.status, 200, "{}", meta.text());
    assert_eq!(meta.json()["id"], fid.as_str());
    let content = call(
        two.addr,
        "GET",
        &format!("/v1/files/{fid}/content"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(content.status, 200);
    assert_eq!(content.text(), small.join("\n") + "\n");
    let del = call(
        one.addr,
        "DELETE",
        &format!("/v1/files/{fid}"),
        K,
        b"",
        true,
    )
    .await;
    assert_eq!(
        del.status,
        200,
        "file delete on a Cluster (F6): {}",
        del.text()
    );
    assert_eq!(
        del.json(),
        json!({"id": fid, "object": "file", "deleted": true})
    );
    assert_eq!(
        call(
            two.addr,
            "GET",
            &format!("/v1/files/{fid}/content"),
            K,
            b"",
            true
        )
        .await
        .status,
        404
    );

    // 8. A batch: created, run by the workers, its output read on the other node.
    let lines: Vec<String> = (0..3)
        .map(|i| chat_line(&format!("b-{i}"), "fast", json!({})))
        .collect();
    let input = upload(one.addr, K, &lines).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let batch = create(two.addr, K, &input).await;
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["request_counts"]["total"], 3);
    let bid = batch["id"].as_str().unwrap().to_string();
    let g = call(one.addr, "GET", &format!("/v1/batches/{bid}"), K, b"", true).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let list = call(one.addr, "GET", "/v1/batches?limit=10", K, b"", true)
        .await
        .json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], bid.as_str());
    let done = wait_final(one.addr, K, &bid, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    assert!(done["error_file_id"].is_null(), "{done}");
    let out = file_lines(two.addr, K, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 3);
    assert_eq!(out["b-1"]["response"]["status_code"], 200);
    assert_eq!(
        out["b-1"]["response"]["body"]["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 "
    );
    // A final batch cannot be cancelled; its input can now be deleted.
    assert_eq!(
        call(
            one.addr,
            "POST",
            &format!("/v1/batches/{bid}/cancel"),
            K,
            b"",
            true
        )
        .await
        .status,
        409
    );
    assert_eq!(
        call(
            one.addr,
            "DELETE",
            &format!("/v1/files/{input}"),
            K,
            b"",
            true
        )
        .await
        .status,
        200
    );

    // 9. Usage and budgets: both nodes read the fleet's totals.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let u1 = admin(&one, "/admin/usage?key=cluster").await;
    let u2 = admin(&two, "/admin/usage?key=cluster").await;
    for u in [&u1, &u2] {
        assert_eq!(u["backend"], "redis", "{u}");
        assert!(u["store_error"].is_null(), "ledger flush/read failed: {u}");
    }
    assert_eq!(
        u1["total"]["requests"], u2["total"]["requests"],
        "both nodes read the fleet's ledger"
    );
    let fast = u1["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "cluster" && r["model"] == "fast")
        .unwrap_or_else(|| panic!("{u1}"));
    assert!(fast["requests"].as_u64().unwrap() >= 3, "{u1}");
    assert!(micros(&u1["total"]["cost_usd"]) > 0);

    let report = admin(&one, "/admin/budgets").await;
    assert_eq!(report["store"], "redis", "{report}");
    let key = budget(&one, "key", "cluster").await;
    assert!(key["error"].is_null(), "{key}"); // set when Redis could not be read
    assert_eq!(key["windows"][0]["period"], "day");
    assert_eq!(key["windows"][1]["period"], "month");
    let used = micros(&key["windows"][0]["used_usd"]);
    assert!(used > 0, "{key}");
    let tenant = budget(&one, "tenant", "acme").await;
    assert!(tenant["error"].is_null(), "{tenant}");
    assert_eq!(
        micros(&tenant["windows"][0]["used_usd"]),
        used,
        "the tenant's only key spent it all"
    );
    assert_eq!(
        micros(&budget(&two, "key", "cluster").await["windows"][0]["used_usd"]),
        used,
        "fleet-wide"
    );

    // 10. Refusals through the shared limiter: a concurrency slot and a request limit.
    // A concurrency cap of 1 held on node one, refused on node two, given back in Redis.
    let slow = json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "hold"}],
                      "mock_chunks": 4, "mock_delay_ms": 300});
    let holder = {
        let (addr, body) = (one.addr, slow.clone());
        tokio::spawn(async move {
            Client::connect(addr)
                .await
                .unwrap()
                .post_json(
                    "/v1/chat/completions",
                    &[("authorization", "Bearer sk-narrow")],
                    &body,
                )
                .await
                .unwrap()
                .status
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(two.chat_status("sk-narrow", &chat("fast", "hi")).await, 429);
    assert_eq!(holder.await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        two.chat_status("sk-narrow", &chat("fast", "hi")).await,
        200,
        "slot given back in Redis"
    );
    // 3 per minute with a burst of 3, shared by both nodes.
    let mut s = Vec::new();
    for (i, node) in [&one, &two, &one, &two].into_iter().enumerate() {
        s.push(
            node.chat_status("sk-tight", &chat("fast", &format!("t{i}")))
                .await,
        );
    }
    assert_eq!(s, [200, 200, 200, 429]);

    // 11. No Redis error on any node, and every feature reached Redis.
    for node in [&one, &two] {
        let errors = by_op(node.admin, "lumen_redis_errors_total").await;
        assert!(
            errors.values().all(|v| *v == 0.0),
            "Redis errors by op: {errors:?}\n{}",
            node.log()
        );
    }
    let calls = by_op(one.admin, "lumen_redis_latency_seconds_count").await;
    // Every operation but the topology query, which needs no request to run.
    for op in lumen::metrics::REDIS_OPS
        .iter()
        .filter(|op| **op != "topology")
    {
        assert!(
            calls.get(*op).copied().unwrap_or(0.0) > 0.0,
            "{op} never called Redis: {calls:?}"
        );
    }
}
