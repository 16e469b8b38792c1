//! Model allow-lists: which model names a principal may call.
//!
//! An entry is either an exact name or a glob with `*` (any run of characters, `/` included)
//! and `?` (exactly one character). Exact names go in a set so the common case is one hash
//! lookup; globs are few and tried in order.

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
    let (mut p, mut t) = (0usize, 0usize);
    // (pattern offset just after the last `*`, text offset that `*` currently stops at)
    let mut star: Option<(usize, usize)> = None;
    while let Some(tc) = text[t..].chars().next() {
        match pattern[p..].chars().next() {
            Some('*') => {
                p += 1;
                star = Some((p, t));
                continue;
            }
            Some('?') => {
                p += 1;
                t += tc.len_utf8();
                continue;
            }
            Some(pc) if pc == tc => {
                p += pc.len_utf8();
                t += tc.len_utf8();
                continue;
            }
            _ => {}
        }
        // Mismatch: let the last `*` swallow one more character, or fail.
        let Some((after_star, star_t)) = star else {
            return false;
        };
        let Some(skipped) = text[star_t..].chars().next() else {
            return false;
        };
        let next_t = star_t + skipped.len_utf8();
        star = Some((after_star, next_t));
        p = after_star;
        t = next_t;
    }
    pattern[p..].chars().all(|c| c == '*')
}

#[cfg(test)]
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
