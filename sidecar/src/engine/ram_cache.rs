//! Host-memory copies of evicted slot caches (`prompt_cache_ram`).
//!
//! A slot holds one conversation's KV cells. When a request from another conversation takes the
//! slot, those cells would be lost and the first conversation's next turn would read its whole
//! history again. With a RAM budget, the engine first copies the slot's cells out
//! (`llama_state_seq_get_data`) into an entry here, with the tokens they hold; a later request
//! whose prompt shares a longer prefix with an entry than with any slot gets the entry copied
//! back into a slot (`llama_state_seq_set_data`) and reads only the rest. The bytes are llama.cpp's
//! own, so the answer is the same as from the slot it left.
//!
//! Bounded by bytes, least recently used out first. An entry that is a prefix of a newer one is
//! dropped (the newer one serves it too). An entry leaves this cache when it is restored: it is
//! in a slot again, and is saved again if evicted again.

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::SeqState;

/// How many leading tokens `a` and `b` share (also how slots are matched, in `generate`).
pub(super) fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What an entry's state weighs against the budget (a trait so the bookkeeping is testable
/// without a llama context).
pub(super) trait Weighed {
    fn byte_len(&self) -> usize;
}

impl Weighed for SeqState {
    fn byte_len(&self) -> usize {
        SeqState::byte_len(self)
    }
}

/// One evicted slot cache.
#[derive(Debug)]
pub(super) struct Saved<S = SeqState> {
    /// The tokens at positions `0..tokens.len()` of the saved sequence.
    pub tokens: Vec<LlamaToken>,
    /// The conversation prefix hashes it served (`affinity`), reported in `/health`.
    pub prefixes: Vec<u64>,
    pub state: S,
}

#[derive(Debug)]
struct Entry<S> {
    saved: Saved<S>,
    last_used: u64,
}

/// The entries and their byte budget.
#[derive(Debug)]
pub(super) struct RamCache<S = SeqState> {
    budget: usize,
    used: usize,
    clock: u64,
    entries: Vec<Entry<S>>,
}

impl<S: Weighed> RamCache<S> {
    /// A cache of at most `budget` bytes; 0 turns it off.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry sharing the longest prefix with `prompt` (ties: the most recently saved), and
    /// how many tokens it shares.
    pub fn best(&self, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.saved.tokens, prompt)))
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))
    }

    /// Removes entry `i` (from [`Self::best`]) to put it back into a slot.
    pub fn take(&mut self, i: usize) -> Saved<S> {
        let entry = self.entries.swap_remove(i);
        self.used -= entry.saved.state.byte_len();
        entry.saved
    }

    /// Adds `saved`, dropping entries it extends and then the least recently used ones until
    /// it fits. An entry that already extends it is kept instead (and counts as used now).
    /// Returns false (and keeps nothing) when it is larger than the whole budget.
    pub fn insert(&mut self, saved: Saved<S>) -> bool {
        let size = saved.state.byte_len();
        if size > self.budget {
            return false;
        }
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.saved.tokens.starts_with(&saved.tokens))
        {
            e.last_used = self.clock;
            return true;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = e.saved.tokens.len() <= saved.tokens.len()
                && saved.tokens.starts_with(&e.saved.tokens);
            if covered {
                freed += e.saved.state.byte_len();
            }
            !covered
        });
        self.used -= freed;
        while self.used + size > self.budget {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
            else {
                break;
            };
            self.take(oldest);
        }
        self.used += size;
        self.entries.push(Entry {
            saved,
            last_used: self.clock,
        });
        true
    }

    /// Every entry's conversation prefix hashes.
    pub fn prefixes(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .flat_map(|e| e.saved.prefixes.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weighed for usize {
        fn byte_len(&self) -> usize {
            *self
        }
    }

    fn saved(ids: std::ops::Range<i32>, bytes: usize) -> Saved<usize> {
        Saved {
            tokens: ids.map(LlamaToken).collect(),
            prefixes: Vec::new(),
            state: bytes,
        }
    }

    fn prompt(ids: std::ops::Range<i32>) -> Vec<LlamaToken> {
        ids.map(LlamaToken).collect()
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_leaves_when_taken() {
        let mut c = RamCache::new(100);
        assert!(c.insert(saved(0..10, 10)));
        assert!(c.insert(saved(100..130, 10)));
        assert_eq!(c.best(&prompt(100..140)), Some((1, 30)));
        assert_eq!(c.best(&prompt(0..5)).map(|b| b.1), Some(5));
        let got = c.take(1);
        assert_eq!(got.tokens.len(), 30);
        assert_eq!((c.len(), c.bytes()), (1, 10));
        assert_eq!(c.best(&prompt(100..140)).map(|b| b.1), Some(0));
    }

    #[test]
    fn the_budget_holds_least_recently_saved_first_out() {
        let mut c = RamCache::new(25);
        assert!(c.insert(saved(0..10, 10)));
        assert!(c.insert(saved(100..110, 10)));
        assert!(c.insert(saved(200..210, 10)));
        assert_eq!((c.len(), c.bytes()), (2, 20));
        assert_eq!(
            c.best(&prompt(0..10)).map(|b| b.1),
            Some(0),
            "the oldest left"
        );
        // Larger than the whole budget: refused, nothing else lost.
        assert!(!c.insert(saved(300..310, 26)));
        assert_eq!((c.len(), c.bytes()), (2, 20));
        // Off.
        assert!(!RamCache::<usize>::new(0).enabled());
    }

    #[test]
    fn an_entry_that_a_newer_one_extends_is_dropped() {
        let mut c = RamCache::new(100);
        assert!(c.insert(saved(0..10, 10)));
        assert!(c.insert(saved(0..20, 15)));
        assert_eq!((c.len(), c.bytes()), (1, 15));
        // A shorter one is served by the longer one: nothing added.
        assert!(c.insert(saved(0..5, 5)));
        assert_eq!((c.len(), c.bytes()), (1, 15));
    }
}
