//! Starts the real `lumen` binary with a temp config on free ports, waits until it answers
//! `/healthz`, and kills it on drop. Its stderr goes to a file tests can read (to check, say,
//! that no secret is ever logged).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Tests run in parallel threads: never hand out the same port twice in one process (the
    // OS may offer a just-released port again before its first taker has bound it).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A binary of this workspace, next to the running test or bench executable
/// (`target/<profile>/deps/x` → `target/<profile>/NAME`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A path in this repository, from its root (`models`, `.tools/promtool`, `conf/...`).
pub fn repo_path(relative: &str) -> PathBuf {
    // This crate is `<repo>/tests/support`.
    let support = Path::new(env!("CARGO_MANIFEST_DIR"));
    support
        .ancestors()
        .nth(2)
        .expect("tests/support inside the repository")
        .join(relative)
}

/// `promtool` from Debian's `prometheus` package: `LUMEN_PROMTOOL`, else the copy that
/// `scripts/setup.sh` extracts to `.tools/`, else the first on `PATH`.
pub fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("LUMEN_PROMTOOL") {
        return path.into();
    }
    let local = repo_path(".tools/promtool");
    if local.is_file() {
        return local;
    }
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    found.expect("promtool not found: run scripts/setup.sh (it extracts it to .tools/)")
}

/// A running gateway.
pub struct Lumen {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempdir::Dir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// A running `lumen worker` (no listeners: async-job workers only); killed on drop.
pub struct Worker {
    child: Child,
    pub dir: tempdir::Dir,
    pub log_path: PathBuf,
}

impl Worker {
    /// Starts `lumen worker` on `yaml` and waits for its start-up line.
    pub fn start(yaml: &str) -> Worker {
        let dir = tempdir::Dir::new("lumen-worker");
        let config_path = dir.path().join("lumen.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let log_path = dir.path().join("worker.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(bin_path("lumen"))
            .arg("worker")
            .arg("--config")
            .arg(&config_path)
            .env("LUMEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log)
            .spawn()
            .expect("spawn lumen worker (is it built?)");
        let mut worker = Worker {
            child,
            dir,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !worker.log().contains("lumen starting") {
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("lumen worker exited with {status}:\n{}", worker.log());
            }
            assert!(
                Instant::now() < deadline,
                "lumen worker did not start:\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        worker
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A self-removing temp directory (std only).
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "{prefix}-{}-{:x}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Lumen {
    /// Starts `lumen serve` on `yaml`. Unless the YAML sets them, `listen` and `admin_listen`
    /// are added on free loopback ports.
    pub fn start(yaml: &str) -> Lumen {
        Self::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Lumen {
        let port = free_port();
        let admin_port = free_port();
        let mut text = String::new();
        if !yaml.contains("\nlisten:") && !yaml.starts_with("listen:") {
            text.push_str(&format!("listen: [\"127.0.0.1:{port}\"]\n"));
        }
        if !yaml.contains("admin_listen:") {
            text.push_str(&format!("admin_listen: \"127.0.0.1:{admin_port}\"\n"));
        }
        text.push_str(yaml);
        let dir = tempdir::Dir::new("lumen-test");
        let config_path = dir.path().join("lumen.yaml");
        std::fs::write(&config_path, &text).expect("write config");
        let log_path = dir.path().join("lumen.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = Command::new(bin_path("lumen"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("LUMEN_LOG", "info")
            // The jobs socket lives in the test's own directory, removed with it (a gateway
            // killed by a test cannot remove it itself).
            .env("RUNTIME_DIRECTORY", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn lumen (is it built?)");
        let listen = listen_port(&text).unwrap_or(port);
        let admin_port = text
            .find("admin_listen:")
            .and_then(|at| first_loopback_port(&text[at..]))
            .unwrap_or(admin_port);
        let mut lumen = Lumen {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            config_path,
            log_path,
        };
        lumen.wait_ready(Duration::from_secs(60));
        lumen
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "lumen exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if healthz(self.addr) {
                // The admin listener is a service of its own, bound on its own thread: a test
                // that goes to it at once must not race its bind. (Bounded: a test whose admin
                // address the harness cannot tell is not held up for long.)
                let admin_deadline = Instant::now() + Duration::from_secs(5);
                while std::net::TcpStream::connect_timeout(&self.admin, Duration::from_millis(200))
                    .is_err()
                    && Instant::now() < admin_deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "lumen did not answer /healthz within {limit:?}:\n{}",
            self.log()
        );
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop, as systemd does it) and waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lumen did not exit within {limit:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Scrapes `/metrics` on `admin` until it contains `needle` (metrics are recorded just after a
/// response is sent, so a test that scrapes at once can race them); panics after 5 s.
pub async fn scrape_until(admin: SocketAddr, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = crate::client::request(admin, "GET", "/metrics", &[], b"")
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {needle}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `GET path` on `addr` until it answers `want`; panics after `limit`. Readiness
/// follows the first health probes, which land a few milliseconds after start.
pub async fn wait_for_status(addr: SocketAddr, path: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = crate::client::request(addr, "GET", path, &[], b"")
            .await
            .map(|r| r.status)
            .unwrap_or(0);
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{path} answered {got}, not {want}, for {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits, if needed, until at least 3 s remain in the current wall-clock minute, so a test of
/// per-minute windows kept in Redis (aligned to Redis's clock) does not straddle a boundary.
/// In-process windows start with the process, so tests need not wait for them.
pub async fn away_from_minute_boundary() {
    let into = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 60.0)
        .unwrap_or(0.0);
    if into > 57.0 {
        tokio::time::sleep(Duration::from_secs_f64(60.2 - into)).await;
    }
}

/// Reads the first `listen:` port of a config, when the test set its own.
fn listen_port(text: &str) -> Option<u16> {
    let listen = if text.starts_with("listen:") {
        0
    } else {
        text.find("\nlisten:")?
    };
    first_loopback_port(&text[listen..])
}

/// The port of the first `127.0.0.1:PORT` in `text`.
fn first_loopback_port(text: &str) -> Option<u16> {
    let start = text.find("127.0.0.1:")? + "127.0.0.1:".len();
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn healthz(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 12 && buf.starts_with(b"HTTP/1.1 200"))
}

impl Drop for Lumen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `redis-server` on a free loopback port, with nothing persisted; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed by scripts/setup.sh");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server (a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::listen_port;

    #[test]
    fn finds_the_first_listener_port() {
        assert_eq!(
            listen_port("admin_listen: \"127.0.0.1:9\"\nlisten:\n  - \"127.0.0.1:41\"\n"),
            Some(41)
        );
        assert_eq!(
            listen_port("listen: [\"127.0.0.1:42\"]\nadmin_listen: \"127.0.0.1:9\"\n"),
            Some(42)
        );
        assert_eq!(
            listen_port("admin_listen: \"127.0.0.1:9\"\nproviders: {}\n"),
            None
        );
    }
}
