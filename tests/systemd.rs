//! Lumen under systemd: the shipped units verify, the readiness protocol (`Type=notify`) is
//! spoken, and SIGTERM drains streams in flight instead of cutting them.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lumen_test_support::client::Client;
use lumen_test_support::harness::tempdir::Dir;
use lumen_test_support::{bin_path, Lumen, MockUpstream};
use serde_json::json;

fn units_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").leak()
}

#[test]
fn the_units_verify() {
    let dir = Dir::new("lumen-units");
    let bin_dir = bin_path("lumen");
    let bin_dir = bin_dir.parent().unwrap().display().to_string();
    // The units name /usr/local/bin; verify them against the binaries just built.
    for (file, as_name) in [
        ("lumen.service", "lumen.service"),
        ("lumen-llama@.service", "lumen-llama@smollm2.service"),
    ] {
        let text = std::fs::read_to_string(units_dir().join(file)).unwrap();
        assert!(
            text.contains("[Unit]") && text.contains("[Service]") && text.contains("[Install]")
        );
        assert!(text.contains("ExecStart=/usr/local/bin/"));
        std::fs::write(
            dir.path().join(as_name),
            text.replace("/usr/local/bin", &bin_dir),
        )
        .unwrap();
    }
    let unit = std::fs::read_to_string(units_dir().join("lumen.service")).unwrap();
    for needed in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(needed), "lumen.service lacks {needed}");
    }
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("lumen.service"))
        .arg(dir.path().join("lumen-llama@smollm2.service"))
        .output()
    else {
        eprintln!("systemd-analyze is not installed: checked the units' structure only");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // It also reports unknown keys and bad values on stderr without failing: none allowed.
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("lumen")).collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a message from lumen");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_reload_and_stop_are_announced_to_systemd() {
    let mock = MockUpstream::start();
    let dir = Dir::new("lumen-notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let lumen = Lumen::start_with_env(
        &format!(
            "auth: off\nproviders:\n  mock: {{ base_url: \"{}\" }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
            mock.base_url()
        ),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    assert_eq!(recv(&socket), "READY=1");
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGHUP) };
    let reloading = recv(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(recv(&socket), "READY=1");
    // SAFETY: as above.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGTERM) };
    assert_eq!(recv(&socket), "STOPPING=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_streams_in_flight_finish() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&format!(
        "auth: off\nserver: {{ grace_period: 10s }}\nproviders:\n  mock: {{ base_url: \"{}\" }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
        mock.base_url()
    ));
    let addr = lumen.addr;
    let stream = tokio::spawn(async move {
        let body = json!({"model": "m", "stream": true, "mock_chunks": 10, "mock_delay_ms": 150,
                          "messages": [{"role": "user", "content": "a long answer"}]});
        Client::connect(addr)
            .await
            .unwrap()
            .post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopped_at = Instant::now();
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGTERM) };
    let resp = stream.await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.sse_data().last().map(String::as_str),
        Some("[DONE]"),
        "the stream finished after SIGTERM"
    );
    assert_eq!(resp.chat_stream_text().split_whitespace().count(), 10);
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_longer_than_the_grace_period_end_with_an_error_event_not_silently() {
    let mock = MockUpstream::start();
    let mut lumen = Lumen::start(&format!(
        "auth: off\nserver: {{ grace_period: 2s }}\nproviders:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
        mock.base_url()
    ));
    let addr = lumen.addr;
    let streams: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                // 40 chunks 200 ms apart: 8 s, far past the 2 s grace period.
                let body = json!({"model": "m", "stream": true, "mock_chunks": 40, "mock_delay_ms": 200,
                                  "messages": [{"role": "user", "content": "a very long answer"}]});
                Client::connect(addr)
                    .await
                    .unwrap()
                    .post_json("/v1/chat/completions", &[], &body)
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_at = Instant::now();
    let status = lumen.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let exited_after = stopped_at.elapsed();
    assert!(
        exited_after < Duration::from_secs(4),
        "exits once its streams ended, not long after the grace period: {exited_after:?}"
    );
    for stream in streams {
        // A complete chunked response (the client read it to its end), whose last event says
        // why it stopped.
        let resp = stream.await.unwrap().expect("a cleanly ended response");
        assert_eq!(resp.status, 200);
        let last = resp.sse_data().last().cloned().unwrap_or_default();
        let event: serde_json::Value = serde_json::from_str(&last)
            .unwrap_or_else(|_| panic!("last event is JSON: {}", resp.text()));
        assert_eq!(
            event["error"]["code"],
            "server_shutting_down",
            "{}",
            resp.text()
        );
        assert!(resp.chat_stream_text().split_whitespace().count() >= 5);
    }
}

/// A client that connected just before the shutdown (the listener may take one more
/// connection as it stops, or one lands just before a binary upgrade hands the sockets over)
/// gets its first request answered; a kept-alive connection waiting for its next request is
/// let go at once, as clients expect of idle connections.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_a_new_connections_first_request_and_lets_idle_ones_go() {
    let mock = MockUpstream::start();
    let mut lumen = Lumen::start(&format!(
        "auth: off\nserver: {{ grace_period: 20s }}\nproviders:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
        mock.base_url()
    ));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut idle = Client::connect(lumen.addr).await.unwrap();
    assert_eq!(
        idle.post_json("/v1/chat/completions", &[], &body)
            .await
            .unwrap()
            .status,
        200
    );
    let mut new = Client::connect(lumen.addr).await.unwrap();
    // Accepted and waiting for its head when the shutdown comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped_at = Instant::now();
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(lumen.pid() as i32, libc::SIGTERM) };
    assert!(
        idle.closed_within(Duration::from_secs(3)).await.is_ok(),
        "the idle keep-alive connection is let go"
    );
    // Well after the listener stopped and the idle connections were let go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = new
        .post_json("/v1/chat/completions", &[], &body)
        .await
        .expect("the new connection's request is answered");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("connection"),
        Some("close"),
        "{:?}",
        resp.headers
    );
    // Then nothing holds the drain: the node exits long before its grace period.
    let status = lumen.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_node_exits_at_once_on_sigterm() {
    let mock = MockUpstream::start();
    let mut lumen = Lumen::start(&format!(
        "auth: off\nserver: {{ grace_period: 20s }}\nproviders:\n  mock: {{ base_url: \"{}\", health: {{ enabled: false }} }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
        mock.base_url()
    ));
    let stopped_at = Instant::now();
    let status = lumen.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "nothing in flight: no need to wait out the grace period ({:?})",
        stopped_at.elapsed()
    );
    assert!(lumen.log().contains("drained"), "{}", lumen.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_come_at_half_the_interval_systemd_asked_for() {
    let mock = MockUpstream::start();
    let dir = Dir::new("lumen-watchdog");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // WatchdogSec=1s: pings every 500 ms.
    let _lumen = Lumen::start_with_env(
        &format!(
            "auth: off\nproviders:\n  mock: {{ base_url: \"{}\" }}\nroutes:\n  - {{ model: m, targets: [ {{ provider: mock }} ] }}\n",
            mock.base_url()
        ),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    assert_eq!(recv(&socket), "READY=1");
    let mut last = std::time::Instant::now();
    let mut gaps = Vec::new();
    for _ in 0..4 {
        assert_eq!(recv(&socket), "WATCHDOG=1");
        gaps.push(last.elapsed());
        last = std::time::Instant::now();
    }
    // The first may follow READY at once; after that, about every 500 ms: never a busy loop,
    // never late enough for systemd (1 s) to kill the service.
    for gap in &gaps[1..] {
        assert!(
            *gap >= Duration::from_millis(300) && *gap < Duration::from_millis(950),
            "{gaps:?}"
        );
    }
}
