use super::*;
use crate::config::snapshot::UsageSettings;

fn settings(dir: &std::path::Path) -> UsageSettings {
    UsageSettings {
        enabled: true,
        state_dir: dir.to_path_buf(),
        flush_interval: Duration::from_secs(10),
        retention_days: 30,
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lumen-ledger-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn event<'a>(key: &'a str, provider: &'a str, model: &'a str) -> Event<'a> {
    Event {
        key,
        tenant: "",
        provider,
        model,
        prompt_tokens: 7,
        completion_tokens: 4,
        cost_micros: 10,
        error: false,
        cache_hit: false,
    }
}

fn totals(report: &Report) -> Counts {
    let mut all = Counts::default();
    for (_, c) in &report.rows {
        all.add(c);
    }
    all
}

#[tokio::test]
async fn counts_per_row_and_filters() {
    let dir = temp_dir("filters");
    let ledger = Ledger::new(&settings(&dir), None);
    ledger.record(&event("a", "openai", "gpt"));
    ledger.record(&event("a", "openai", "gpt"));
    ledger.record(&Event {
        error: true,
        ..event("a", "groq", "gpt")
    });
    ledger.record(&Event {
        cache_hit: true,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_micros: 0,
        tenant: "acme",
        ..event("b", "openai", "gpt")
    });
    let all = ledger.query(&Filter::default()).await;
    assert_eq!(all.rows.len(), 3);
    let t = totals(&all);
    assert_eq!(
        (t.requests, t.prompt_tokens, t.completion_tokens),
        (4, 21, 12)
    );
    assert_eq!((t.errors, t.cache_hits, t.cost_micros), (1, 1, 30));
    let acme = ledger
        .query(&Filter {
            tenant: Some("acme".into()),
            ..Filter::default()
        })
        .await;
    assert_eq!(acme.rows.len(), 1);
    assert_eq!(&*acme.rows[0].0.key, "b");
    let a = ledger
        .query(&Filter {
            key: Some("a".into()),
            provider: Some("openai".into()),
            ..Filter::default()
        })
        .await;
    assert_eq!(a.rows.len(), 1);
    assert_eq!(a.rows[0].1.requests, 2);
    let yesterday = ledger
        .query(&Filter {
            from: Some(Day::today().minus(1)),
            to: Some(Day::today().minus(1)),
            ..Filter::default()
        })
        .await;
    assert!(yesterday.rows.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_flushed_file_survives_a_new_ledger_and_two_writers_add_up() {
    let dir = temp_dir("file");
    let first = Ledger::new(&settings(&dir), None);
    let second = Ledger::new(&settings(&dir), None);
    for _ in 0..3 {
        first.record(&event("a", "openai", "gpt"));
    }
    second.record(&event("a", "openai", "gpt"));
    // Before any flush, each sees its own counts.
    assert_eq!(totals(&first.query(&Filter::default()).await).requests, 3);
    first.flush().await.unwrap();
    second.flush().await.unwrap();
    // Flushing twice adds nothing more.
    first.flush().await.unwrap();
    let restarted = Ledger::new(&settings(&dir), None);
    let t = totals(&restarted.query(&Filter::default()).await);
    assert_eq!((t.requests, t.prompt_tokens, t.cost_micros), (4, 28, 40));
    let text = std::fs::read_to_string(dir.join("usage.json")).unwrap();
    assert!(text.contains(&Day::today().to_string()), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_unwritable_store_keeps_counts_in_memory_and_spools_them() {
    let dir = temp_dir("spool");
    // A file where the directory should be: every write fails.
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    let ledger = Ledger::new(&settings(&blocked), None);
    ledger.record(&event("a", "openai", "gpt"));
    assert!(ledger.flush().await.is_err());
    let report = ledger.query(&Filter::default()).await;
    assert_eq!(totals(&report).requests, 1, "still counted in memory");
    assert!(report.store_error.is_some());
    // A store that fails at shutdown spools; the next start sends the spool.
    let good = Ledger::new(&settings(&dir), None);
    good.record(&event("a", "openai", "gpt"));
    good.store
        .spool(&{
            let mut b = Batch::new();
            for s in good.shards.iter() {
                s.lock().unwrap().drain_into(&mut b);
            }
            b
        })
        .unwrap();
    let next = Ledger::new(&settings(&dir), None);
    assert!(!dir.join("usage-spool.json").exists());
    next.flush().await.unwrap();
    let t = totals(&next.query(&Filter::default()).await);
    assert_eq!(t.requests, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_shard_counts_new_rows_under_other() {
    let dir = temp_dir("full");
    let ledger = Ledger::new(&settings(&dir), None);
    let models: Vec<String> = (0..MAX_ROWS_PER_SHARD + 5)
        .map(|i| format!("m{i}"))
        .collect();
    for m in &models {
        ledger.record(&event("a", "p", m));
    }
    let mut batch = Batch::new();
    for s in ledger.shards.iter() {
        s.lock().unwrap().drain_into(&mut batch);
    }
    assert_eq!(batch.len(), MAX_ROWS_PER_SHARD + 1);
    let other = batch.iter().find(|(k, _)| &*k.model == "_other").unwrap();
    assert_eq!(other.1.requests, 5);
    std::fs::remove_dir_all(dir).unwrap();
}
