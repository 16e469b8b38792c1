//! Model allow-lists: which model names a principal may call.
//!
//! An entry is either an exact name or a glob with `*` (any run of characters, `/` included)
//! and `?` (exactly one character). Exact names go in a set so the common case is one hash
//! lookup; globs are few and tried in order.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashSet;

use crate::glob::glob_match;

/// A parsed allow-list. Built once per key at config load (or per token for JWTs).
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowList {
    exact: HashSet<String>,
    globs: Vec<String>,
}

impl AllowList {
    pub(crate) fn new<I, S>(entries: I) -> AllowList
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list = AllowList::default();
        for entry in entries {
            let entry = entry.into();
            if entry.contains(['*', '?']) {
                list.globs.push(entry);
            } else {
                list.exact.insert(entry);
            }
        }
        list
    }

    /// Every entry, exact names first (sorted), then globs in order.
    pub(crate) fn entries(&self) -> Vec<String> {
        let mut exact: Vec<String> = self.exact.iter().cloned().collect();
        exact.sort();
        exact.extend(self.globs.iter().cloned());
        exact
    }

    pub(crate) fn allows(&self, model: &str) -> bool {
        self.exact.contains(model) || self.globs.iter().any(|g| glob_match(g, model))
    }
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
    fn exact_and_glob_entries() {
        let list = AllowList::new(["gpt-4o", "local/*", "gpt-4?"]);
        assert!(list.allows("gpt-4o"));
        assert!(list.allows("gpt-41"));
        assert!(list.allows("local/qwen"));
        assert!(!list.allows("gpt-4o-mini"));
        assert!(!list.allows("claude"));
        assert!(!AllowList::new(Vec::<String>::new()).allows("gpt-4o"));
    }
}
