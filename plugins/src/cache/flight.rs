//! Coalescing: identical cacheable requests that arrive while the first is in flight wait for
//! it instead of calling upstream again.
//!
//! The first request for a key becomes the leader and publishes its response as it goes: the
//! head, every chunk, and how it ended. Followers read the same record: a follower that asked
//! for the same shape (stream or not) as the leader gets the leader's chunks as they arrive;
//! one that asked for the other shape waits for the end and renders the assembled answer. If
//! the leader fails, its flight ends and the next follower to join again becomes the leader
//! (the others follow it), so one failure never fans out into a burst of upstream calls.
//!
//! The map of flights is sharded by key; a shard's lock is held for one map operation. A
//! flight's own lock is held to append or copy chunks, never across an `.await`.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

const SHARDS: usize = 16;

/// The response head a leader got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// `text/event-stream` responses.
    pub sse: bool,
    pub provider: String,
}

/// How a flight ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The whole response went out; with the assembled non-stream body when there is one.
    Complete(Option<Bytes>),
    /// The leader failed, or its answer was not one to share (an error status, too large).
    Failed,
}

#[derive(Default)]
struct Record {
    head: Option<Head>,
    chunks: Vec<Bytes>,
    bytes: usize,
    end: Option<End>,
}

/// One request in flight and what it has received so far.
#[derive(Default)]
pub struct Flight {
    record: Mutex<Record>,
    changed: Notify,
}

/// What a follower has not seen yet.
#[derive(Debug, Default)]
pub struct Update {
    pub head: Option<Head>,
    pub chunks: Vec<Bytes>,
    pub end: Option<End>,
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, Record> {
        match self.record.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn snapshot(&self, seen: usize) -> Update {
        let record = self.lock();
        Update {
            head: record.head.clone(),
            chunks: record
                .chunks
                .get(seen..)
                .map(<[Bytes]>::to_vec)
                .unwrap_or_default(),
            end: record.end.clone(),
        }
    }

    /// Waits up to `wait` for anything beyond the first `seen` chunks (or the end), and
    /// returns it. An empty update means the wait ran out.
    pub async fn next(&self, seen: usize, wait: Duration) -> Update {
        let deadline = deadline_after(wait);
        loop {
            // Registered before looking, so a change between the look and the wait is seen.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let update = self.snapshot(seen);
            if !update.chunks.is_empty() || update.end.is_some() {
                return update;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Update::default();
            }
        }
    }

    /// The head, waiting up to `wait` for it (None: no head in time, or the flight failed
    /// before one).
    pub async fn head(&self, wait: Duration) -> Option<Head> {
        let deadline = deadline_after(wait);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let record = self.lock();
                if record.head.is_some() || record.end.is_some() {
                    return record
                        .head
                        .clone()
                        .filter(|_| record.end != Some(End::Failed));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits up to `wait` for the end.
    pub async fn end(&self, wait: Duration) -> Option<End> {
        let deadline = deadline_after(wait);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(end) = self.lock().end.clone() {
                return Some(end);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// Every flight of this node, by cache key.
pub struct Flights {
    shards: Vec<Mutex<HashMap<String, Arc<Flight>>>>,
}

impl Default for Flights {
    fn default() -> Self {
        Flights::new()
    }
}

/// The caller's role for a key.
pub enum Join {
    /// Nobody is fetching this: go upstream and publish through the guard.
    Leader(Leader),
    /// Someone is: read their flight.
    Follower(Arc<Flight>),
}

impl Flights {
    pub fn new() -> Flights {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // Keys are hex digests: their first bytes are already uniform.
        let i = key.bytes().take(4).fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % SHARDS;
        // `i < SHARDS`, the length `new` gives `shards`.
        #[allow(clippy::indexing_slicing)]
        let shard = &self.shards[i];
        match shard.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Joins the flight for `key`, or starts it. `limit`: the most bytes the leader records
    /// for followers; a bigger answer ends the flight for them (they go upstream themselves).
    pub fn join(self: &Arc<Self>, key: &str, limit: usize) -> Join {
        let mut shard = self.shard(key);
        if let Some(flight) = shard.get(key) {
            return Join::Follower(flight.clone());
        }
        let flight = Arc::new(Flight::default());
        shard.insert(key.to_string(), flight.clone());
        Join::Leader(Leader {
            flights: self.clone(),
            key: key.to_string(),
            flight,
            limit,
            ended: false,
        })
    }

    /// Flights in progress (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, key: &str, flight: &Arc<Flight>) {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(key);
        }
    }
}

/// The leader's side of a flight. Dropped without [`Leader::complete`], the flight fails (the
/// leader's client went away, or its request failed), and followers take over.
pub struct Leader {
    flights: Arc<Flights>,
    key: String,
    flight: Arc<Flight>,
    limit: usize,
    ended: bool,
}

impl Leader {
    /// Publishes the response head. Only a success is shared: on an error status the flight
    /// ends here and followers try for themselves.
    pub fn head(&mut self, head: Head) {
        if head.status != 200 {
            self.finish(End::Failed);
            return;
        }
        self.flight.lock().head = Some(head);
        self.flight.changed.notify_waiters();
    }

    /// Publishes one chunk of the body as sent to the leader's client.
    pub fn chunk(&mut self, chunk: &Bytes) {
        if self.ended {
            return;
        }
        let overflow = {
            let mut record = self.flight.lock();
            record.bytes = record.bytes.saturating_add(chunk.len());
            if record.bytes > self.limit {
                true
            } else {
                record.chunks.push(chunk.clone());
                false
            }
        };
        if overflow {
            self.finish(End::Failed);
        } else {
            self.flight.changed.notify_waiters();
        }
    }

    /// The response is complete; `body` is the assembled non-stream answer, if any.
    pub fn complete(mut self, body: Option<Bytes>) {
        self.finish(End::Complete(body));
    }

    fn finish(&mut self, end: End) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.flights.remove(&self.key, &self.flight);
        self.flight.lock().end = Some(end);
        self.flight.changed.notify_waiters();
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.finish(End::Failed);
    }
}

/// `wait` from now. A wait too long to represent is cut to a year: nothing waits that long.
fn deadline_after(wait: Duration) -> tokio::time::Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(YEAR))
        .unwrap_or(now)
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

    fn head() -> Head {
        Head {
            status: 200,
            sse: true,
            provider: "p".into(),
        }
    }

    #[tokio::test]
    async fn followers_see_chunks_as_they_arrive_and_the_end() {
        let flights = Arc::new(Flights::new());
        let Join::Leader(mut leader) = flights.join("k", 1 << 20) else {
            panic!("first is the leader")
        };
        let Join::Follower(flight) = flights.join("k", 1 << 20) else {
            panic!("second follows")
        };
        let reader = {
            let flight = flight.clone();
            tokio::spawn(async move {
                let head = flight.head(Duration::from_secs(5)).await;
                let mut seen = Vec::new();
                loop {
                    let u = flight.next(seen.len(), Duration::from_secs(5)).await;
                    seen.extend(u.chunks);
                    if let Some(end) = u.end {
                        return (head, seen, end);
                    }
                }
            })
        };
        leader.head(head());
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            leader.chunk(&Bytes::from(format!("c{i}")));
        }
        leader.complete(Some(Bytes::from_static(b"{}")));
        let (h, chunks, end) = reader.await.unwrap();
        assert_eq!(h, Some(head()));
        assert_eq!(chunks, vec!["c0", "c1", "c2"]);
        assert_eq!(end, End::Complete(Some(Bytes::from_static(b"{}"))));
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_leader_fails_the_flight_and_the_next_joiner_leads() {
        let flights = Arc::new(Flights::new());
        let leader = flights.join("k", 1 << 20);
        let Join::Follower(flight) = flights.join("k", 1 << 20) else {
            panic!()
        };
        drop(leader);
        assert_eq!(flight.end(Duration::from_secs(1)).await, Some(End::Failed));
        assert!(flight.head(Duration::from_millis(10)).await.is_none());
        assert!(matches!(flights.join("k", 1 << 20), Join::Leader(_)));
    }

    #[tokio::test]
    async fn error_statuses_and_oversized_answers_are_not_shared() {
        let flights = Arc::new(Flights::new());
        let Join::Leader(mut leader) = flights.join("k", 4) else {
            panic!()
        };
        let Join::Follower(flight) = flights.join("k", 4) else {
            panic!()
        };
        leader.head(head());
        leader.chunk(&Bytes::from_static(b"12345"));
        assert_eq!(flight.end(Duration::from_secs(1)).await, Some(End::Failed));

        let Join::Leader(mut leader) = flights.join("e", 1 << 20) else {
            panic!()
        };
        let Join::Follower(flight) = flights.join("e", 1 << 20) else {
            panic!()
        };
        leader.head(Head {
            status: 503,
            ..head()
        });
        assert!(flight.head(Duration::from_secs(1)).await.is_none());
    }

    #[tokio::test]
    async fn waits_are_bounded() {
        let flights = Arc::new(Flights::new());
        let _leader = flights.join("k", 1 << 20);
        let Join::Follower(flight) = flights.join("k", 1 << 20) else {
            panic!()
        };
        let started = std::time::Instant::now();
        assert!(flight.head(Duration::from_millis(50)).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
        let u = flight.next(0, Duration::from_millis(20)).await;
        assert!(u.chunks.is_empty() && u.end.is_none());
    }
}
