//! Test harness: starts the real `lumen-llama` binary on a free port, generates the test models
//! once per test binary, and speaks just enough HTTP/1.1 (over a plain `TcpStream`) to send
//! requests, read SSE streams incrementally, and disconnect on purpose.
//!
//! Shared by the integration tests and by `benches/sidecar.rs`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_lumen-llama");
/// Generous: CI machines have two cores and run other tests beside these.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lumen-llama");
    std::fs::create_dir_all(&dir).expect("create test scratch dir");
    dir
}

/// Generates a test model once per test binary and returns its path.
fn generated(kind: &str, cell: &'static OnceLock<PathBuf>) -> &'static Path {
    cell.get_or_init(|| {
        let path = scratch_dir().join(format!("tiny-{kind}-{}.gguf", std::process::id()));
        let out = Command::new(BIN)
            .args(["gen-test-model", "--kind", kind, "--out"])
            .arg(&path)
            .output()
            .expect("run gen-test-model");
        assert!(
            out.status.success(),
            "gen-test-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
}

pub fn tiny_chat_model() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    generated("chat", &CELL)
}

pub fn tiny_rerank_model() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    generated("rerank", &CELL)
}

/// Where `lumen-llama fetch-model` puts real models: `<repo>/models`, or `LUMEN_MODELS_DIR`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("LUMEN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// A real model file if it has been fetched; otherwise prints why the caller skips.
pub fn real_model(file: &str, fetch_command: &str) -> Option<PathBuf> {
    let path = models_dir().join(file);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run `{fetch_command}` to run this test",
            path.display()
        );
        None
    }
}

/// A running `lumen-llama serve`, killed on drop.
pub struct Sidecar {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Sidecar {
    /// Starts `serve --port 0` with `args` and waits for the listening line (not for health).
    pub fn spawn(args: &[String]) -> Sidecar {
        Self::spawn_with_env(args, &[])
    }

    /// [`Sidecar::spawn`] with extra environment variables for the server process.
    pub fn spawn_with_env(args: &[String], env: &[(&str, &str)]) -> Sidecar {
        let log = scratch_dir().join(format!("sidecar-{}-{}.log", std::process::id(), unique()));
        let log_file = std::fs::File::create(&log).expect("create sidecar log");
        let mut child = Command::new(BIN)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn lumen-llama");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no port in {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Sidecar { child, port, log }
    }

    /// Starts and waits for `/health` 200.
    pub fn start(args: &[String]) -> Sidecar {
        let s = Self::spawn(args);
        s.wait_healthy();
        s
    }

    /// [`Sidecar::start`] with extra environment variables for the server process.
    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Sidecar {
        let s = Self::spawn_with_env(args, env);
        s.wait_healthy();
        s
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(r) = try_request(self.port, "GET", "/health", None) {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not healthy in time; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        request(self.port, "POST", path, Some(body.to_string().as_bytes()))
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Response {
        request(self.port, "POST", path, Some(body))
    }

    /// Opens a streaming request and returns once the response headers are in.
    pub fn stream(&self, path: &str, body: &Value) -> SseStream {
        SseStream::open(self.port, path, body)
    }

    /// One sample of a Prometheus metric for `model` (0 if absent).
    pub fn metric(&self, name: &str, model: &str, extra_label: Option<&str>) -> f64 {
        let text = self.get("/metrics").text();
        let labels = match extra_label {
            Some(l) => format!("{{model=\"{model}\",{l}}}"),
            None => format!("{{model=\"{model}\"}}"),
        };
        let prefix = format!("{name}{labels} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The `/health` entry for one model.
    pub fn health_of(&self, model: &str) -> Value {
        self.get("/health").json()["models"][model].clone()
    }

    /// Polls `check` until it holds or `timeout` passes; returns whether it held.
    pub fn eventually(&self, timeout: Duration, mut check: impl FnMut(&Sidecar) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        check(self)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("sidecar log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn write_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<()> {
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    })
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut size_line = String::new();
    reader.read_line(&mut size_line)?;
    let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|e| std::io::Error::other(format!("bad chunk size {size_line:?}: {e}")))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    write_request(&mut stream, method, path, body)?;
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader)?;
    let mut body = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(&mut reader)? {
            body.extend_from_slice(&chunk);
        }
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn request(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    try_request(port, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"))
}

/// A streaming response read event by event. Dropping it closes the connection.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    buffer: String,
    done: bool,
}

impl SseStream {
    fn open(port: u16, path: &str, body: &Value) -> SseStream {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .expect("set timeout");
        write_request(&mut stream, "POST", path, Some(body.to_string().as_bytes()))
            .expect("send request");
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader).expect("response head");
        SseStream {
            reader,
            status,
            headers,
            buffer: String::new(),
            done: false,
        }
    }

    /// The next `data:` payload, or `None` when the stream has ended.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.trim().strip_prefix("data: ") {
                    return Some(data.to_string());
                }
                continue;
            }
            if self.done {
                return None;
            }
            match read_chunk(&mut self.reader) {
                Ok(Some(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) | Err(_) => self.done = true,
            }
        }
    }

    /// Every remaining `data:` payload.
    pub fn collect_all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            out.push(d);
        }
        out
    }
}

/// The text and final chunk facts of a chat stream.
#[derive(Debug)]
pub struct StreamedChat {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub ended_with_done: bool,
    pub first_role: Option<String>,
}

pub fn read_chat_stream(stream: SseStream) -> StreamedChat {
    let events = stream.collect_all();
    let mut out = StreamedChat {
        text: String::new(),
        finish_reason: None,
        usage: None,
        ended_with_done: events.last().map(String::as_str) == Some("[DONE]"),
        first_role: None,
    };
    for data in events.iter().filter(|d| d.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("chunk {data}: {e}"));
        assert!(v.get("error").is_none(), "error event: {data}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.usage = Some(u.clone());
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if out.first_role.is_none() {
            out.first_role = choice["delta"]["role"].as_str().map(String::from);
        }
        if let Some(t) = choice["delta"]["content"].as_str() {
            out.text.push_str(t);
        }
        if let Some(t) = choice["text"].as_str() {
            out.text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            out.finish_reason = Some(f.to_string());
        }
    }
    out
}

/// Whether `s` is a prefix of some valid JSON text (what a grammar-constrained generation cut
/// off by `max_tokens` must be). A small recursive-descent checker: `Err` on an invalid byte,
/// `Ok(true)` when the input ran out mid-value, `Ok(false)` when a value ended cleanly.
pub fn is_json_prefix(s: &str) -> bool {
    struct P<'a> {
        b: &'a [u8],
        i: usize,
    }
    type R = Result<bool, ()>; // Ok(true): input exhausted (still a prefix)
    impl P<'_> {
        fn ws(&mut self) -> bool {
            while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\n' | b'\t' | b'\r') {
                self.i += 1;
            }
            self.i >= self.b.len()
        }
        fn lit(&mut self, word: &[u8]) -> R {
            for &c in word {
                if self.i >= self.b.len() {
                    return Ok(true);
                }
                if self.b[self.i] != c {
                    return Err(());
                }
                self.i += 1;
            }
            Ok(false)
        }
        fn string(&mut self) -> R {
            self.i += 1; // opening quote
            loop {
                if self.i >= self.b.len() {
                    return Ok(true);
                }
                match self.b[self.i] {
                    b'"' => {
                        self.i += 1;
                        return Ok(false);
                    }
                    b'\\' => {
                        self.i += 1;
                        if self.i >= self.b.len() {
                            return Ok(true);
                        }
                        match self.b[self.i] {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                            b'u' => {
                                self.i += 1;
                                for _ in 0..4 {
                                    if self.i >= self.b.len() {
                                        return Ok(true);
                                    }
                                    if !self.b[self.i].is_ascii_hexdigit() {
                                        return Err(());
                                    }
                                    self.i += 1;
                                }
                            }
                            _ => return Err(()),
                        }
                    }
                    c if c < 0x20 => return Err(()),
                    _ => self.i += 1,
                }
            }
        }
        fn number(&mut self) -> R {
            let start = self.i;
            while self.i < self.b.len()
                && matches!(
                    self.b[self.i],
                    b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                )
            {
                self.i += 1;
            }
            let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| ())?;
            if self.i >= self.b.len() {
                return Ok(true); // a number may continue
            }
            text.parse::<f64>().map(|_| false).map_err(|_| ())
        }
        fn value(&mut self) -> R {
            if self.ws() {
                return Ok(true);
            }
            match self.b[self.i] {
                b'{' => self.seq(b'}', true),
                b'[' => self.seq(b']', false),
                b'"' => self.string(),
                b't' => self.lit(b"true"),
                b'f' => self.lit(b"false"),
                b'n' => self.lit(b"null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => Err(()),
            }
        }
        fn seq(&mut self, close: u8, object: bool) -> R {
            self.i += 1;
            if self.ws() {
                return Ok(true);
            }
            if self.b[self.i] == close {
                self.i += 1;
                return Ok(false);
            }
            loop {
                if object {
                    if self.ws() {
                        return Ok(true);
                    }
                    if self.b[self.i] != b'"' {
                        return Err(());
                    }
                    if self.string()? {
                        return Ok(true);
                    }
                    if self.ws() {
                        return Ok(true);
                    }
                    if self.b[self.i] != b':' {
                        return Err(());
                    }
                    self.i += 1;
                }
                if self.value()? {
                    return Ok(true);
                }
                if self.ws() {
                    return Ok(true);
                }
                match self.b[self.i] {
                    b',' => self.i += 1,
                    c if c == close => {
                        self.i += 1;
                        return Ok(false);
                    }
                    _ => return Err(()),
                }
            }
        }
    }
    let mut p = P {
        b: s.as_bytes(),
        i: 0,
    };
    if p.ws() {
        return true;
    }
    if p.b[p.i] != b'{' {
        return false;
    }
    match p.value() {
        Ok(true) => true,
        Ok(false) => p.ws(), // only whitespace may follow the object
        Err(()) => false,
    }
}

#[test]
fn json_prefix_checker_works() {
    for ok in [
        "",
        "{",
        "{\"a",
        "{\"a\":",
        "{\"a\": [1, tr",
        "{\"a\":\"\\u00",
        "{} ",
        "{\"a\":1.5e",
    ] {
        assert!(is_json_prefix(ok), "{ok:?} should be a prefix");
    }
    for bad in ["[", "{a", "{\"a\" 1", "{}x", "{\"a\":tx", "{\"a\":1,}"] {
        assert!(!is_json_prefix(bad), "{bad:?} should not be a prefix");
    }
}
