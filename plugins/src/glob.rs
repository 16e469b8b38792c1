//! Model-name globs: `*` (any run of characters, `/` included) and `?` (exactly one
//! character), as allow-lists, route patterns and price entries write them.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

/// Matches `text` against `pattern` (`*`, `?`), character-wise, without allocating.
///
/// Greedy with one backtrack point (the last `*`), which is enough for these two wildcards and
/// keeps the worst case at O(len(pattern) × len(text)) rather than exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
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
}
