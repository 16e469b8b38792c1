//! The YAML file as written by an operator: strict serde types, nothing resolved yet.
//!
//! Every struct denies unknown fields, so a typo (`retires:`) is an error rather than a silent
//! default. Turning these into the runtime form (URLs parsed, names cross-checked, addresses
//! resolved) is `snapshot::build`'s job.
//!
//! Over 600 lines on purpose: the whole YAML shape in one file, read top to bottom like the
//! config it describes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{duration, opt_duration, ByteSize};

/// The whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Proxy listeners for OpenAI clients.
    #[serde(default = "default_listen")]
    pub listen: Vec<RawListener>,
    /// The admin listener (`/metrics`, `/admin/*`); loopback by default.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Required on every admin request when set; required in the config when `admin_listen`
    /// is not a loopback address.
    #[serde(default)]
    pub admin_key: Option<lumen_plugins::auth::AdminKeyConfig>,
    /// The `node_modules` folder holding swagger-ui-dist, redoc and uplot for `/docs`, `/redoc`
    /// and `/ui` (relative to this file). Default: the build tree's `src/admin/ui/node_modules`
    /// next to the binary, then `/usr/share/lumen/node_modules`.
    #[serde(default)]
    pub admin_assets: Option<String>,
    /// Usage accounting per key, provider, model and day.
    #[serde(default)]
    pub usage: RawUsage,
    /// Async jobs: submit now, collect later.
    #[serde(default)]
    pub jobs: RawJobs,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub cors: Option<lumen_plugins::cors::CorsConfig>,
    #[serde(default)]
    pub server: RawServer,
    /// `required` (default) or `off`: an open gateway is always a visible choice.
    #[serde(default)]
    pub auth: lumen_plugins::auth::AuthMode,
    /// Static API keys, stored as SHA-256 (or `key: ${ENV}`, hashed at load).
    #[serde(default)]
    pub keys: Vec<lumen_plugins::auth::KeyConfig>,
    /// JWT issuers whose tokens are accepted as credentials.
    #[serde(default)]
    pub jwt: Vec<lumen_plugins::auth::JwtConfig>,
    /// Shared state across nodes (limits today); everything stays in process without it.
    #[serde(default)]
    pub redis: Option<RawRedis>,
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// What `/readyz` requires before a load balancer sends traffic.
    #[serde(default)]
    pub readiness: Readiness,
    /// The response cache's node-wide settings (routes opt in with their own `cache:`).
    #[serde(default)]
    pub cache: RawCacheSettings,
    /// Stored responses (the Responses API's `store`).
    #[serde(default)]
    pub responses: RawResponses,
    /// The Batch API (`/v1/files`, `/v1/batches`), run on the job engine.
    #[serde(default)]
    pub batches: RawBatches,
    /// USD per million tokens per provider and model; these win over `prices_file`'s.
    #[serde(default)]
    pub prices: Vec<crate::price::RawPrice>,
    /// A price catalog (the bundled `conf/prices.yaml`), relative to this file.
    #[serde(default)]
    pub prices_file: Option<String>,
    /// Tenants with a dollar budget shared by all their keys and JWT callers, by name (a key's
    /// `tenant`, or `jwt:<issuer>:<claim>` for a JWT's tenant claim).
    #[serde(default)]
    pub tenants: BTreeMap<String, RawTenant>,
    /// OpenTelemetry traces over OTLP; off without it (read at start-up).
    #[serde(default)]
    pub tracing: Option<RawTracing>,
}

/// `tracing:`: where spans go and which are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// The collector: `http://collector:4318` (OTLP/HTTP) or `http://collector:4317` (gRPC);
    /// `https://` for TLS.
    pub otlp: String,
    /// `http` (protobuf over HTTP, the default) or `grpc`.
    #[serde(default = "default_otlp_protocol")]
    pub protocol: String,
    /// Share of new traces recorded, 0 to 1 (default 1); a client's `traceparent` decides for
    /// its own requests.
    #[serde(default = "default_sample")]
    pub sample: f64,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Record prompts and answers on spans (off: they may hold personal data).
    #[serde(default)]
    pub capture_content: bool,
    /// Continue a client's `traceparent` (and follow its sampling choice). `false` on a public
    /// edge: every request starts its own trace, sampled by `sample`, linked to the client's.
    #[serde(default = "default_true")]
    pub trust_traceparent: bool,
    /// How long one export may take, retries included.
    #[serde(default = "default_otlp_timeout", with = "duration")]
    pub timeout: Duration,
    /// How often ended spans are sent.
    #[serde(default = "default_export_every", with = "duration")]
    pub export_every: Duration,
    /// A private CA for an https:// collector (PEM); the system's roots otherwise.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Headers sent with every export (a hosted collector's key: `${OTLP_KEY}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_otlp_protocol() -> String {
    "http".into()
}
fn default_sample() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "lumen".into()
}
fn default_otlp_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_export_every() -> Duration {
    Duration::from_secs(2)
}

/// One `tenants:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub budget: lumen_plugins::budget::BudgetConfig,
}

/// `batches:`: files and batches (the OpenAI Batch API on the job engine).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatches {
    /// Largest file `POST /v1/files` takes (the upload is buffered whole, then checked).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: ByteSize,
    /// Requests of one batch file at most (OpenAI's limit).
    #[serde(default = "default_max_batch_requests")]
    pub max_requests: usize,
    /// Lines of one batch running at once.
    #[serde(default = "default_batch_concurrency")]
    pub concurrency: usize,
    /// Share of a target's known capacity (a sidecar's slots, `max_in_flight`) that batch
    /// lines may hold; the rest is kept for interactive requests (at least one slot is theirs
    /// to take).
    #[serde(default = "default_capacity_share")]
    pub capacity_share: f64,
    /// Who sees a file or batch: the `key` that made it, or every key of its `tenant`.
    #[serde(default)]
    pub scope: BatchScope,
    /// How long a finished batch and its files stay (OpenAI keeps them 30 days).
    #[serde(default = "default_batch_retention", with = "duration")]
    pub retention: Duration,
}

/// `batches.scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchScope {
    #[default]
    Key,
    Tenant,
}

fn default_max_file_bytes() -> ByteSize {
    ByteSize(100 * 1024 * 1024)
}
fn default_max_batch_requests() -> usize {
    50_000
}
fn default_batch_concurrency() -> usize {
    8
}
fn default_capacity_share() -> f64 {
    0.5
}
fn default_batch_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

impl Default for RawBatches {
    fn default() -> Self {
        RawBatches {
            max_file_bytes: default_max_file_bytes(),
            max_requests: default_max_batch_requests(),
            concurrency: default_batch_concurrency(),
            capacity_share: default_capacity_share(),
            scope: BatchScope::Key,
            retention: default_batch_retention(),
        }
    }
}

/// `responses:`: how long stored responses are kept, and how many in this process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponses {
    /// How long a stored response can be read and continued (OpenAI keeps them 30 days).
    #[serde(default = "default_store_ttl", with = "duration")]
    pub store_ttl: Duration,
    /// Most responses kept in this process without `redis:` (the oldest go first).
    #[serde(default = "default_max_stored")]
    pub max_stored: usize,
}

impl Default for RawResponses {
    fn default() -> Self {
        RawResponses {
            store_ttl: default_store_ttl(),
            max_stored: default_max_stored(),
        }
    }
}

fn default_store_ttl() -> Duration {
    Duration::from_secs(30 * 86_400)
}

fn default_max_stored() -> usize {
    10_000
}

/// `jobs:`: the async job queue and its workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    /// Workers running jobs in this process (0: this node only takes and answers jobs).
    #[serde(default = "default_job_workers")]
    pub workers: usize,
    /// Jobs waiting at most; a submit beyond is refused with 429.
    #[serde(default = "default_job_queue")]
    pub queue_size: usize,
    /// Jobs one key may have waiting at once.
    #[serde(default = "default_job_per_key")]
    pub max_queued_per_key: usize,
    /// How long a finished job's result stays readable.
    #[serde(default = "default_job_ttl", with = "duration")]
    pub result_ttl: Duration,
    /// How long `POST /generate` and `/chat_completion` (shape B) wait for the answer before
    /// answering 202 with the job id.
    #[serde(default = "default_job_wait", with = "duration")]
    pub wait_timeout: Duration,
    /// Model for compatible-shape requests that name none.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Where the compatible shapes are mounted (`/generate`, `/status/{id}` …).
    #[serde(default = "default_compat_prefix")]
    pub compat_prefix: String,
    /// Serve shape A (`/generate` with `prompt`, `/status`, `/result`, `/stream`).
    #[serde(default = "default_true")]
    pub shape_a: bool,
    /// Serve shape B (`/generate` with `content` + `meta`, `/chat_completion`).
    #[serde(default = "default_true")]
    pub shape_b: bool,
    /// Runs of one job at most (a worker that dies mid-job costs one) before it fails (Redis).
    #[serde(default = "default_job_attempts")]
    pub max_attempts: u32,
    /// How long a running job may go without its worker's heartbeat before another worker
    /// claims it (Redis).
    #[serde(default = "default_job_visibility", with = "duration")]
    pub visibility_timeout: Duration,
}

fn default_job_attempts() -> u32 {
    3
}
fn default_job_visibility() -> Duration {
    Duration::from_secs(30)
}

impl Default for RawJobs {
    fn default() -> Self {
        RawJobs {
            workers: default_job_workers(),
            queue_size: default_job_queue(),
            max_queued_per_key: default_job_per_key(),
            result_ttl: default_job_ttl(),
            wait_timeout: default_job_wait(),
            default_model: None,
            compat_prefix: default_compat_prefix(),
            shape_a: true,
            shape_b: true,
            max_attempts: default_job_attempts(),
            visibility_timeout: default_job_visibility(),
        }
    }
}

fn default_job_workers() -> usize {
    4
}
fn default_job_queue() -> usize {
    1000
}
fn default_job_per_key() -> usize {
    100
}
fn default_job_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_job_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_compat_prefix() -> String {
    "/".into()
}

/// `usage:`: where the per-day usage ledger is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of the ledger file (without `redis:`) or of its spool (with it). Default:
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else `state/` beside the config file.
    #[serde(default)]
    pub state_dir: Option<String>,
    /// How often counts are written out (they are also written on shutdown).
    #[serde(default = "default_usage_flush", with = "duration")]
    pub flush_interval: Duration,
    /// Days of history kept.
    #[serde(default = "default_usage_retention")]
    pub retention_days: u32,
}

impl Default for RawUsage {
    fn default() -> Self {
        RawUsage {
            enabled: true,
            state_dir: None,
            flush_interval: default_usage_flush(),
            retention_days: default_usage_retention(),
        }
    }
}

fn default_usage_flush() -> Duration {
    Duration::from_secs(10)
}

fn default_usage_retention() -> u32 {
    400
}

/// `cache:` at the top level: the store shared by every route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheSettings {
    /// Memory tier bound (total bytes of keys and answers).
    #[serde(default = "default_cache_memory")]
    pub memory: ByteSize,
    /// Also keep answers in Redis (when `redis:` is configured), shared by every node.
    #[serde(default = "default_true")]
    pub redis: bool,
    /// Longest a request waits for an identical one in flight before calling upstream itself.
    #[serde(default = "default_coalesce_wait", with = "duration")]
    pub coalesce_wait: Duration,
}

impl Default for RawCacheSettings {
    fn default() -> Self {
        RawCacheSettings {
            memory: default_cache_memory(),
            redis: true,
            coalesce_wait: default_coalesce_wait(),
        }
    }
}

fn default_cache_memory() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

fn default_coalesce_wait() -> Duration {
    Duration::from_secs(60)
}

/// A route's `cache:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    #[serde(default = "default_cache_ttl", with = "duration")]
    pub ttl: Duration,
    #[serde(default)]
    pub scope: lumen_plugins::cache::Scope,
    /// Larger answers are passed on but not stored.
    #[serde(default = "default_max_entry")]
    pub max_entry_bytes: ByteSize,
    #[serde(default)]
    pub when: lumen_plugins::cache::When,
    /// Count a hit's tokens against the caller's token budget (it never costs a provider).
    #[serde(default)]
    pub charge_tokens: bool,
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_max_entry() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// When `/readyz` answers 200.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Every route has at least one healthy target (the default: a node that cannot serve
    /// some model is taken out of rotation).
    #[default]
    AllRoutes,
    /// At least one route has a healthy target.
    AnyRoute,
    /// A loaded config is enough.
    ConfigLoaded,
}

fn default_listen() -> Vec<RawListener> {
    // Loopback unless the operator says otherwise: an open port is a visible choice.
    vec![RawListener::Addr("127.0.0.1:8080".into())]
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

/// A listener is either `"host:port"` or a table with TLS settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawListener {
    Addr(String),
    Full(RawListenerFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerFull {
    pub addr: String,
    /// TLS termination: HTTP/1.1 and HTTP/2 (ALPN) on this listener.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Accept cleartext HTTP/2 (prior knowledge) besides HTTP/1.1 on a plain listener.
    #[serde(default)]
    pub h2c: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

/// Gateway-wide bounds on what a client may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Request bodies above this are refused with 413 before they are buffered.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Requests per client IP, checked before authentication (floods of bad keys).
    #[serde(default)]
    pub per_ip: Option<RawPerIp>,
}

/// `limits.per_ip`: a request rate per client address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPerIp {
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
    /// IPv6 clients are counted by this many leading bits of their address: one client
    /// usually owns a whole /64, and could otherwise change address to escape the limit.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

fn default_ipv6_prefix() -> u8 {
    64
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: default_max_body(),
            per_ip: None,
        }
    }
}

fn default_max_body() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}

/// The `redis:` section: exactly one of `url`, `cluster` and `sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// One server: `redis://host:port[/db]`, or `rediss://…` for TLS.
    #[serde(default)]
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://h1:7000`, …); the rest are learned from them.
    #[serde(default)]
    pub cluster: Option<Vec<String>>,
    /// A master watched by Sentinels: failovers are followed without a restart.
    #[serde(default)]
    pub sentinel: Option<RawSentinel>,
    /// ACL user for every server (and the Sentinels).
    #[serde(default)]
    pub username: Option<String>,
    /// ACL password: only from the environment (`password: ${REDIS_PASSWORD}`).
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the certificate authority that signed the servers' certificates, for
    /// `rediss://` with a private CA (default: the system's roots).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Namespace for every key Lumen writes, so several deployments can share one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Longest wait for one Redis call before `on_redis_error` applies.
    #[serde(default = "default_redis_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_redis_error: lumen_plugins::rate_limit::shared::OnRedisError,
    /// The share (0–1) of each dollar budget this node may spend on its own while Redis is
    /// down and `on_redis_error: fail_open`: 1/N for a fleet of N keeps the fleet within it.
    #[serde(default = "whole_budget")]
    pub local_budget_share: f64,
}

/// `redis.sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The name the Sentinels know the master by (`sentinel monitor <name> …`).
    pub master: String,
    /// Sentinel addresses: `redis://host:26379` (or `rediss://`).
    pub nodes: Vec<String>,
}

impl RawRedis {
    /// Every secret this section holds, with its config path: the password, and any password
    /// written into a URL. Each must come from `${ENV}`.
    pub fn secrets(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(p) = &self.password {
            out.push(("redis.password".to_string(), p.clone()));
        }
        let mut urls: Vec<(String, &String)> = Vec::new();
        if let Some(url) = &self.url {
            urls.push(("redis.url".into(), url));
        }
        for (i, url) in self.cluster.iter().flatten().enumerate() {
            urls.push((format!("redis.cluster[{i}]"), url));
        }
        if let Some(s) = &self.sentinel {
            for (i, url) in s.nodes.iter().enumerate() {
                urls.push((format!("redis.sentinel.nodes[{i}]"), url));
            }
        }
        for (path, url) in urls {
            if let Some(p) = lumen_plugins::redis_link::url_password(url) {
                out.push((path, p.to_string()));
            }
        }
        out
    }
}

fn whole_budget() -> f64 {
    1.0
}

fn default_prefix() -> String {
    "lumen".into()
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}

/// How the proxy's worker threads are organised (`server.runtime`). Measured with
/// `cargo bench --bench load` on a 2-core host: `per_core` adds no more latency than
/// `work_stealing` at c=1 (57 against 60 µs at p50 in one run, 45 against 80 in another) and
/// serves 0.86–1.25x as many requests at c=32 across runs, so it is the default.
/// Redis is reached through one connection per runtime (`RedisLink`). What a request holds
/// (concurrency slots, its token reservation) is given back when its answer is complete,
/// before its client has the last of it (through Redis, the call goes out with the last
/// bytes), so a client's next request, on whichever thread, finds its limits settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeModel {
    /// nginx's worker model: one single-threaded runtime per thread, each its own proxy
    /// service accepting on the shared listening sockets, with its own upstream connection
    /// pool. A connection, its request and its upstream connection stay on one thread, so no
    /// I/O event wakes another thread. State that must be shared (limits, cache, health,
    /// metrics) is, as in every model.
    #[default]
    PerCore,
    /// Pingora's default: one multi-threaded runtime whose threads steal each other's tasks,
    /// and one upstream pool. Evens out load when a few requests are much heavier than the
    /// rest, at the price of cross-thread wake-ups on every I/O event.
    WorkStealing,
    /// Pingora's `work_stealing: false`: single-threaded runtimes sharing one service and one
    /// upstream pool; an accepted connection goes to a random thread.
    NoSteal,
}

/// Process-level settings handed to Pingora.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Worker threads for the proxy service (0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// How the proxy's threads share work: `per_core` (the default), `work_stealing` or
    /// `no_steal`. See [`RuntimeModel`].
    #[serde(default)]
    pub runtime: RuntimeModel,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(default = "default_grace", with = "duration")]
    pub grace_period: Duration,
    /// One JSON line per request on stderr.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Reload when the config file (or a file it names) changes; `SIGHUP` always reloads.
    #[serde(default = "default_true")]
    pub watch_config: bool,
    /// Where a running Lumen hands its listening sockets to a new one (`serve --upgrade`).
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
    /// Load balancers whose `X-Forwarded-For` names the client (CIDR blocks or addresses).
    /// Empty (the default): the header is ignored and the peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// How long a client has to send a whole request head, from connecting (or from the first
    /// byte of a keep-alive request): slow-header (slowloris) clients are cut off after it.
    #[serde(default = "default_header_timeout", with = "duration")]
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection (HTTP/1 between requests, HTTP/2 with no
    /// stream) is kept open.
    #[serde(default = "default_keepalive_timeout", with = "duration")]
    pub keepalive_timeout: Duration,
    /// Open client connections per listening service (the proxy's listeners together, the
    /// admin listener); connections beyond it are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest request head (request line, headers, blank line) a client may send; a longer
    /// one is answered `431` and the connection closed.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// How long a request body may take to arrive, from the end of its head: a client that
    /// stops half-way is answered `408` and closed after it.
    #[serde(default = "default_body_timeout", with = "duration")]
    pub body_timeout: Duration,
}

/// 64 KiB, as common proxies allow (nginx's 4 × 8k large buffers, Envoy's 60 KiB): far above
/// what any OpenAI client sends, far below Pingora's own 1 MiB.
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 * 1024)
}

/// A whole body, not one read: an 8 MiB body needs about 2 Mbit/s to make it.
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Bounds what idle or slow clients can pin (README gives the measured cost per connection)
/// while leaving room for a busy edge node; raise it with `LimitNOFILE` in mind.
fn default_max_connections() -> usize {
    10_000
}

fn default_upgrade_sock() -> String {
    "/tmp/lumen-upgrade.sock".into()
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            threads: 0,
            runtime: RuntimeModel::default(),
            grace_period: default_grace(),
            access_log: true,
            watch_config: true,
            upgrade_sock: default_upgrade_sock(),
            trusted_proxies: Vec::new(),
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            body_timeout: default_body_timeout(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

/// An OpenAI-compatible upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// e.g. `https://api.groq.com/openai/v1`: endpoint paths (`/chat/completions`) are appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` (`x-api-key` for `api: anthropic`); usually
    /// `${PROVIDER_API_KEY}`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The API it speaks: `openai` (the default: chat completions and the endpoints beside
    /// it) or `anthropic` (the Messages API).
    #[serde(default)]
    pub api: crate::upstream::provider::Api,
    /// Extra headers sent with every request to this provider.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Longest wait for the response header, and between two body chunks.
    #[serde(default, with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// How long an idle pooled connection to this provider is kept.
    #[serde(default, with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Make every model of this provider reachable as `provider/model`, without a route.
    #[serde(default)]
    pub expose_models: bool,
    /// Run a local `lumen-llama` sidecar for this provider and keep it running.
    #[serde(default)]
    pub spawn: Option<RawSpawn>,
    /// Active health probes (on by default: `GET <base_url>/models`, or `/health` for a
    /// spawned sidecar).
    #[serde(default)]
    pub health: Option<RawHealth>,
    /// Passive health: when failures take this provider out of rotation for a while.
    #[serde(default)]
    pub circuit: Option<RawCircuit>,
    /// This account's own limits at the provider: exhausted, the provider is skipped until
    /// the window resets.
    #[serde(default)]
    pub quota: Option<RawQuota>,
    /// Requests this provider takes at once before routes prefer their next target (a
    /// sidecar reports its slot count in `/health`, which is used when this is not set).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

/// `health:` of a provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `false`: never probed (passive health only).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Path on the provider's host (`/health`, `/v1/models`); defaults to the base URL's
    /// `/models`, or `/health` for a spawned sidecar. Ignored with `tcp: true`.
    #[serde(default)]
    pub path: Option<String>,
    /// Only check that a TCP connection opens (providers with no cheap GET).
    #[serde(default)]
    pub tcp: bool,
    #[serde(default = "default_probe_interval", with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "duration")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy target healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy target unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            enabled: true,
            path: None,
            tcp: false,
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// `circuit:` of a provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    /// Consecutive failures that open the circuit.
    #[serde(default = "default_circuit_failures")]
    pub failures: u32,
    /// Or: this share of failed attempts within `window` (with at least `min_requests`).
    #[serde(default = "default_error_ratio")]
    pub error_ratio: f64,
    #[serde(default = "default_circuit_window", with = "duration")]
    pub window: Duration,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// How long an open circuit waits before one trial request is let through.
    #[serde(default = "default_cooldown", with = "duration")]
    pub cooldown: Duration,
}

impl Default for RawCircuit {
    fn default() -> Self {
        RawCircuit {
            failures: default_circuit_failures(),
            error_ratio: default_error_ratio(),
            window: default_circuit_window(),
            min_requests: default_min_requests(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_circuit_failures() -> u32 {
    5
}
fn default_error_ratio() -> f64 {
    0.5
}
fn default_circuit_window() -> Duration {
    Duration::from_secs(60)
}
fn default_min_requests() -> u32 {
    20
}
fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// `quota:` of a provider: what the account may use there.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
}

/// A sidecar the gateway starts and supervises (quickstart; edge hosts use systemd units).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpawn {
    /// GGUF file to serve (relative paths are relative to the working directory).
    pub model: String,
    /// The model name clients and routes use; defaults to the file name without `.gguf`.
    #[serde(default)]
    pub alias: Option<String>,
    /// The sidecar binary; defaults to `lumen-llama` beside the `lumen` binary, then on PATH.
    #[serde(default)]
    pub binary: Option<String>,
    /// Per-model options as `lumen-llama` takes them: `ctx=4096,slots=4,threads=2,sha256=…`.
    #[serde(default)]
    pub options: Option<String>,
    /// Extra `lumen-llama serve` arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// A client-facing model name (or glob) and where it goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// An exact model name (`fast`) or a glob with `*` and `?` (`*embed*`).
    pub model: String,
    #[serde(default)]
    pub strategy: Strategy,
    /// Send each chat to the target (a sidecar) whose prompt cache holds the longest prefix of
    /// its conversation; the strategy decides when none does.
    #[serde(default)]
    pub prefix_affinity: bool,
    pub targets: Vec<RawTarget>,
    /// Requests per key on this route (on top of the key's own limits).
    #[serde(default)]
    pub limits: Option<lumen_plugins::rate_limit::RateConfig>,
    /// Attempts, what is retried, backoff and the total deadline.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// Answer repeated requests from the cache.
    #[serde(default)]
    pub cache: Option<RawRouteCache>,
    /// Race the next target when the first is slow to answer (`routing::hedge`).
    #[serde(default)]
    pub hedge: Option<RawHedge>,
}

/// `hedge:` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHedge {
    /// `400ms` (a fixed delay) or `p95` (that percentile of the route's time to first byte
    /// over the last minute or two).
    pub after: String,
    /// Hedges at most per request (each on another target).
    #[serde(default = "default_max")]
    pub max: u32,
    /// Hedged requests at most, as a share of the route's requests over the last minute:
    /// `5%` or `0.05`.
    #[serde(default = "default_budget")]
    pub budget: serde_yaml::Value,
    /// A first target with a known capacity (a sidecar's slots, `max_in_flight`) is hedged
    /// only while at least this many requests wait beyond its capacity.
    #[serde(default = "default_min_queue")]
    pub min_queue: u32,
}

fn default_max() -> u32 {
    1
}
fn default_budget() -> serde_yaml::Value {
    serde_yaml::Value::String("5%".into())
}
fn default_min_queue() -> u32 {
    1
}

/// How a route picks among its available targets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In order: the first available target (the rest are fallbacks).
    #[default]
    Priority,
    /// Each target in turn.
    RoundRobin,
    /// Smooth weighted round robin by `weight`.
    Weighted,
    /// The target with the fewest requests in flight from this node.
    LeastBusy,
    /// The lowest moving average of time to first byte, exploring now and then.
    LowestLatency,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub provider: String,
    /// The provider's name for the model; defaults to the route's model name.
    #[serde(default)]
    pub model: Option<String>,
    /// Share of traffic under `strategy: weighted`.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `retry:` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all, the first included (across targets: a fallback is an attempt).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Which failures are retried: `connect`, `timeout`, `dropped` (closed before the first
    /// byte), `429`, `5xx`, or a status code such as `503`.
    #[serde(default)]
    pub on: Option<Vec<String>>,
    #[serde(default)]
    pub backoff: RawBackoff,
    /// Time from the request's arrival after which no new attempt starts and a waiting one is
    /// abandoned; the client then gets the last error.
    #[serde(default, with = "opt_duration")]
    pub deadline: Option<Duration>,
}

/// Exponential backoff with full jitter before retrying a target already tried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    #[serde(default = "default_backoff_base", with = "duration")]
    pub base: Duration,
    #[serde(default = "default_backoff_max", with = "duration")]
    pub max: Duration,
}

impl Default for RawBackoff {
    fn default() -> Self {
        RawBackoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(2)
}
