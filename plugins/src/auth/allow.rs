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

/// Matches `text` against `pattern` (`*`, `?`), character-wise, without allocating.
///
/// Greedy with one backtrack point (the last `*`), which is enough for these two wildcards and
/// keeps the worst case at O(len(pattern) × len(text)) rather than exponential.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    // What is left of each to match: suffixes, always cut at a character boundary.
    let (mut p, mut t) = (pattern, text);
    // (pattern just after the last `*`, text that `*` currently stops at)
    let mut star: Option<(&str, &str)> = None;
    loop {
        let mut t_chars = t.chars();
        let Some(tc) = t_chars.next() else {
            break;
        };
        let mut p_chars = p.chars();
        match p_chars.next() {
            Some('*') => {
                p = p_chars.as_str();
                star = Some((p, t));
                continue;
            }
            Some('?') => {
                p = p_chars.as_str();
                t = t_chars.as_str();
                continue;
            }
            Some(pc) if pc == tc => {
                p = p_chars.as_str();
                t = t_chars.as_str();
                continue;
            }
            _ => {}
        }
        // Mismatch: let the last `*` swallow one more character, or fail.
        let Some((after_star, star_t)) = star else {
            return false;
        };
        let mut skipped = star_t.chars();
        if skipped.next().is_none() {
            return false;
        }
        let next_t = skipped.as_str();
        star = Some((after_star, next_t));
        p = after_star;
        t = next_t;
    }
    p.chars().all(|c| c == '*')
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
    fn glob_wildcards() {
        assert!(glob_match("local/*", "local/llama-3"));
        assert!(glob_match("local/*", "local/"));
        assert!(!glob_match("local/*", "openai/gpt-4"));
        assert!(glob_match("gpt-4?", "gpt-4o"));
        assert!(!glob_match("gpt-4?", "gpt-4"));
        assert!(!glob_match("gpt-4?", "gpt-4o-mini"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*mini", "gpt-4o-mini"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("*-*-*", "a-b-c-d"));
        assert!(glob_match("caf?", "café"));
        assert!(!glob_match("exact", "exactly"));
    }

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
