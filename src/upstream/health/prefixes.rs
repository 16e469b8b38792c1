//! Which conversations a provider's prompt cache holds, for routes with `prefix_affinity`:
//! the prefix hashes a sidecar reports in its `/health` (every slot's conversation), and the
//! last requests this node sent it (fresher than the last probe). See `routing::affinity` for
//! the hashes themselves.
//!
//! Lock-free both ways: the reported set is an `arc-swap` snapshot, replaced by the prober; the
//! sent ones are a ring of atomics, written with one `fetch_add` and a store per request.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Requests remembered per provider. Each is one hash (its whole conversation so far), which
/// is what the next turn of that conversation starts with.
const SENT: usize = 256;

#[derive(Debug)]
pub struct HeldPrefixes {
    /// Sorted, from the provider's last health answer.
    reported: ArcSwap<Vec<u64>>,
    /// The conversations of the last [`SENT`] requests sent there (0: empty).
    sent: Box<[AtomicU64]>,
    next: AtomicUsize,
}

impl Default for HeldPrefixes {
    fn default() -> Self {
        HeldPrefixes {
            reported: ArcSwap::from_pointee(Vec::new()),
            sent: (0..SENT).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl HeldPrefixes {
    /// What the provider's health answer says its caches hold.
    pub fn set_reported(&self, mut hashes: Vec<u64>) {
        hashes.sort_unstable();
        hashes.dedup();
        self.reported.store(Arc::new(hashes));
    }

    /// A request whose conversation hashes to `hash` was sent there.
    pub fn note_sent(&self, hash: u64) {
        if hash != 0 {
            let at = self.next.fetch_add(1, Relaxed) % SENT;
            self.sent[at].store(hash, Relaxed);
        }
    }

    fn holds(&self, reported: &[u64], hash: u64) -> bool {
        reported.binary_search(&hash).is_ok() || self.sent.iter().any(|s| s.load(Relaxed) == hash)
    }

    /// How many leading messages of a conversation (its hash `chain`) the provider holds.
    pub fn longest(&self, chain: &[u64]) -> usize {
        let reported = self.reported.load();
        (1..=chain.len())
            .rev()
            .find(|&k| self.holds(&reported, chain[k - 1]))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_held_prefix_counts_reported_and_sent_conversations() {
        let held = HeldPrefixes::default();
        assert_eq!(held.longest(&[1, 2, 3]), 0);
        held.set_reported(vec![9, 1]);
        assert_eq!(held.longest(&[1, 2, 3]), 1);
        held.note_sent(2);
        assert_eq!(held.longest(&[1, 2, 3]), 2);
        assert_eq!(held.longest(&[5, 6]), 0);
        // The ring forgets the oldest.
        for h in 100..100 + SENT as u64 {
            held.note_sent(h);
        }
        assert_eq!(held.longest(&[1, 2, 3]), 1);
    }
}
