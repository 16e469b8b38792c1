//! Reads the presented credential off a request's headers: `Authorization: Bearer X`, else
//! `X-API-Key: X`. Used for API keys and JWTs (`mod.rs`) and for the admin key (`admin.rs`).
//!
//! A leaf of `auth`: it imports nothing of its parent (only the sibling `error.rs`), so that
//! `admin.rs` can use it while `mod.rs` re-exports `admin.rs`'s items.

// Reachable from the network: no panics (issue 16).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use http::header::AUTHORIZATION;
use http::HeaderMap;

use super::error::AuthError;

/// The presented credential: `Authorization: Bearer X` (scheme in any case), else `X-API-Key`.
pub(super) fn credential(headers: &HeaderMap) -> Result<&str, AuthError> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let value = match bearer {
        Some(token) => token,
        None => match headers.get("x-api-key") {
            // Not visible ASCII: cannot be a key we issued.
            Some(v) => v.to_str().map_err(|_| AuthError::UnknownKey)?.trim(),
            None => return Err(AuthError::Missing),
        },
    };
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(value)
}
