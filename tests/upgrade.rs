//! Zero-downtime binary upgrade: a new `lumen serve --upgrade` takes the listening sockets
//! over from the running one (which gets SIGQUIT) while clients keep sending, and no request
//! fails.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lumen_test_support::client::Client;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::{bin_path, Lumen, MockUpstream};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_new_process_takes_the_sockets_over_without_failing_a_request() {
    let mock = MockUpstream::start();
    let dir = Dir::new("lumen-upgrade");
    let sock = dir.path().join("upgrade.sock");
    let old = Lumen::start(&format!(
        "auth: off\nserver: {{ watch_config: false, grace_period: 2s, upgrade_sock: \"{}\" }}\nproviders:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
        sock.display(),
        mock.base_url()
    ));
    let addr = old.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut c = Client::connect(addr).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match c.post_json("/v1/chat/completions", &[], &body).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status)),
                        // A kept-alive connection the old process closed while idle: like every
                        // HTTP client, retry once on a new connection.
                        Err(_) => match Client::connect(addr).await {
                            Ok(fresh) => {
                                c = fresh;
                                match c.post_json("/v1/chat/completions", &[], &body).await {
                                    Ok(r) if r.status == 200 => ok += 1,
                                    Ok(r) => failed.push(format!("status {}", r.status)),
                                    Err(e) => failed.push(format!("fresh connection: {e}")),
                                }
                            }
                            Err(e) => failed.push(format!("connect: {e}")),
                        },
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = std::fs::File::create(dir.path().join("new.log")).unwrap();
    let mut new = Command::new(bin_path("lumen"))
        .args(["serve", "--upgrade", "--config"])
        .arg(&old.config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The new process waits on the upgrade socket; then the old one hands over and drains.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(old.pid() as i32, libc::SIGQUIT) };
    // Load keeps running until the old process has exited (it drains for a few seconds after
    // handing the sockets over), and a little beyond: by then only the new one answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !exited(old.pid()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old process never exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(failed.is_empty(), "failed during the upgrade: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "{total}");
    // The new process serves on the same port.
    let resp = Client::connect(addr)
        .await
        .unwrap()
        .post_json(
            "/v1/chat/completions",
            &[],
            &json!({"model": "m", "messages": [{"role": "user", "content": "after"}]}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(new.try_wait().unwrap().is_none(), "the new process runs");
    let _ = new.kill();
    let _ = new.wait();
    let text = std::fs::read_to_string(dir.path().join("new.log")).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
}

/// Gone, or a zombie waiting for the test to reap it.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}
