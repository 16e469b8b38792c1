//! The access log: one JSON line per request on stderr, written by a dedicated thread.
//!
//! It does not go through `tracing`'s formatter: at tens of thousands of requests per second,
//! formatting through the subscriber and waking a writer thread per line cost about a third of
//! the gateway's throughput. Here a request formats its line into a small buffer and pushes it
//! onto a bounded channel; the writer thread drains the channel in batches (sleeping between
//! batches, so busy senders never wake it) and writes each batch with one syscall. When the
//! channel is full the line is dropped and counted — logging never blocks a request.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines buffered between requests and the writer before new ones are dropped.
const CAPACITY: usize = 65_536;
/// How long the writer lets lines accumulate after a batch.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

struct Writer {
    tx: SyncSender<Vec<u8>>,
}

static WRITER: OnceLock<Writer> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued and not yet written (for [`flush`] at exit).
static PENDING: AtomicU64 = AtomicU64::new(0);

/// One request, as the access log records it. No header values, no query string, no body:
/// nothing that could carry a credential.
pub struct Entry<'a> {
    pub request_id: &'a str,
    /// The key's configured id (or the JWT's mapped claim), never the credential itself.
    pub key_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub endpoint: &'a str,
    pub route: &'a str,
    pub provider: &'a str,
    pub stream: bool,
    pub duration_us: u64,
    pub first_byte_us: u64,
    /// What the request cost at the configured prices, in micro-dollars; `None`: unpriced.
    pub cost_micros: Option<u64>,
    pub error: &'a str,
}

/// Lines dropped because the writer fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Starts the writer thread (once per process).
pub fn init() {
    WRITER.get_or_init(|| {
        let (tx, rx) = sync_channel(CAPACITY);
        let spawned = std::thread::Builder::new()
            .name("lumen-access-log".into())
            .spawn(move || write_loop(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer; access log disabled");
        }
        Writer { tx }
    });
}

fn write_loop(rx: Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    // `recv` blocks only while idle; under load the thread sleeps between batches instead.
    while let Ok(first) = rx.recv() {
        batch.extend_from_slice(&first);
        let mut lines = 1u64;
        while let Ok(line) = rx.try_recv() {
            batch.extend_from_slice(&line);
            lines = lines.saturating_add(1);
            if batch.len() > 256 * 1024 {
                break;
            }
        }
        let _ = std::io::stderr().lock().write_all(&batch);
        PENDING.fetch_sub(lines, Ordering::AcqRel);
        batch.clear();
        std::thread::sleep(BATCH_WINDOW);
    }
}

/// Waits (up to `limit`) until every queued line is written: for a process about to exit.
pub fn flush(limit: Duration) {
    // None: a limit too long to represent, which is no limit.
    let deadline = std::time::Instant::now().checked_add(limit);
    while PENDING.load(Ordering::Acquire) > 0
        && deadline.is_none_or(|d| std::time::Instant::now() < d)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Queues `entry` for writing; never blocks.
pub fn record(entry: &Entry) {
    let Some(writer) = WRITER.get() else {
        return;
    };
    let line = format_line(entry, SystemTime::now());
    PENDING.fetch_add(1, Ordering::AcqRel);
    match writer.tx.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            PENDING.fetch_sub(1, Ordering::AcqRel);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn format_line(e: &Entry, now: SystemTime) -> Vec<u8> {
    let mut line = Vec::with_capacity(e.error.len().saturating_add(256));
    let ts = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    // Numbers through itoa, not `write!`: the line is made for every request.
    line.extend_from_slice(b"{\"ts\":");
    number(&mut line, ts.as_secs());
    line.push(b'.');
    let mut micros = itoa::Buffer::new();
    let micros = micros.format(ts.subsec_micros()).as_bytes();
    line.extend(std::iter::repeat_n(
        b'0',
        6usize.saturating_sub(micros.len()),
    ));
    line.extend_from_slice(micros);
    line.extend_from_slice(b",\"kind\":\"access\",\"request_id\":");
    string(&mut line, e.request_id);
    line.extend_from_slice(b",\"key_id\":");
    string(&mut line, e.key_id);
    line.extend_from_slice(b",\"method\":");
    string(&mut line, e.method);
    line.extend_from_slice(b",\"path\":");
    string(&mut line, e.path);
    line.extend_from_slice(b",\"status\":");
    number(&mut line, e.status);
    line.extend_from_slice(b",\"endpoint\":");
    string(&mut line, e.endpoint);
    line.extend_from_slice(b",\"route\":");
    string(&mut line, e.route);
    line.extend_from_slice(b",\"provider\":");
    string(&mut line, e.provider);
    line.extend_from_slice(if e.stream {
        b",\"stream\":true,\"duration_us\":"
    } else {
        b",\"stream\":false,\"duration_us\":"
    });
    number(&mut line, e.duration_us);
    line.extend_from_slice(b",\"first_byte_us\":");
    number(&mut line, e.first_byte_us);
    if let Some(cost) = e.cost_micros {
        // Six decimals, exact: a JSON number.
        let _ = write!(
            line,
            ",\"cost_usd\":{}",
            lumen_plugins::budget::format_usd(cost)
        );
    }
    if !e.error.is_empty() {
        line.extend_from_slice(b",\"error\":");
        string(&mut line, e.error);
    }
    line.extend_from_slice(b"}\n");
    line
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Longest value of any one field: a line stays small whatever a client sends (a long path,
/// an error message quoting the request). Longer values end with `…`.
const MAX_FIELD: usize = 512;

/// A JSON string, escaped, cut at [`MAX_FIELD`] bytes (on a character boundary).
fn string(out: &mut Vec<u8>, s: &str) {
    if s.len() <= MAX_FIELD {
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    let end = s.floor_char_boundary(MAX_FIELD);
    let cut = format!("{}…", &s[..end]);
    let _ = serde_json::to_writer(&mut *out, &cut);
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut() {
        let long = "é".repeat(2000);
        let mut out = Vec::new();
        string(&mut out, &long);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert!(back.len() <= MAX_FIELD + 3, "{}", back.len());
        assert!(back.ends_with('…'));
    }

    #[test]
    fn lines_are_json_with_escaped_strings() {
        let entry = Entry {
            request_id: "abc",
            key_id: "team-a",
            method: "POST",
            path: "/v1/chat/\"completions\"",
            status: 200,
            endpoint: "chat",
            route: "fast",
            provider: "mock",
            stream: true,
            duration_us: 1234,
            first_byte_us: 1000,
            cost_micros: Some(1_500_042),
            error: "",
        };
        let line = format_line(
            &entry,
            UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
        );
        assert!(line.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["ts"].as_f64().unwrap(), 1_700_000_000.123456);
        assert_eq!(v["path"], "/v1/chat/\"completions\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], true);
        assert!(v.get("error").is_none());
        assert_eq!(v["cost_usd"].as_f64().unwrap(), 1.500042);
        assert_eq!(v["duration_us"], 1234);
        assert_eq!(v["first_byte_us"], 1000);
        // Microseconds keep their six places.
        let line = format_line(
            &entry,
            UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_042),
        );
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(
            line.starts_with(b"{\"ts\":1700000000.000042,"),
            "{}",
            String::from_utf8_lossy(&line)
        );
        assert_eq!(v["stream"], true);
    }
}
