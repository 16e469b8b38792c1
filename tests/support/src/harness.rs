//! Starts the real `lumen` binary with a temp config on free ports, waits until it answers
//! `/healthz`, and kills it on drop. Its stderr goes to a file tests can read (to check, say,
//! that no secret is ever logged).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Tests run in parallel threads: never hand out the same port twice in one process. And
    // never one from the kernel's ephemeral range: every outgoing connection takes its local
    // port from there, so a port that range offered could be taken by some test's client
    // between the moment it is handed out and the moment its server binds it.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1_000);
    // Test binaries started side by side begin at different places.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOWEST + (start + n) % span).expect("ports fit u16");
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
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

/// Runs `redis-cli` with `args`; its standard output.
pub fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server by scripts/setup.sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `redis-server` with extra arguments in its own directory (cluster and Sentinel members).
fn spawn_redis(port: u16, dir: &Path, extra: &[String]) -> Child {
    let child = Command::new("redis-server")
        .args(extra)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed by scripts/setup.sh");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A real Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, made
/// by `redis-cli --cluster create`; every server killed on drop. A failed node is noticed
/// within a second (`cluster-node-timeout 1000`), so a replica takes over in a few seconds.
pub struct RedisCluster {
    nodes: Vec<(u16, u16, Option<Child>)>,
    dir: tempdir::Dir,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = tempdir::Dir::new("redis-cluster");
        let count = primaries * (1 + replicas);
        let mut nodes = Vec::new();
        for _ in 0..count {
            let (port, bus) = (free_port(), free_port());
            let child = spawn_redis(port, dir.path(), &Self::args(port, bus));
            nodes.push((port, bus, Some(child)));
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|(p, _, _)| format!("127.0.0.1:{p}")));
        args.extend([
            "--cluster-replicas".to_string(),
            replicas.to_string(),
            "--cluster-yes".to_string(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        redis_cli(&refs);
        let cluster = RedisCluster { nodes, dir };
        cluster.wait_healthy(Duration::from_secs(30));
        cluster.wait_replicas_synced(Duration::from_secs(30));
        cluster
    }

    /// `bus`: the cluster bus port, chosen apart (the default, port + 10000, is no port at all
    /// for a port above 55535).
    fn args(port: u16, bus: u16) -> Vec<String> {
        [
            "--cluster-port",
            &bus.to_string(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
            "--cluster-node-timeout",
            "1000",
            // A replica takes over however long ago it last heard from its primary (an idle
            // test cluster's replica may not have heard for several node timeouts).
            "--cluster-replica-validity-factor",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Seed URLs for `redis.cluster` (every node).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Ports of the nodes that are up and primaries now, by `CLUSTER NODES` of a live node.
    pub fn primaries(&self) -> Vec<u16> {
        self.view()
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|a| a.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub fn view(&self) -> String {
        for (port, _, child) in &self.nodes {
            if child.is_some() {
                let out = redis_cli(&["-p", &port.to_string(), "cluster", "nodes"]);
                if !out.is_empty() {
                    return out;
                }
            }
        }
        String::new()
    }

    /// Waits until every live node reports `cluster_state:ok` and every slot is served.
    pub fn wait_healthy(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|(_, _, c)| c.is_some())
                .all(|(port, _, _)| {
                    let info = redis_cli(&["-p", &port.to_string(), "cluster", "info"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                });
            if ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "redis cluster not healthy within {limit:?}:\n{}",
                self.view()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every live replica has finished its first sync with its primary (until
    /// then a replica promoted in a failover would come up without the primary's data).
    pub fn wait_replicas_synced(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for (port, _, child) in &self.nodes {
            if child.is_none() {
                continue;
            }
            loop {
                let info = redis_cli(&["-p", &port.to_string(), "info", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {port} never synced:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Whether the cluster, as the live node on `live` sees it, has marked the node on `port`
    /// failed (not merely suspected) and serves every slot again: a failover of `port` is over.
    pub fn failed_over(live: u16, port: u16) -> bool {
        let view = redis_cli(&["-p", &live.to_string(), "cluster", "nodes"]);
        let failed = view.lines().any(|l| {
            l.contains(&format!(":{port}@"))
                && l.split_whitespace()
                    .nth(2)
                    .is_some_and(|f| f.split(',').any(|f| f == "fail"))
        });
        let info = redis_cli(&["-p", &live.to_string(), "cluster", "info"]);
        failed && info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
    }

    /// The port of the primary holding a key that matches `pattern` (`--scan`).
    pub fn primary_holding(&self, pattern: &str) -> u16 {
        self.primaries()
            .into_iter()
            .find(|port| {
                !redis_cli(&["-p", &port.to_string(), "--scan", "--pattern", pattern])
                    .trim()
                    .is_empty()
            })
            .unwrap_or_else(|| panic!("no primary holds {pattern}:\n{}", self.view()))
    }

    /// The keys matching `pattern` on every primary, with the port holding each.
    pub fn keys(&self, pattern: &str) -> Vec<(u16, String)> {
        self.primaries()
            .into_iter()
            .flat_map(|port| {
                redis_cli(&["-p", &port.to_string(), "--scan", "--pattern", pattern])
                    .lines()
                    .map(|k| (port, k.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// SIGKILLs the node on `port` (a crash).
    pub fn kill(&mut self, port: u16) {
        for (p, _, child) in &mut self.nodes {
            if *p == port {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// Starts the node on `port` again with its saved cluster state (it rejoins, as a replica
    /// when its slots were taken over).
    pub fn restart(&mut self, port: u16) {
        let dir = self.dir.path().to_path_buf();
        for (p, bus, child) in &mut self.nodes {
            if *p == port && child.is_none() {
                *child = Some(spawn_redis(port, &dir, &Self::args(port, *bus)));
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A master, one replica and three Sentinels watching it (quorum 2) on loopback; every server
/// killed on drop. The master is judged down after a second.
pub struct RedisSentinels {
    pub master_port: u16,
    pub replica_port: u16,
    pub sentinel_ports: Vec<u16>,
    children: Vec<(u16, Option<Child>)>,
    _dir: tempdir::Dir,
}

impl RedisSentinels {
    /// The name the Sentinels know the master by.
    pub const MASTER: &'static str = "lumenmaster";

    pub fn start() -> RedisSentinels {
        let dir = tempdir::Dir::new("redis-sentinel");
        let (master_port, replica_port) = (free_port(), free_port());
        let mut children = vec![(master_port, Some(spawn_redis(master_port, dir.path(), &[])))];
        let replicaof = vec![
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            master_port.to_string(),
        ];
        children.push((
            replica_port,
            Some(spawn_redis(replica_port, dir.path(), &replicaof)),
        ));
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor {m} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {m} 1000\n\
                     sentinel failover-timeout {m} 5000\n\
                     sentinel parallel-syncs {m} 1\n",
                    m = Self::MASTER
                ),
            )
            .expect("write sentinel config");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--protected-mode", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            children.push((port, Some(child)));
            sentinel_ports.push(port);
        }
        let sentinels = RedisSentinels {
            master_port,
            replica_port,
            sentinel_ports,
            children,
            _dir: dir,
        };
        // Ready when the replica has synced and every Sentinel knows the replica and the other
        // two Sentinels (what a failover needs).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = redis_cli(&["-p", &replica_port.to_string(), "info", "replication"])
                .contains("master_link_status:up");
            let known = sentinels.sentinel_ports.iter().all(|p| {
                let m = redis_cli(&["-p", &p.to_string(), "sentinel", "master", Self::MASTER]);
                let lines: Vec<&str> = m.lines().collect();
                let field = |name: &str| {
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .map(|v| v.trim().to_string())
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            });
            if synced && known {
                break;
            }
            assert!(Instant::now() < deadline, "sentinels not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        sentinels
    }

    /// URLs for `redis.sentinel.nodes`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The master's port as the first Sentinel reports it now.
    pub fn master_now(&self) -> Option<u16> {
        let port = self.sentinel_ports.first()?.to_string();
        let out = redis_cli(&[
            "-p",
            &port,
            "sentinel",
            "get-master-addr-by-name",
            Self::MASTER,
        ]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// SIGKILLs the server on `port`.
    pub fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.children {
            if *p == port {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A private CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`server.pem`,
/// `server.key`), made in `dir` with the `openssl` command.
pub fn test_ca(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed by scripts/setup.sh");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=lumen-test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext.cnf");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
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
