//! Credentials in request headers: `Authenticator::authenticate` on arbitrary `Authorization` and
//! `X-API-Key` values and on JWTs with arbitrary headers and claims, validly signed or not.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use lumen_plugins::auth::{AuthMode, Authenticator, JwtConfig, KeyConfig};
use serde_json::{json, Value};

use crate::engine::{outcome, shape, Target};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com";
const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!!";
/// The one key that authenticates.
const KEY: &str = "lk-fuzz-0123456789abcdef";

/// One live key, one disabled, one expired, one HS256 issuer (built from the config's own
/// serde shape, so new optional fields do not break the target).
fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let keys: Vec<KeyConfig> = serde_json::from_value(json!([
            {"id": "fuzz-key", "key": KEY, "tenant": "acme", "models": ["fast", "local/*"]},
            {"id": "disabled", "key": "lk-disabled", "disabled": true},
            {"id": "expired", "key": "lk-expired", "expires_at": "2020-01-01T00:00:00Z"},
        ]))
        .expect("key config");
        let jwt: Vec<JwtConfig> = serde_json::from_value(json!([
            {"issuer": ISS, "audience": "lumen", "algorithms": ["HS256"], "secret": SECRET,
             "claims": {"key_id": "sub", "tenant": "org", "models": "models"}},
        ]))
        .expect("jwt config");
        Authenticator::new(AuthMode::Required, &keys, &jwt).expect("a valid auth config")
    })
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

/// Input layout: the first byte picks how the rest becomes headers (see [`headers_of`]).
pub fn auth_target() -> Target {
    let header = |alg: &str| json!({"alg": alg, "typ": "JWT"}).to_string();
    let claims = |extra: Value| {
        let mut c =
            json!({"iss": ISS, "aud": "lumen", "sub": "user-1", "exp": NOW + 600, "iat": NOW - 10});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        c.to_string()
    };
    let jwt = |header: String, claims: String, signature: &str| {
        let mut seed = vec![3];
        seed.extend_from_slice(format!("{header}\x00{claims}\x00{signature}").as_bytes());
        seed
    };
    let mut seeds = vec![
        [
            &[0][..],
            format!("authorization: Bearer {KEY}\nx-api-key: other").as_bytes(),
        ]
        .concat(),
        [&[0][..], b"x-api-key: lk-disabled\n"].concat(),
        [&[1][..], format!("bearer   {KEY}  ").as_bytes()].concat(),
        [&[1][..], b"Basic dXNlcjpwYXNz"].concat(),
        [&[1][..], b"Bearer a.b.c"].concat(),
        [&[2][..], KEY.as_bytes()].concat(),
        [&[2][..], b"lk-expired"].concat(),
        jwt(header("HS256"), claims(json!({})), ""),
        jwt(
            header("HS256"),
            claims(json!({"org": "acme", "models": ["fast", "x*"], "rpm": 60})),
            "",
        ),
        jwt(
            header("HS256"),
            claims(json!({"aud": ["x", "lumen"], "nbf": NOW + 100})),
            "",
        ),
        jwt(header("HS256"), claims(json!({"exp": NOW - 100})), ""),
        jwt(header("HS384"), claims(json!({})), ""),
        jwt(header("none"), claims(json!({})), "forged"),
        jwt(
            json!({"alg": "RS256", "kid": "k1"}).to_string(),
            claims(json!({})),
            "sig",
        ),
    ];
    seeds.push(jwt(
        header("HS256"),
        claims(json!({"sub": 7, "models": "fast"})),
        "",
    ));
    Target {
        name: "auth_headers",
        seeds,
        dict: [
            "Bearer ",
            "bearer ",
            "authorization: ",
            "x-api-key: ",
            KEY,
            "\"alg\":",
            "\"exp\":",
            "\"iss\":",
            "\"aud\":",
            "\"sub\":",
            "\"nbf\":",
            "\"kid\":",
            "\"models\":",
            "\"rpm\":",
            "\"org\":",
            ".",
            "=",
            "\x00",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        max_len: 2048,
        json: false,
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=group.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// The headers an input stands for. Mode 0: `name: value` lines; 1: the rest is the
/// `Authorization` value; 2: the `X-API-Key` value; 3: `header NUL claims NUL signature`, sent
/// as a bearer JWT, signed with the issuer's secret when the signature part is empty.
fn headers_of(input: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some((mode, rest)) = input.split_first() else {
        return headers;
    };
    let mut add = |name: &[u8], value: &[u8]| {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    };
    match mode % 4 {
        0 => {
            for line in rest.split(|b| *b == b'\n') {
                if let Some(colon) = line.iter().position(|b| *b == b':') {
                    let value = &line[colon + 1..];
                    add(&line[..colon], value.strip_prefix(b" ").unwrap_or(value));
                }
            }
        }
        1 => add(b"authorization", rest),
        2 => add(b"x-api-key", rest),
        _ => {
            let mut parts = rest.splitn(3, |b| *b == 0);
            let header = base64url(parts.next().unwrap_or_default());
            let claims = base64url(parts.next().unwrap_or_default());
            let message = format!("{header}.{claims}");
            let signature = match parts.next().unwrap_or_default() {
                [] => jsonwebtoken::crypto::sign(
                    message.as_bytes(),
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                    Algorithm::HS256,
                )
                .unwrap_or_default(),
                other => base64url(other),
            };
            add(
                b"authorization",
                format!("Bearer {message}.{signature}").as_bytes(),
            );
        }
    }
    headers
}

/// The credential `authenticate` reads, by the documented rule: `Authorization: Bearer`, else
/// `X-API-Key`, trimmed.
fn presented(headers: &HeaderMap) -> Option<String> {
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| {
        let (scheme, rest) = v.to_str().ok()?.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_string())
    });
    bearer.or_else(|| Some(headers.get("x-api-key")?.to_str().ok()?.trim().to_string()))
}

/// Never panics; only the live key or a validly signed, unexpired token of the issuer gets in.
pub fn check_auth(input: &[u8]) -> u64 {
    let headers = headers_of(input);
    match authenticator().authenticate(&headers, now()) {
        Err(e) => outcome(shape(&e.to_string())),
        Ok(None) => panic!("auth is required, yet no principal and no error"),
        Ok(Some(principal)) => {
            let credential = presented(&headers).expect("accepted without a credential");
            if principal.key_id == "fuzz-key" {
                assert_eq!(credential, KEY, "a wrong key was accepted");
                assert_eq!(principal.tenant.as_deref(), Some("acme"));
                return outcome("key");
            }
            assert!(
                principal.key_id.starts_with(&format!("jwt:{ISS}:")),
                "accepted as an unknown caller: {}",
                principal.key_id
            );
            let (message, signature) = credential.rsplit_once('.').expect("a JWT");
            let valid = jsonwebtoken::crypto::verify(
                signature,
                message.as_bytes(),
                &DecodingKey::from_secret(SECRET.as_bytes()),
                Algorithm::HS256,
            );
            assert!(
                matches!(valid, Ok(true)),
                "a token without a valid signature was accepted"
            );
            let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&credential)
                .expect("accepted claims decode")
                .claims;
            assert_eq!(claims["iss"], ISS);
            let exp = claims["exp"].as_f64().expect("an accepted token has exp");
            assert!(
                exp + 30.0 >= NOW as f64,
                "an expired token was accepted (exp {exp})"
            );
            outcome(("jwt", principal.tenant.is_some(), principal.may_use("fast")))
        }
    }
}
