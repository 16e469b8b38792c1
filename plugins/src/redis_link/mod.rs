//! The Redis connections shared by every policy that keeps state in Redis (shared limits, the
//! cache, the ledger, jobs): one multiplexed connection per tokio runtime, made lazily. The
//! fleet's Redis is one server (re-connected in the background by redis-rs's
//! `ConnectionManager`), a Redis Cluster (redis-rs's cluster client: slots, MOVED/ASK, topology
//! refresh) or a master watched by Sentinel (asked again after an error that says the master
//! moved, and every few seconds by [`RedisLink::topology`]).
//!
//! Every call goes through a [`RedisConn`] tagged with its operation, which times it and counts
//! its failures for the metrics ([`RedisObserver`]).
//!
//! One per runtime, not one per node: a connection's reader and writer run as a task on the
//! runtime that made it, so with `server.runtime: per_core` (one single-threaded runtime per
//! thread) a single shared connection made every other thread's Redis call wait for that one
//! thread to be scheduled, and under load calls missed `redis.timeout` and fell back. Finding
//! the caller's connection is one lock-free `arc-swap` load; only making one takes a lock.
//!
//! While no connection can be made, calls fail fast (once a second a new attempt), so Redis
//! being down costs a request nothing but the fallback its policy chooses.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};
use tokio::runtime::Handle;
use tokio::sync::Mutex as AsyncMutex;

mod conn;
pub mod owed;
pub mod topology;

use conn::{Inner, Shared};
pub use conn::{RedisConn, RedisObserver};
pub use topology::{Topology, TopologyNode};

/// Connections kept for runtimes at most. A process has a handful of runtimes (the proxy's, one
/// per core with `per_core`, the background services'); ids are never reused, so a runtime that
/// ended leaves an entry behind until this many newer ones push it out.
const MAX_RUNTIMES: usize = 64;

/// Where the fleet's Redis is (`redis.url`, `redis.cluster` or `redis.sentinel`).
#[derive(Debug, Clone, PartialEq)]
pub enum Servers {
    /// One server: `redis://host:port[/db]` or `rediss://…`.
    One(String),
    /// Seed nodes of a Redis Cluster; the rest are learned from them.
    Cluster(Vec<String>),
    /// Sentinels watching the master named `master`.
    Sentinel { master: String, nodes: Vec<String> },
}

/// How to reach the fleet's Redis. Its `Debug` shows no password (config snapshots are
/// printed in logs and errors).
#[derive(Clone, PartialEq)]
pub struct LinkSettings {
    pub servers: Servers,
    /// ACL user and password for the data nodes (and for Sentinels: ACL users are per server,
    /// so an operator who protects Sentinels gives them the same credentials).
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM of the certificate authority that signed the servers' certificates, for `rediss://`
    /// with a private CA (without it the system's roots are used).
    pub tls_ca: Option<Vec<u8>>,
    /// Longest wait for one call.
    pub timeout: Duration,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden =
            |urls: &[String]| -> Vec<String> { urls.iter().map(|u| hide_password(u)).collect() };
        let servers = match &self.servers {
            Servers::One(url) => format!("One({})", hide_password(url)),
            Servers::Cluster(nodes) => format!("Cluster({:?})", hidden(nodes)),
            Servers::Sentinel { master, nodes } => {
                format!(
                    "Sentinel {{ master: {master:?}, nodes: {:?} }}",
                    hidden(nodes)
                )
            }
        };
        f.debug_struct("LinkSettings")
            .field("servers", &servers)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca.as_ref().map(|pem| pem.len()))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL split around its password: (`scheme://user:`, the password, `@host…`), when it has
/// one. The user part ends at the last `@` (a password may hold an unescaped `/` or `@`; a
/// host never does).
fn around_password(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")?.checked_add(3)?;
    let rest = url.get(start..)?;
    let at = rest.rfind('@')?;
    let colon = rest.get(..at)?.find(':')?;
    let (before, password) = url.split_at(start.checked_add(colon)?.checked_add(1)?);
    let (password, after) = password.split_at(at.checked_sub(colon)?.checked_sub(1)?);
    (!password.is_empty()).then_some((before, password, after))
}

/// The password written into `url` (`scheme://[user]:password@host…`), if any.
pub fn url_password(url: &str) -> Option<&str> {
    around_password(url).map(|(_, password, _)| password)
}

/// `url` with its password, if any, replaced by `***`.
pub fn hide_password(url: &str) -> String {
    match around_password(url) {
        Some((before, _, after)) => format!("{before}***{after}"),
        None => url.to_string(),
    }
}

impl LinkSettings {
    /// Settings for one server at `url`, with no credentials beyond the URL's.
    pub fn url(url: &str, timeout: Duration) -> LinkSettings {
        LinkSettings {
            servers: Servers::One(url.to_string()),
            username: None,
            password: None,
            tls_ca: None,
            timeout,
        }
    }
}

/// The connection made on one runtime (`None`: called from outside any runtime).
struct Made {
    runtime: Option<tokio::runtime::Id>,
    generation: u64,
    conn: Inner,
}

/// Why Redis gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable; next connection attempt in under a second")]
    Backoff,
    /// Refused before anything was sent.
    #[error("{0}")]
    Unsent(&'static str),
}

/// A write Redis did not answer, with what it would have written: the caller decides whether
/// to take it back or to apply it later with [`resend`] (such writes apply once however often
/// they are sent).
#[derive(Debug)]
pub struct Unanswered<P> {
    pub error: SharedError,
    pub pending: P,
}

/// A reservation's id: 16 bytes from the OS's generator. Ids must not collide (a second
/// reservation with the first's id would be taken for its retry), so a generator that cannot
/// answer is an error, for `on_redis_error` to decide.
pub fn write_id() -> Result<String, SharedError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|_| SharedError::Unsent("no random bytes for a reservation id"))?;
    Ok(format!("{:032x}", u128::from_le_bytes(bytes)))
}

/// Seconds between the tries of [`RedisLink::resend`]: soon, then less often, for about nine
/// minutes. A failover takes seconds; an outage longer than this loses the write (and the
/// Redis error metrics show the outage).
const RESEND_AFTER: [u64; 9] = [0, 1, 2, 5, 10, 30, 60, 120, 300];

/// Writes waiting to be sent again, at most: a long outage under load must not grow a task
/// per request without bound. A write beyond it is dropped and counted as a failed call.
const RESENDING_AT_MOST: usize = 10_000;

impl SharedError {
    /// Whether the call may have run in Redis (its answer lost): only a call refused before it
    /// was sent (no connection, within a second of the last failed attempt) surely did not.
    pub fn may_have_run(&self) -> bool {
        !matches!(self, SharedError::Backoff | SharedError::Unsent(_))
    }
}

/// The clients connections are made from, by topology.
enum Clients {
    One(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    /// Sentinel's client asks the Sentinels for the master each time it is called.
    Sentinel(AsyncMutex<SentinelClient>),
}

/// The connections and the time budget every call gets.
pub struct RedisLink {
    clients: Clients,
    /// Longest wait for one call.
    pub timeout: Duration,
    settings: LinkSettings,
    shared: Arc<Shared>,
    conns: ArcSwap<Vec<Made>>,
    /// Held only while a connection is being made, so two callers on one runtime make one.
    making: AsyncMutex<()>,
    /// Monotonic ms (since `epoch`) before which no new connection is attempted.
    retry_at_ms: AtomicU64,
    epoch: Instant,
    /// What [`RedisLink::topology`] saw last, and the failovers it noticed.
    pub(crate) seen: topology::Seen,
}

/// Why the settings cannot make a link.
fn invalid(what: impl std::fmt::Display) -> String {
    format!("invalid redis settings: {what}")
}

impl RedisLink {
    /// `url` like `redis://127.0.0.1:6379`; nothing is connected until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisLink, String> {
        RedisLink::with_settings(LinkSettings::url(url, timeout))
    }

    /// A link to the servers `settings` name; nothing is connected until the first call.
    pub fn with_settings(settings: LinkSettings) -> Result<RedisLink, String> {
        let certs = settings.tls_ca.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        });
        let clients = match &settings.servers {
            Servers::One(url) => {
                let mut info = url.as_str().into_connection_info().map_err(invalid)?;
                if settings.username.is_some() {
                    info.redis.username.clone_from(&settings.username);
                }
                if settings.password.is_some() {
                    info.redis.password.clone_from(&settings.password);
                }
                let client = match &certs {
                    Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                    None => redis::Client::open(info),
                };
                Clients::One(client.map_err(invalid)?)
            }
            Servers::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(settings.timeout.max(Duration::from_millis(200)))
                    // Each call's own timeout bounds it; the client's retries (redirects, a
                    // primary being replaced) happen inside that time.
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(user) = &settings.username {
                    builder = builder.username(user.clone());
                }
                if let Some(password) = &settings.password {
                    builder = builder.password(password.clone());
                }
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                Clients::Cluster(builder.build().map_err(invalid)?)
            }
            Servers::Sentinel { master, nodes } => {
                let mut addrs = Vec::new();
                let mut tls = None;
                for node in nodes {
                    let info = node.as_str().into_connection_info().map_err(invalid)?;
                    if let ConnectionAddr::TcpTls { insecure, .. } = &info.addr {
                        tls = Some(if *insecure {
                            redis::TlsMode::Insecure
                        } else {
                            redis::TlsMode::Secure
                        });
                    }
                    addrs.push(info.addr);
                }
                let mut builder =
                    SentinelClientBuilder::new(addrs, master.clone(), SentinelServerType::Master)
                        .map_err(invalid)?;
                if let Some(mode) = tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(mode)
                        .set_client_to_sentinel_tls_mode(mode);
                }
                if let Some(user) = &settings.username {
                    builder = builder
                        .set_client_to_redis_username(user.clone())
                        .set_client_to_sentinel_username(user.clone());
                }
                if let Some(password) = &settings.password {
                    builder = builder
                        .set_client_to_redis_password(password.clone())
                        .set_client_to_sentinel_password(password.clone());
                }
                if let Some(certs) = &certs {
                    builder = builder
                        .set_client_to_redis_certificates(certs.clone())
                        .set_client_to_sentinel_certificates(certs.clone());
                }
                Clients::Sentinel(AsyncMutex::new(builder.build().map_err(invalid)?))
            }
        };
        Ok(RedisLink {
            clients,
            timeout: settings.timeout,
            settings,
            shared: Arc::new(Shared {
                observer: OnceLock::new(),
                generation: AtomicU64::new(0),
                resending: std::sync::atomic::AtomicUsize::new(0),
            }),
            conns: ArcSwap::from_pointee(Vec::new()),
            making: AsyncMutex::new(()),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            seen: topology::Seen::default(),
        })
    }

    /// Tells `observer` of every call from now on (the gateway's metrics). Set once.
    pub fn observe(&self, observer: Arc<dyn RedisObserver>) {
        let _ = self.shared.observer.set(observer);
    }

    /// The settings this link was made from.
    pub fn settings(&self) -> &LinkSettings {
        &self.settings
    }

    fn follows_sentinel(&self) -> bool {
        matches!(self.clients, Clients::Sentinel(_))
    }

    /// A connection made (or found) for `op`, or the reason there is none, counted then as a
    /// failed call under `op` (it never reached Redis).
    fn hand_out(
        &self,
        op: &'static str,
        started: Instant,
        made: Result<(Inner, u64), SharedError>,
        blocking: bool,
    ) -> Result<RedisConn, SharedError> {
        match made {
            Ok((inner, generation)) => Ok(RedisConn::new(
                inner,
                op,
                self.shared.clone(),
                generation,
                self.follows_sentinel(),
                blocking,
            )),
            Err(e) => {
                if let Some(observer) = self.shared.observer.get() {
                    observer.call(op, started.elapsed(), true);
                }
                Err(e)
            }
        }
    }

    /// A handle on the calling runtime's connection (a cheap clone), making it if needed. Its
    /// calls are timed and counted under `op`.
    pub async fn connection(&self, op: &'static str) -> Result<RedisConn, SharedError> {
        let started = Instant::now();
        let made = self.runtime_connection().await;
        self.hand_out(op, started, made, false)
    }

    async fn runtime_connection(&self) -> Result<(Inner, u64), SharedError> {
        let runtime = Handle::try_current().ok().map(|h| h.id());
        if let Some(found) = self.made_on(runtime) {
            return Ok(found);
        }
        let _making = self.making.lock().await;
        if let Some(found) = self.made_on(runtime) {
            return Ok(found);
        }
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.retry_at_ms.load(Ordering::Acquire) {
            return Err(SharedError::Backoff);
        }
        let generation = self.shared.generation.load(Ordering::Acquire);
        let wait = self.timeout.max(Duration::from_millis(200));
        match tokio::time::timeout(wait, self.make(false)).await {
            Ok(Ok(conn)) => {
                self.conns.rcu(|made| {
                    let keep = made.len().saturating_sub(MAX_RUNTIMES.saturating_sub(1));
                    let mut next: Vec<Made> = made
                        .iter()
                        .skip(keep)
                        // A runtime's connection of an ended generation is replaced here.
                        .filter(|m| m.runtime != runtime)
                        .map(|m| Made {
                            runtime: m.runtime,
                            generation: m.generation,
                            conn: m.conn.clone(),
                        })
                        .collect();
                    next.push(Made {
                        runtime,
                        generation,
                        conn: conn.clone(),
                    });
                    Arc::new(next)
                });
                Ok((conn, generation))
            }
            Ok(Err(e)) => {
                self.retry_at_ms
                    .store(now_ms.saturating_add(1000), Ordering::Release);
                Err(e.into())
            }
            Err(_) => {
                self.retry_at_ms
                    .store(now_ms.saturating_add(1000), Ordering::Release);
                Err(SharedError::Timeout(wait))
            }
        }
    }

    /// A new connection of the topology's kind; `dedicated`: one that is nobody else's, for
    /// blocking commands.
    async fn make(&self, dedicated: bool) -> redis::RedisResult<Inner> {
        let connect = self.timeout.max(Duration::from_millis(200));
        match &self.clients {
            Clients::One(client) if dedicated => Ok(Inner::Plain(
                client
                    .get_multiplexed_async_connection_with_config(
                        &AsyncConnectionConfig::new().set_connection_timeout(connect),
                    )
                    .await?,
            )),
            Clients::One(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                Ok(Inner::Managed(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Clients::Cluster(client) => Ok(Inner::Cluster(client.get_async_connection().await?)),
            Clients::Sentinel(sentinel) => {
                let master = sentinel.lock().await.async_get_client().await?;
                Ok(Inner::Plain(
                    master
                        .get_multiplexed_async_connection_with_config(
                            &AsyncConnectionConfig::new().set_connection_timeout(connect),
                        )
                        .await?,
                ))
            }
        }
    }

    fn made_on(&self, runtime: Option<tokio::runtime::Id>) -> Option<(Inner, u64)> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        self.conns
            .load()
            .iter()
            .find(|m| m.runtime == runtime && m.generation == generation)
            .map(|m| (m.conn.clone(), m.generation))
    }

    /// A connection of its own, for blocking commands (`XREADGROUP BLOCK`, `XREAD BLOCK`) that
    /// would hold up everyone else's calls on the shared one.
    pub async fn dedicated(&self, op: &'static str) -> Result<RedisConn, SharedError> {
        let started = Instant::now();
        let wait = self.timeout.max(Duration::from_millis(500));
        let generation = self.shared.generation.load(Ordering::Acquire);
        let made = match tokio::time::timeout(wait, self.make(true)).await {
            Ok(Ok(conn)) => Ok((conn, generation)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SharedError::Timeout(wait)),
        };
        self.hand_out(op, started, made, true)
    }

    /// Runs one call within the link's timeout.
    pub async fn within<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        Ok(tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??)
    }

    /// Sends a write that applies once however often it is sent (a settle, a refund) until
    /// Redis takes it, off the caller's path, on the current runtime.
    pub fn resend<F, Fut>(&self, what: &'static str, mut write: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), SharedError>> + Send + 'static,
    {
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        if shared.resending.fetch_add(1, Ordering::AcqRel) >= RESENDING_AT_MOST {
            shared.resending.fetch_sub(1, Ordering::AcqRel);
            if let Some(observer) = shared.observer.get() {
                observer.call(what, Duration::ZERO, true);
            }
            tracing::warn!(
                what,
                "too many redis writes waiting to be resent; this one is dropped"
            );
            return;
        }
        /// Counts the write out however its task ends (done, given up, runtime shut down).
        struct Waiting(Arc<Shared>);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.resending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let waiting = Waiting(shared);
        runtime.spawn(async move {
            let _waiting = waiting;
            for wait in RESEND_AFTER {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if write().await.is_ok() {
                    return;
                }
            }
            tracing::warn!(
                what,
                "redis took no write for nine minutes; this one is dropped"
            );
        });
    }

    /// Runs `op` on the calling runtime's connection (its calls counted under `name`) within
    /// the link's timeout, and once more if the connection turned out to be dead, while time is
    /// left.
    ///
    /// After Redis restarts (or a Sentinel failover), every connection learns it is dead on its
    /// next call: redis-rs fails that call (and every call already waiting on the same
    /// connection) and starts a new one. Without the second try a concurrent burst right after a
    /// restart would all fall back to each node's local bucket. Only for commands where running
    /// twice errs on the safe side (a call that reached Redis before the connection broke may
    /// have run): taking a slot or reserving counts more, never less.
    pub async fn retrying<T, F, Fut>(&self, name: &'static str, mut op: F) -> Result<T, SharedError>
    where
        F: FnMut(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            // The first try's error, once it was sent: a second try that cannot even connect
            // must not say nothing was sent.
            let mut sent: Option<redis::RedisError> = None;
            let mut retried = false;
            loop {
                let conn = match self.connection(name).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(sent.take().map_or(e, SharedError::from)),
                };
                match op(conn).await {
                    Err(e) if !retried && conn::stale_master(&e) => {
                        tracing::debug!(error = %e, "redis connection was dead; one more try on its replacement");
                        retried = true;
                        sent = Some(e);
                    }
                    result => return result.map_err(SharedError::from),
                }
            }
        };
        tokio::time::timeout(self.timeout, attempts)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))?
    }
}

impl RedisLink {
    /// Asks Redis for its topology (this is also the health check: an error means Redis did not
    /// answer), records failovers, and returns the view.
    pub async fn topology(&self) -> Result<Topology, SharedError> {
        let wait = self.timeout.max(Duration::from_secs(1));
        let found = tokio::time::timeout(wait, self.ask_topology())
            .await
            .map_err(|_| SharedError::Timeout(wait))??;
        Ok({
            let (topology, moved) = self.seen.record(self.kind(), found);
            if moved {
                // Connections to the old master would answer READONLY or not at all.
                self.shared
                    .forget(self.shared.generation.load(Ordering::Acquire));
            }
            topology
        })
    }

    /// The view [`RedisLink::topology`] returned last (`None` before the first answer).
    pub fn last_topology(&self) -> Option<Topology> {
        self.seen.last()
    }

    fn kind(&self) -> &'static str {
        match self.clients {
            Clients::One(_) => "server",
            Clients::Cluster(_) => "cluster",
            Clients::Sentinel(_) => "sentinel",
        }
    }

    async fn ask_topology(&self) -> Result<Vec<topology::Found>, SharedError> {
        match &self.clients {
            Clients::One(client) => {
                let mut conn = self.connection("topology").await?;
                let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
                let addr = client.get_connection_info().addr.to_string();
                Ok(topology::parse_role(&addr, &role))
            }
            Clients::Cluster(_) => {
                let mut conn = self.connection("topology").await?;
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?;
                Ok(topology::parse_cluster_nodes(&nodes))
            }
            Clients::Sentinel(sentinel) => {
                let name = match &self.settings.servers {
                    Servers::Sentinel { master, .. } => master.clone(),
                    _ => String::new(),
                };
                let client = sentinel.lock().await.async_get_sentinel_client().await?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let master: HashMap<String, String> = redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await?;
                let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await?;
                let sentinels: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await?;
                let asked = client.get_connection_info().addr.to_string();
                Ok(topology::sentinel_view(
                    &master, &replicas, &sentinels, &asked,
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{hide_password, url_password};

    #[test]
    fn a_url_password_is_found_and_hidden_whatever_it_holds() {
        assert_eq!(url_password("redis://:pw@h:6379"), Some("pw"));
        let url = "rediss://lumen:pa/s@s@10.0.0.1:6379/2";
        assert_eq!(url_password(url), Some("pa/s@s"));
        assert_eq!(hide_password(url), "rediss://lumen:***@10.0.0.1:6379/2");
        for plain in [
            "redis://h:6379",
            "redis://lumen@h:6379",
            "redis://lumen:@h",
            "nonsense",
        ] {
            assert_eq!(url_password(plain), None, "{plain}");
            assert_eq!(hide_password(plain), plain);
        }
    }
}
