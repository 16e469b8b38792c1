//! Canonical JSON written straight from a request's bytes, without building a `Value` tree.
//!
//! A parsed tree of many small JSON values costs many times the body's size (an 8 MiB body of
//! small objects took over a gigabyte), and keying a cache-enabled request must not cost that.
//! This walks the body once with serde's visitor, writing the same canonical form as
//! [`super::canonical`] does for the parsed value: object keys sorted (a repeated key keeps its
//! last value, as a parsed map does), no whitespace, integral floats written as integers. Only
//! objects are buffered (their members must be sorted), so memory stays near the output's size.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Writes the canonical form of `raw` to `out`, leaving out the top-level object's members
/// named in `skip`. `Err` for anything that is not valid JSON (or nests beyond serde_json's
/// recursion limit).
pub fn canonical_bytes(raw: &[u8], skip: &[&str], out: &mut Vec<u8>) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    Canon { out, skip }.deserialize(&mut de)?;
    de.end()
}

/// One value to write; `skip` applies to its own members only (the top level).
struct Canon<'a, 'b> {
    out: &'a mut Vec<u8>,
    skip: &'b [&'b str],
}

impl<'de> DeserializeSeed<'de> for Canon<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canon<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.out.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As `canonical` does for a parsed float: `1.0` and `1` are the same number.
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            #[allow(clippy::cast_possible_truncation)] // integral and below 2^53: exact
            let whole = v as i64;
            self.out.extend_from_slice(whole.to_string().as_bytes());
        } else if let Some(n) = serde_json::Number::from_f64(v) {
            self.out.extend_from_slice(n.to_string().as_bytes());
        } else {
            self.out.extend_from_slice(b"null");
        }
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, v);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            if !first {
                self.out.push(b',');
            }
            let before = self.out.len();
            let seed = Canon {
                out: &mut *self.out,
                skip: &[],
            };
            if seq.next_element_seed(seed)?.is_none() {
                if !first {
                    // The separator written for an element that did not come.
                    self.out.truncate(before.saturating_sub(1));
                }
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut members: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let mut value = Vec::new();
            if self.skip.contains(&key.as_str()) {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            map.next_value_seed(Canon {
                out: &mut value,
                skip: &[],
            })?;
            members.insert(key, value);
        }
        self.out.push(b'{');
        for (i, (key, value)) in members.into_iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *self.out, &key);
            self.out.push(b':');
            self.out.extend_from_slice(&value);
        }
        self.out.push(b'}');
        Ok(())
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

    fn from_value(text: &str, skip: &[&str]) -> Vec<u8> {
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut out = Vec::new();
        match &value {
            serde_json::Value::Object(map) => {
                super::super::canonical_object(map, &[skip], &mut out)
            }
            other => super::super::canonical(other, &mut out),
        }
        out
    }

    fn from_bytes(text: &str, skip: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        canonical_bytes(text.as_bytes(), skip, &mut out).unwrap();
        out
    }

    #[test]
    fn writes_what_the_parsed_value_writes() {
        for text in [
            r#"{"b": 1, "a": [1, 2.0, -3, 1.5, 1e300, "x\u00e9\n", null, true, false, {}], "c": {"z": [], "y": {"k": 0.0}}}"#,
            r#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}"#,
            r#"{"dup": 1, "dup": 2}"#,
            r#"[]"#,
            r#"[[], [[]], {"a": []}]"#,
            r#""text""#,
            r#"18446744073709551615"#,
            r#"-9223372036854775808"#,
            r#"{"big": 123456789012345678901234567890}"#,
        ] {
            assert_eq!(
                String::from_utf8(from_bytes(text, &["stream", "model"])).unwrap(),
                String::from_utf8(from_value(text, &["stream", "model"])).unwrap(),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_json() {
        let mut out = Vec::new();
        assert!(canonical_bytes(b"{\"a\": }", &[], &mut out).is_err());
        assert!(canonical_bytes(b"{} {}", &[], &mut out).is_err());
        let deep = "[".repeat(100_000);
        assert!(canonical_bytes(deep.as_bytes(), &[], &mut out).is_err());
    }
}
