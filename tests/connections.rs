//! Client connections against the real `lumen` binary: slow request heads and idle keep-alive
//! connections are closed on time, connections beyond `server.max_connections` are refused
//! while the open ones keep working, pipelined requests are answered in order, and the jobs
//! socket is in the runtime directory and gone after a clean exit.

use std::time::{Duration, Instant};

use lumen_test_support::client::{request, Client};
use lumen_test_support::{Lumen, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(mock: &MockUpstream, server: &str) -> String {
    format!(
        r#"auth: off
server: {{ {server} }}
providers:
  mock: {{ base_url: "{base}", health: {{ enabled: false }} }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        base = mock.base_url()
    )
}

/// Short limits, so a test sees them fire.
const SHORT: &str = "header_timeout: 1s, keepalive_timeout: 2s";

async fn healthz(lumen: &Lumen) -> u16 {
    request(lumen.addr, "GET", "/healthz", &[], b"")
        .await
        .map_or(0, |r| r.status)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_header_client_is_closed_at_the_header_timeout_while_others_are_served() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, SHORT));
    let stream = TcpStream::connect(lumen.addr).await.unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    // Slowloris: a byte every 200 ms, never the blank line that ends the head. Each read
    // arrives well within any per-read timeout.
    let trickle = tokio::spawn(async move {
        write.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            write.write_all(b"x").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    });
    // Meanwhile a well-behaved client is answered at once, every time.
    for _ in 0..4 {
        let asked = Instant::now();
        assert_eq!(healthz(&lumen).await, 200);
        assert!(asked.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let after = tokio::time::timeout(Duration::from_secs(6), closed)
        .await
        .expect("the slow client is still connected after 6 s")
        .unwrap();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}, header_timeout is 1s"
    );
    trickle.abort();
    assert_eq!(healthz(&lumen).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, SHORT));
    let mut silent = Client::connect(lumen.addr).await.unwrap();
    let after = silent
        .closed_within(Duration::from_secs(6))
        .await
        .expect("a silent connection is still open after 6 s");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}, header_timeout is 1s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, SHORT));
    let mut c = Client::connect(lumen.addr).await.unwrap();
    assert_eq!(
        c.request("GET", "/healthz", &[], b"").await.unwrap().status,
        200
    );
    // Idle for less than keepalive_timeout (but longer than header_timeout): still open, and
    // each request restarts the idle clock.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = c.request("GET", "/healthz", &[], b"").await.unwrap();
        assert_eq!(r.status, 200);
    }
    let after = c
        .closed_within(Duration::from_secs(8))
        .await
        .expect("an idle keep-alive connection is still open after 8 s");
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(4),
        "closed after {after:?}, keepalive_timeout is 2s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_max_connections_are_closed_while_open_ones_are_served() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(
        &mock,
        "header_timeout: 30s, keepalive_timeout: 30s, max_connections: 4",
    ));
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(lumen.addr).await.unwrap();
        assert_eq!(
            c.request("GET", "/healthz", &[], b"").await.unwrap().status,
            200
        );
        open.push(c);
    }
    // The fifth is accepted by the kernel and closed at once by the gateway.
    let mut fifth = Client::connect(lumen.addr).await.unwrap();
    let _ = fifth
        .send_raw(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let closed = fifth.closed_within(Duration::from_secs(3)).await;
    assert!(closed.is_ok(), "a fifth connection was kept open");
    // The four keep working.
    for c in &mut open {
        assert_eq!(
            c.request("GET", "/healthz", &[], b"").await.unwrap().status,
            200
        );
    }
    // A closed one frees its slot.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while healthz(&lumen).await != 200 {
        assert!(Instant::now() < deadline, "the freed slot was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The refusal was logged (the log is written off the request path: it may lag a little).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lumen.log().contains("server.max_connections") {
        assert!(
            Instant::now() < deadline,
            "the refused connection was not logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let mock = MockUpstream::start();
    let lumen = Lumen::start(&config(&mock, ""));
    let mut c = Client::connect(lumen.addr).await.unwrap();
    let body = br#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#;
    let mut wire = Vec::new();
    wire.extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n");
    wire.extend_from_slice(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    wire.extend_from_slice(body);
    wire.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n");
    // All three in one write.
    c.send_raw(&wire).await.unwrap();
    let first = c.response().await.expect("first answer");
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["status"], "ok");
    let second = c.response().await.expect("second answer");
    assert_eq!(second.status, 200, "{}", second.text());
    assert!(second.json()["choices"].is_array(), "{}", second.text());
    let third = c.response().await.expect("third answer");
    assert_eq!(third.status, 200);
    assert_eq!(third.json()["object"], "list", "{}", third.text());
    // And the connection is still usable afterwards.
    let fourth = c.request("GET", "/healthz", &[], b"").await.unwrap();
    assert_eq!(fourth.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jobs_socket_is_in_the_runtime_directory_and_removed_on_exit() {
    let mock = MockUpstream::start();
    let runtime = lumen_test_support::harness::tempdir::Dir::new("lumen-runtime");
    let dir = runtime.path().to_str().unwrap().to_string();
    let mut lumen = Lumen::start_with_env(
        &config(&mock, "grace_period: 1s"),
        &[("RUNTIME_DIRECTORY", dir.as_str())],
    );
    let socket = runtime
        .path()
        .join(format!("lumen-{}-jobs.sock", lumen.pid()));
    assert!(socket.exists(), "no jobs socket at {}", socket.display());
    let status = lumen.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(runtime.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
