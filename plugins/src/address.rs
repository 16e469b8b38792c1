//! Client addresses: who a request comes from, and the per-address request limit.
//!
//! Three pieces, each plain Rust:
//! - [`Cidr`]: an address block (`10.0.0.0/8`, `fd00::/8`, a bare address) from
//!   `server.trusted_proxies`;
//! - [`client_ip`]: the client's address, which is the peer's unless the peer is a trusted proxy,
//!   in which case it is read from `X-Forwarded-For`, right to left, skipping trusted hops (the
//!   left part of that header is whatever the client sent, so only entries appended by our own
//!   proxies are believed);
//! - [`bucket_of`]: the address a limit is counted against. An IPv6 client usually owns a whole
//!   /64 (SLAAC, privacy addresses), so IPv6 addresses are cut to `ipv6_prefix` bits; otherwise
//!   a client could walk around `limits.per_ip` by changing the low bits of its address.
//!
//! [`AddressLimiter`] is the in-process limit per address. Unlike per-key limits (a bounded set
//! named by the config), addresses are chosen by whoever connects, so its state must not grow
//! with their number: it counts in `pingora-limits`' [`Estimator`] (a count-min sketch, a fixed
//! table of atomic counters, lock-free). A sketch can only over-count (colliding addresses add
//! up), never under-count, so nobody gets past the limit; with [`SLOTS`] counters per row an
//! innocent address is charged about `requests in the window / SLOTS` extra requests, and all
//! [`HASHES`] rows must collide for a flooder's count to land on it.
//!
//! The limit itself is a sliding window, as `pingora-limits`' `Rate` estimates it: the current
//! window's count plus the previous window's, weighted by how much of it still overlaps. A
//! `count` per `period` with `burst` becomes at most `burst` requests per window of
//! `burst × period / count`: the same average rate, and no more than `burst` at once. (`Rate`
//! itself is not used because it reads the clock; here `now` is passed in, so tests drive time.)

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU64;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pingora_limits::estimator::Estimator;

use crate::rate_limit::{LimitReason, Limited, RateStatus, RequestLimit};

/// Rows of the sketch: an address is over-counted only when it collides in all of them.
pub const HASHES: usize = 4;
/// Counters per row. Two windows × 4 rows × 16384 × 8 bytes = 1 MiB, whatever the traffic.
pub const SLOTS: usize = 16_384;
/// Windows shorter than this are widened (with the burst scaled up to keep the rate): rotating
/// the sketch every few milliseconds would make the estimate mostly noise.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// A block of addresses: `network/prefix`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/8`, `192.0.2.7` (a /32), `::1` (a /128). Host bits set under the
    /// prefix are an error: `10.1.2.3/8` is more likely a typo than a network.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: the prefix length must be 0 to {max}")),
            },
        };
        if mask(network, prefix) != network {
            return Err(format!(
                "`{s}` has bits set past its prefix (the network is {}/{prefix})",
                mask(network, prefix)
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `ip` with every bit past the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX
                .checked_shl(32u32.saturating_sub(u32::from(prefix)))
                .unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX
                .checked_shl(128u32.saturating_sub(u32::from(prefix)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// The address a per-address limit counts against: IPv4 addresses whole, IPv6 addresses cut to
/// their first `ipv6_prefix` bits. IPv4-mapped IPv6 addresses (`::ffff:192.0.2.7`, seen on
/// dual-stack listeners) are IPv4.
pub fn bucket_of(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        v6 => mask(v6, ipv6_prefix),
    }
}

/// The client's address: `peer` itself unless it is in `trusted`; then the right-most entry of
/// `X-Forwarded-For` (every header value, in order) that is not a trusted hop.
///
/// Entries are read right to left because each proxy appends the address it saw: the entries
/// our trusted proxies wrote are at the end, and anything left of them was sent by the client.
/// An entry that is not an address (or `unknown`) ends the walk at the last trusted hop, since
/// nothing left of it can be believed; so does a header made only of trusted hops.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    for value in forwarded_for.rev() {
        for entry in value.rsplit(',') {
            let Some(ip) = parse_forwarded(entry) else {
                return client;
            };
            client = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, with or without a port (`192.0.2.7:4711`,
/// `[2001:db8::1]:4711`), as some proxies write it.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// Request counts per client address in a fixed amount of memory (see the module doc).
pub struct AddressLimiter {
    /// Made on first use: a gateway without `limits.per_ip` never allocates the sketches.
    state: OnceLock<Windows>,
    origin: Instant,
}

/// Two sketches taking turns: the current window's counts and the previous one's.
struct Windows {
    sketches: [Estimator; 2],
    /// Index (since `origin`) of the current window; `sketches[epoch % 2]` counts it.
    epoch: AtomicU64,
    /// The window length the counts were made with; a reload that changes it starts afresh.
    window_ms: AtomicU64,
}

impl Default for AddressLimiter {
    fn default() -> Self {
        AddressLimiter::new()
    }
}

impl AddressLimiter {
    pub fn new() -> AddressLimiter {
        AddressLimiter {
            state: OnceLock::new(),
            origin: Instant::now(),
        }
    }

    /// Counts one request from `address` (already cut by [`bucket_of`]) at `now`, or refuses it
    /// without counting it, so a client that backs off is admitted again at the limit's rate.
    pub fn check(
        &self,
        address: IpAddr,
        limit: &RequestLimit,
        now: Instant,
    ) -> Result<RateStatus, Limited> {
        let (window, allowed) = window_of(limit);
        // `window_of` never returns less than MIN_WINDOW; the floor of 1 only spares the division.
        let window_ms = NonZeroU64::new(window.as_millis() as u64).unwrap_or(NonZeroU64::MIN);
        let w = self.state.get_or_init(|| Windows {
            sketches: [Estimator::new(HASHES, SLOTS), Estimator::new(HASHES, SLOTS)],
            epoch: AtomicU64::new(0),
            window_ms: AtomicU64::new(window_ms.get()),
        });
        let elapsed_ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        if w.window_ms.swap(window_ms.get(), Ordering::AcqRel) != window_ms.get() {
            // A reload changed the limit: counts of another window length mean nothing now.
            w.sketches.iter().for_each(Estimator::reset);
            w.epoch.store(elapsed_ms / window_ms, Ordering::Release);
        }
        let epoch = w.rotate(elapsed_ms / window_ms);
        // A caller whose `now` is older than the current window counts as its start.
        let into = if elapsed_ms / window_ms < epoch {
            0.0
        } else {
            (elapsed_ms % window_ms) as f64 / window_ms.get() as f64
        };
        let (current, previous) = w.turn(epoch);
        let before = previous.get(address).max(0) as f64 * (1.0 - into);
        let count = current.incr(address, 1).max(0) as f64;
        let estimate = before + count;
        let allowed_f = f64::from(allowed);
        let left_in_window = window.mul_f64(1.0 - into);
        if estimate <= allowed_f {
            return Ok(RateStatus {
                limit: limit.count,
                remaining: (allowed_f - estimate).floor() as u32,
                // Until this window's requests no longer weigh on the estimate.
                reset_after: left_in_window.saturating_add(window),
            });
        }
        current.decr(address, 1);
        let count = count - 1.0;
        let before_full = before / (1.0 - into).max(f64::EPSILON);
        // When one more request fits: later in this window if the previous window's share is
        // what is in the way, else in the next window, once this one's share has shrunk.
        let wait = if count + 1.0 <= allowed_f && before_full > 0.0 {
            let until = 1.0 - (allowed_f - count - 1.0) / before_full;
            window.mul_f64((until - into).max(0.0))
        } else {
            let until = 1.0 - (allowed_f - 1.0) / count.max(1.0);
            left_in_window.saturating_add(window.mul_f64(until.clamp(0.0, 1.0)))
        };
        Err(Limited {
            retry_after: wait.max(Duration::from_millis(1)),
            status: RateStatus {
                limit: limit.count,
                remaining: 0,
                reset_after: left_in_window.saturating_add(window),
            },
            reason: LimitReason::Requests,
        })
    }
}

impl Windows {
    /// Window `epoch`'s sketch (`sketches[epoch % 2]`) and the other one.
    fn turn(&self, epoch: u64) -> (&Estimator, &Estimator) {
        let [even, odd] = &self.sketches;
        if epoch.is_multiple_of(2) {
            (even, odd)
        } else {
            (odd, even)
        }
    }

    /// Moves to window `now` if it is newer; returns the current window. The first caller to
    /// see a new window clears the sketch that held the window before last (both, if more than
    /// one window passed). Callers racing with the clear may count into it a little early or
    /// late: the estimate is approximate by design.
    fn rotate(&self, now: u64) -> u64 {
        let seen = self.epoch.load(Ordering::Acquire);
        if now <= seen {
            return seen;
        }
        match self
            .epoch
            .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                let (current, other) = self.turn(now);
                current.reset();
                // `now > seen` was checked above.
                if now.saturating_sub(seen) >= 2 {
                    other.reset();
                }
                now
            }
            Err(newer) => newer,
        }
    }
}

/// The sliding window for a limit and the requests it admits per window.
fn window_of(limit: &RequestLimit) -> (Duration, u32) {
    let count = limit.count.max(1);
    let burst = limit.burst.max(1);
    let window = limit.period.mul_f64(f64::from(burst) / f64::from(count));
    if window >= MIN_WINDOW {
        return (window, burst);
    }
    // The same rate over a second.
    let per_second = f64::from(count) / limit.period.as_secs_f64();
    (MIN_WINDOW, (per_second.ceil() as u32).max(burst))
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn per_minute(count: u32, burst: u32) -> RequestLimit {
        RequestLimit {
            count,
            period: Duration::from_secs(60),
            burst,
        }
    }

    #[test]
    fn ipv6_addresses_are_cut_to_their_prefix_and_ipv4_kept_whole() {
        assert_eq!(
            bucket_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            bucket_of(ip("2001:db8:1:2::1"), 64),
            bucket_of(ip("2001:db8:1:2:ffff::9"), 64)
        );
        assert_ne!(
            bucket_of(ip("2001:db8:1:2::1"), 64),
            bucket_of(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(bucket_of(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        assert_eq!(bucket_of(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(bucket_of(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(bucket_of(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(bucket_of(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.200.3.4")));
        assert!(net.contains(ip("::ffff:10.1.1.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            !net.contains(ip("::a00:1")),
            "an IPv6 address is not in an IPv4 block"
        );
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        assert_eq!(v6.to_string(), "fd00::/8");
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.1.2.3/8",
            "proxy",
            "10.0.0.0/x",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let xff = ["203.0.113.9"];
        // An untrusted peer's header is ignored: anyone can send one.
        assert_eq!(
            client_ip(ip("198.51.100.1"), xff.into_iter(), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff.into_iter(), &[]),
            ip("10.0.0.5"),
            "nothing trusted by default"
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff.into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // No header from a trusted proxy: the proxy is the client.
        assert_eq!(
            client_ip(ip("10.0.0.5"), [].into_iter(), &trusted),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn forwarded_for_takes_the_right_most_untrusted_entry() {
        let trusted = cidrs(&["10.0.0.0/8", "fd00::/8"]);
        let peer = ip("10.0.0.5");
        // The client forged the first entry; our proxies appended the rest.
        assert_eq!(
            client_ip(
                peer,
                ["1.1.1.1, 203.0.113.9, 10.1.1.1"].into_iter(),
                &trusted
            ),
            ip("203.0.113.9")
        );
        // Several headers are one list, in order.
        assert_eq!(
            client_ip(
                peer,
                ["1.1.1.1", "2001:db8::7,fd00::2"].into_iter(),
                &trusted
            ),
            ip("2001:db8::7")
        );
        // Ports and brackets, as some proxies write them.
        assert_eq!(
            client_ip(peer, ["[2001:db8::8]:4711"].into_iter(), &trusted),
            ip("2001:db8::8")
        );
        assert_eq!(
            client_ip(peer, ["203.0.113.9:4711"].into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            client_ip(
                peer,
                ["203.0.113.9, unknown, 10.1.1.1"].into_iter(),
                &trusted
            ),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_ip(peer, [""].into_iter(), &trusted),
            peer,
            "an empty header"
        );
        // Only trusted hops: the left-most of them.
        assert_eq!(
            client_ip(peer, ["10.9.9.9, 10.1.1.1"].into_iter(), &trusted),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn an_address_gets_its_burst_then_is_refused_until_the_window_slides() {
        let limiter = AddressLimiter::new();
        let t0 = limiter.origin;
        // 60 a minute, burst 3: 3 requests per 3-second window.
        let limit = per_minute(60, 3);
        let a = ip("192.0.2.1");
        for remaining in [2, 1, 0] {
            let status = limiter.check(a, &limit, t0).unwrap();
            assert_eq!((status.limit, status.remaining), (60, remaining));
        }
        let refused = limiter.check(a, &limit, t0).unwrap_err();
        assert_eq!(refused.reason, LimitReason::Requests);
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_secs(6));
        // Another address has its own count.
        assert!(limiter.check(ip("192.0.2.2"), &limit, t0).is_ok());
        // Refusals are not counted: after the wait it was told, one more is admitted.
        let later = t0 + refused.retry_after + Duration::from_millis(10);
        assert!(limiter.check(a, &limit, later).is_ok());
        // Two windows on, the past weighs nothing.
        let much_later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert!(limiter.check(a, &limit, much_later).is_ok());
        }
        assert!(limiter.check(a, &limit, much_later).is_err());
    }

    #[test]
    fn the_previous_window_weighs_by_its_overlap() {
        let limiter = AddressLimiter::new();
        let t0 = limiter.origin;
        let limit = per_minute(60, 4); // 4 per 4 s
        let a = ip("2001:db8::1");
        for _ in 0..4 {
            limiter.check(a, &limit, t0).unwrap();
        }
        // A quarter into the next window, 3 of the previous 4 still count: one fits.
        let t = t0 + Duration::from_secs(5);
        assert!(limiter.check(a, &limit, t).is_ok());
        assert!(limiter.check(a, &limit, t).is_err());
        // Three quarters in, 1 of 4 plus the 1 admitted: two more fit.
        let t = t0 + Duration::from_secs(7);
        assert!(limiter.check(a, &limit, t).is_ok());
        assert!(limiter.check(a, &limit, t).is_ok());
        assert!(limiter.check(a, &limit, t).is_err());
    }

    #[test]
    fn memory_stays_fixed_however_many_addresses_call() {
        let limiter = AddressLimiter::new();
        let t0 = limiter.origin;
        let limit = per_minute(600, 600);
        // 100k distinct addresses, once each: every one is admitted (no false refusals
        // at this load), and the state is the same two sketches it was at the start.
        for i in 0..100_000u32 {
            let a = IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64));
            assert!(limiter.check(a, &limit, t0).is_ok(), "address {i}");
        }
        let w = limiter.state.get().unwrap();
        assert_eq!(w.sketches.len(), 2);
    }

    #[test]
    fn short_periods_are_widened_to_a_second_at_the_same_rate() {
        let fast = RequestLimit {
            count: 100,
            period: Duration::from_secs(1),
            burst: 5,
        };
        assert_eq!(window_of(&fast), (Duration::from_secs(1), 100));
        assert_eq!(window_of(&per_minute(60, 3)), (Duration::from_secs(3), 3));
        assert_eq!(
            window_of(&per_minute(600, 600)),
            (Duration::from_secs(60), 600)
        );
    }

    #[test]
    fn a_changed_limit_starts_afresh() {
        let limiter = AddressLimiter::new();
        let t0 = limiter.origin;
        let a = ip("192.0.2.1");
        limiter.check(a, &per_minute(60, 1), t0).unwrap();
        assert!(limiter.check(a, &per_minute(60, 1), t0).is_err());
        assert!(limiter.check(a, &per_minute(60, 2), t0).is_ok());
    }
}
