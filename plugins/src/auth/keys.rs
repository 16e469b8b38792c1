//! Static API keys: the table built from `keys:` and the lookup on each request.
//!
//! Only SHA-256 digests are kept — a config file or a memory dump never yields a usable key.
//! A request's key is hashed once, the digest finds its entry in a `HashMap`, and the stored
//! digest is compared again in constant time, so the answer does not depend on how many leading
//! bytes matched. Each entry's [`Principal`] is built here once; a request only clones its `Arc`.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::civil::{days_from_civil, days_in_month};

use super::allow::AllowList;
use super::error::AuthError;
use super::principal::Principal;
use super::settings::KeyConfig;

/// A SHA-256 digest.
pub(crate) type KeyDigest = [u8; 32];

/// One configured key, as a request sees it.
#[derive(Debug)]
struct KeyEntry {
    /// Kept next to the map key for the constant-time re-check.
    digest: KeyDigest,
    principal: Arc<Principal>,
    /// `None`: never expires.
    expires_at: Option<SystemTime>,
    /// Disabled keys stay in the table so their callers get "disabled", not "invalid".
    disabled: bool,
}

/// The `keys:` section, ready for lookups.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    by_digest: HashMap<KeyDigest, KeyEntry>,
}

impl KeyTable {
    /// Builds the table, pushing every problem (with its YAML path) onto `problems`.
    pub(crate) fn build(keys: &[KeyConfig], problems: &mut Vec<(String, String)>) -> KeyTable {
        let mut by_digest = HashMap::with_capacity(keys.len());
        // id → index of the first entry that used it, for the duplicate message.
        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let path = |field: &str| format!("keys[{i}].{field}");
            let mut ok = true;

            if key.id.trim().is_empty() {
                problems.push((path("id"), "must not be empty".into()));
                ok = false;
            } else if key.id.starts_with(super::jwt::JWT_PREFIX) {
                // Token holders are named `jwt:<issuer>:<sub>`: a key named so could be one.
                problems.push((
                    path("id"),
                    format!(
                        "`{}`: ids starting with `{}` are reserved for JWT callers",
                        key.id,
                        super::jwt::JWT_PREFIX
                    ),
                ));
                ok = false;
            } else if let Some(first) = ids.insert(&key.id, i) {
                problems.push((
                    path("id"),
                    format!("duplicate key id `{}` (also keys[{first}])", key.id),
                ));
                ok = false;
            }

            let digest = match (&key.sha256, &key.key) {
                (Some(hex), None) => match parse_hex_digest(hex) {
                    Ok(d) => Some(d),
                    Err(msg) => {
                        problems.push((path("sha256"), msg));
                        None
                    }
                },
                (None, Some(clear)) => match check_clear_key(clear) {
                    Ok(()) => Some(digest_of(clear)),
                    Err(msg) => {
                        problems.push((path("key"), msg));
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    problems.push((
                        path("sha256"),
                        "set either `sha256` or `key`, not both".into(),
                    ));
                    None
                }
                (None, None) => {
                    problems.push((
                        format!("keys[{i}]"),
                        "needs `sha256` (hash from `lumen keys hash`) or `key`".into(),
                    ));
                    None
                }
            };

            let expires_at = match key.expires_at.as_deref().map(parse_rfc3339) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(msg)) => {
                    problems.push((path("expires_at"), msg));
                    ok = false;
                    None
                }
            };

            let limits = match key
                .limits
                .as_ref()
                .map(crate::rate_limit::KeyLimits::from_config)
            {
                None => None,
                Some(Ok(limits)) => Some(limits),
                Some(Err(msg)) => {
                    problems.push((path("limits"), msg));
                    ok = false;
                    None
                }
            };
            let budget = match key.budget.as_ref().map(crate::budget::Budget::from_config) {
                None => None,
                Some(Ok(budget)) => Some(Arc::new(budget)),
                Some(Err(msg)) => {
                    problems.push((path("budget"), msg));
                    ok = false;
                    None
                }
            };
            let Some(digest) = digest else { continue };
            if !ok {
                continue;
            }
            let principal = Arc::new(Principal {
                key_id: key.id.clone(),
                tenant: key.tenant.clone(),
                models: key
                    .models
                    .as_ref()
                    .map(|m| AllowList::new(m.iter().cloned())),
                limits,
                budget,
                configured: true,
            });
            match by_digest.entry(digest) {
                Entry::Occupied(existing) => {
                    let other: &KeyEntry = existing.get();
                    problems.push((
                        path(if key.sha256.is_some() {
                            "sha256"
                        } else {
                            "key"
                        }),
                        format!(
                            "same key as `{}`: each key must be distinct",
                            other.principal.key_id
                        ),
                    ));
                }
                Entry::Vacant(slot) => {
                    slot.insert(KeyEntry {
                        digest,
                        principal,
                        expires_at,
                        disabled: key.disabled,
                    });
                }
            }
        }
        KeyTable { by_digest }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Every configured key's principal (disabled and expired ones too), by id.
    pub(crate) fn principals(&self) -> Vec<Arc<Principal>> {
        let mut all: Vec<Arc<Principal>> = self
            .by_digest
            .values()
            .map(|e| e.principal.clone())
            .collect();
        all.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        all
    }

    /// The principal of the usable (enabled, unexpired) key with this id.
    pub(crate) fn by_id(&self, id: &str, now: SystemTime) -> Option<Arc<Principal>> {
        self.by_digest
            .values()
            .find(|e| e.principal.key_id == id)
            .filter(|e| !e.disabled && e.expires_at.is_none_or(|at| now < at))
            .map(|e| Arc::clone(&e.principal))
    }

    /// Finds the principal for a presented key. Allocates nothing.
    pub(crate) fn lookup(&self, key: &str, now: SystemTime) -> Result<Arc<Principal>, AuthError> {
        let digest = digest_of(key);
        let entry = self
            .by_digest
            .get(&digest)
            .filter(|e| bool::from(e.digest.ct_eq(&digest)))
            .ok_or(AuthError::UnknownKey)?;
        if entry.disabled {
            return Err(AuthError::Disabled);
        }
        if entry.expires_at.is_some_and(|at| now >= at) {
            return Err(AuthError::Expired);
        }
        Ok(Arc::clone(&entry.principal))
    }
}

pub(crate) fn digest_of(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// Rejects clear keys that are surely mistakes rather than secrets.
pub(crate) fn check_clear_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty (an unset environment variable?)".into());
    }
    if key.starts_with("${") && key.ends_with('}') {
        return Err("looks like an unresolved ${ENV} reference".into());
    }
    if key.trim() != key {
        return Err("has leading or trailing whitespace".into());
    }
    Ok(())
}

/// Parses 64 hex digits, either case.
pub(crate) fn parse_hex_digest(hex: &str) -> Result<KeyDigest, String> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return Err(format!(
            "must be 64 hex digits (a SHA-256 from `lumen keys hash`), got {} characters",
            bytes.len()
        ));
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        match pair {
            &[hi, lo] => match (hex_value(hi), hex_value(lo)) {
                (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
                _ => return Err("must be 64 hex digits (0-9, a-f)".into()),
            },
            _ => return Err("must be 64 hex digits (0-9, a-f)".into()),
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    // 0-9, a-f, A-F; a digit is below 16, so it fits.
    char::from(c).to_digit(16).map(|d| d as u8)
}

/// Parses an RFC 3339 timestamp (`2027-01-31T00:00:00Z`, fractions and `±hh:mm` offsets
/// accepted). Hand-written: one format at config load does not justify a date-time crate.
pub(crate) fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("`{s}` is not an RFC 3339 time like 2027-01-31T00:00:00Z");
    // The fixed part, `YYYY-MM-DDThh:mm:ss`, and one byte after it (fraction or zone).
    let Some(b) = s.as_bytes().first_chunk::<20>() else {
        return Err(bad());
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |from: usize, to: usize| -> Result<i64, String> {
        // `get`: a multi-byte character inside the fixed part makes a cut fall inside it.
        let part = s.get(from..to).ok_or_else(bad)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse::<i64>().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);

    // Optional fraction (ignored: keys expire at whole seconds), then the zone.
    let mut rest = s.get(19..).ok_or_else(bad)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let after = frac.trim_start_matches(|c: char| c.is_ascii_digit());
        if after.len() == frac.len() {
            return Err(bad());
        }
        rest = after;
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ => {
            let &[sign @ (b'+' | b'-'), _, _, b':', _, _] = rest.as_bytes() else {
                return Err(bad());
            };
            let digits = |r: &str| -> Result<i64, String> {
                if r.bytes().all(|c| c.is_ascii_digit()) {
                    r.parse::<i64>().map_err(|_| bad())
                } else {
                    Err(bad())
                }
            };
            let part = |from: usize, to: usize| rest.get(from..to).ok_or_else(bad);
            let (oh, om) = (digits(part(1, 3)?)?, digits(part(4, 6)?)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            // Both range-checked just above: at most 86,340, far from i64's limits.
            #[allow(clippy::arithmetic_side_effects)]
            let secs = oh * 3600 + om * 60;
            if sign == b'-' {
                secs.saturating_neg()
            } else {
                secs
            }
        }
    };

    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    // Every part was range-checked above (a 4-digit year: |days| < 4 million), so the sum stays
    // within a few times 10^11, far from i64's limits.
    #[allow(clippy::arithmetic_side_effects)]
    let unix = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let unix = u64::try_from(unix).map_err(|_| format!("`{s}` is before 1970"))?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(unix))
        .ok_or_else(bad)
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

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn parses_rfc3339_utc_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(at(0)));
        assert_eq!(parse_rfc3339("2027-01-31T00:00:00Z"), Ok(at(1_801_353_600)));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:30:15.250Z"),
            Ok(at(1_709_209_815))
        );
        assert_eq!(
            parse_rfc3339("2027-01-31T02:00:00+02:00"),
            Ok(at(1_801_353_600))
        );
        assert_eq!(
            parse_rfc3339("2027-01-30T22:00:00-02:00"),
            Ok(at(1_801_353_600))
        );
    }

    #[test]
    fn rejects_bad_times() {
        for bad in [
            "",
            "2027-01-31",
            "2027-01-31T00:00:00",
            "2027-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2027-01-31T24:00:00Z",
            "2027-01-31T00:00:00.Z",
            "2027-01-31T00:00:00+2:00",
            "２027-01-31T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "+027-01-31T00:00:00Z",
            // A multi-byte character across a field's end: an error, not a panic.
            "2027-01-31T00:00:0é",
            "2027-01-31T00:00:0éZ",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn hex_digest_either_case() {
        let lower = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(parse_hex_digest(lower), Ok(digest_of("test")));
        assert_eq!(
            parse_hex_digest(&lower.to_uppercase()),
            Ok(digest_of("test"))
        );
        assert!(parse_hex_digest(&lower[..62]).is_err());
        assert!(parse_hex_digest(&format!("{}zz", &lower[..62])).is_err());
    }
}
