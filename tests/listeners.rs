//! Listeners: plain HTTP/1.1, cleartext HTTP/2 (h2c), and TLS termination with HTTP/2 by ALPN,
//! checked with curl (a real client) against the real binary.

use std::process::Command;

use lumen_test_support::{free_port, Lumen, MockUpstream};

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .expect("curl is installed by scripts/setup.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_string(), status.to_string())
}

#[test]
fn h2c_and_tls_listeners_serve_http2_and_http1() {
    let mock = MockUpstream::start();
    let dir = lumen_test_support::harness::tempdir::Dir::new("lumen-tls");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed by scripts/setup.sh");
    assert!(status.success());
    let (plain, h2c, tls) = (free_port(), free_port(), free_port());
    let lumen = Lumen::start(&format!(
        r#"listen:
  - "127.0.0.1:{plain}"
  - {{ addr: "127.0.0.1:{h2c}", h2c: true }}
  - {{ addr: "127.0.0.1:{tls}", tls: {{ cert: "{cert}", key: "{key}" }} }}
auth: off
providers:
  mock: {{ base_url: "{base}" }}
routes:
  - {{ model: fast, targets: [ {{ provider: mock, model: up }} ] }}
"#,
        cert = cert.display(),
        key = key.display(),
        base = mock.base_url()
    ));
    let body = r#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#;
    let post = ["-H", "content-type: application/json", "-d", body];

    let (text, status) = curl(
        &[
            &[
                "--http2-prior-knowledge",
                &format!("http://127.0.0.1:{h2c}/v1/chat/completions"),
            ],
            &post[..],
        ]
        .concat(),
    );
    assert_eq!(status, "200 2", "{text}");
    assert!(text.contains("mock reply from up"));

    let (text, status) = curl(
        &[
            &[
                "-k",
                "--http2",
                &format!("https://127.0.0.1:{tls}/v1/chat/completions"),
            ],
            &post[..],
        ]
        .concat(),
    );
    assert_eq!(status, "200 2", "{text}");
    assert!(text.contains("mock reply from up"));

    let (_, status) = curl(
        &[
            &[
                "-k",
                "--http1.1",
                &format!("https://127.0.0.1:{tls}/v1/chat/completions"),
            ],
            &post[..],
        ]
        .concat(),
    );
    assert_eq!(status, "200 1.1");

    // Streams over HTTP/2 arrive whole too.
    let stream = r#"{"model":"fast","stream":true,"messages":[],"mock_chunks":4}"#;
    let (text, status) = curl(&[
        "-k",
        "--http2",
        "-N",
        "-H",
        "content-type: application/json",
        "-d",
        stream,
        &format!("https://127.0.0.1:{tls}/v1/chat/completions"),
    ]);
    assert_eq!(status, "200 2");
    assert!(
        text.contains("tok3") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );

    let (_, status) = curl(&[&format!("http://127.0.0.1:{plain}/healthz")]);
    assert_eq!(status, "200 1.1");
    drop(lumen);
}
