//! JWT bearer tokens: issuers from `jwt:`, and the checks a token must pass.
//!
//! The token's unverified `iss` only picks which issuer's keys and rules apply; everything is then
//! checked against that issuer's config. The `jsonwebtoken` crate verifies the signature and that
//! the header's `alg` is one the issuer pinned (so `alg: none` and HS/RS confusion fail there,
//! and config refuses to pin HS* beside asymmetric algorithms). Time and audience checks are done
//! here rather than by the crate, because the crate reads the system clock and the gateway wants
//! to pass `now` in (tests drive it; one request sees one instant).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::allow::AllowList;
use super::error::AuthError;
use super::principal::Principal;
use super::settings::{ClaimsMapping, JwtConfig};

/// Clock skew tolerated on `exp` and `nbf` when the config does not say.
const DEFAULT_LEEWAY_SECONDS: u64 = 30;

/// One configured issuer, ready to verify.
struct Issuer {
    audience: Option<String>,
    leeway: u64,
    required_claims: Vec<String>,
    claims: ClaimsMapping,
    /// Pins the algorithms; every claim check is switched off in it and done in [`check_claims`].
    validation: Validation,
    keys: IssuerKeys,
}

enum IssuerKeys {
    /// An HS* secret or a PEM public key: used whatever the token's `kid`.
    One(DecodingKey),
    /// A JWKS: picked by `kid`, or the only key when the token names none.
    Set(Vec<JwksKey>),
}

struct JwksKey {
    kid: Option<String>,
    /// The JWK's own `alg`, when it declares one: the token's `alg` must then equal it.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// The `jwt:` section, by issuer.
#[derive(Default)]
pub(crate) struct IssuerTable {
    by_iss: HashMap<String, Issuer>,
}

impl std::fmt::Debug for IssuerTable {
    /// Names issuers only: keys and secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_iss.keys()).finish()
    }
}

/// Only what is needed to pick the issuer, read before verification.
#[derive(serde::Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl IssuerTable {
    /// Issuers that check no audience, sorted: any token they sign for any service is
    /// accepted here, which is rarely what an operator means (`lumen check` and start-up warn).
    pub(crate) fn without_audience(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .by_iss
            .iter()
            .filter(|(_, issuer)| issuer.audience.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    /// Builds every issuer, reading key files now; problems go onto `problems` with their paths.
    pub(crate) fn build(jwt: &[JwtConfig], problems: &mut Vec<(String, String)>) -> IssuerTable {
        let mut by_iss = HashMap::with_capacity(jwt.len());
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        for (i, cfg) in jwt.iter().enumerate() {
            let before = problems.len();
            if cfg.issuer.is_empty() {
                problems.push((format!("jwt[{i}].issuer"), "must not be empty".into()));
            } else if let Some(first) = first_index.insert(&cfg.issuer, i) {
                problems.push((
                    format!("jwt[{i}].issuer"),
                    format!("duplicate issuer `{}` (also jwt[{first}])", cfg.issuer),
                ));
            }
            let issuer = build_issuer(i, cfg, problems);
            if let (Some(issuer), true) = (issuer, problems.len() == before) {
                by_iss.insert(cfg.issuer.clone(), issuer);
            }
        }
        // `jwt:https://idp:8443:bob` could be issuer `https://idp:8443`'s `bob` or issuer
        // `https://idp`'s `8443:bob`: refuse issuers that would make principal ids ambiguous.
        for (i, cfg) in jwt.iter().enumerate() {
            let clash = jwt.iter().enumerate().find(|(j, other)| {
                *j != i
                    && !other.issuer.is_empty()
                    && cfg.issuer.starts_with(&format!("{}:", other.issuer))
            });
            if let Some((j, other)) = clash {
                problems.push((
                    format!("jwt[{i}].issuer"),
                    format!(
                        "`{}` starts with issuer `{}` (jwt[{j}]) and `:`: their subjects' names \
                         (`jwt:<issuer>:<sub>`) could collide",
                        cfg.issuer, other.issuer
                    ),
                ));
                by_iss.remove(&cfg.issuer);
            }
        }
        IssuerTable { by_iss }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_iss.len()
    }

    /// Verifies `token` and maps its claims to a [`Principal`].
    pub(crate) fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, AuthError> {
        let jwt = |msg: &str| AuthError::Jwt(msg.to_string());

        // `alg` is read by hand first only to name `none` plainly: the crate has no such
        // algorithm and would report a JSON error.
        let header_part = token.split('.').next().unwrap_or_default();
        let header: Value = URL_SAFE_NO_PAD
            .decode(header_part)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| jwt("malformed header"))?;
        match header.get("alg").and_then(Value::as_str) {
            None => return Err(jwt("header has no algorithm")),
            Some(alg) if alg.eq_ignore_ascii_case("none") => {
                return Err(jwt("unsigned tokens (alg none) are not accepted"))
            }
            Some(_) => {}
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| jwt("algorithm not supported"))?;

        let payload_part = token.split('.').nth(1).unwrap_or_default();
        let unverified: Unverified = URL_SAFE_NO_PAD
            .decode(payload_part)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| jwt("malformed claims"))?;
        let iss = unverified.iss.ok_or_else(|| jwt("missing claim `iss`"))?;
        let issuer = self.by_iss.get(&iss).ok_or_else(|| jwt("unknown issuer"))?;

        if !issuer.validation.algorithms.contains(&header.alg) {
            return Err(jwt("algorithm not allowed for this issuer"));
        }
        let key = match &issuer.keys {
            IssuerKeys::One(key) => key,
            IssuerKeys::Set(keys) => {
                let found = match header.kid.as_deref() {
                    Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
                    None if keys.len() == 1 => keys.first(),
                    None => return Err(jwt("token names no key id (kid)")),
                };
                let found = found.ok_or_else(|| jwt("unknown key id (kid)"))?;
                if found.alg.is_some_and(|alg| alg != header.alg) {
                    return Err(jwt("algorithm does not match the key"));
                }
                &found.key
            }
        };

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &issuer.validation)
            .map_err(|e| {
                AuthError::Jwt(
                    match e.kind() {
                        ErrorKind::InvalidSignature => "bad signature",
                        ErrorKind::InvalidAlgorithm => "algorithm not allowed for this issuer",
                        ErrorKind::InvalidKeyFormat
                        | ErrorKind::InvalidEcdsaKey
                        | ErrorKind::InvalidRsaKey(_)
                        | ErrorKind::InvalidEddsaKey => "algorithm does not match the key",
                        _ => "malformed token",
                    }
                    .to_string(),
                )
            })?;
        let claims = data.claims;
        check_claims(issuer, &iss, &claims, now)?;
        principal_from(&iss, &issuer.claims, &claims)
    }
}

/// `exp` (required), `nbf`, `iss`, `aud` and the issuer's required claims, against `now`.
fn check_claims(
    issuer: &Issuer,
    iss: &str,
    claims: &Map<String, Value>,
    now: SystemTime,
) -> Result<(), AuthError> {
    let jwt = |msg: String| AuthError::Jwt(msg);
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let leeway = issuer.leeway as f64;

    // A token without `exp` would be valid forever: always required.
    let exp = claims
        .get("exp")
        .ok_or_else(|| jwt("missing claim `exp`".into()))?
        .as_f64()
        .ok_or_else(|| jwt("claim `exp` is not a number".into()))?;
    if exp + leeway <= now {
        return Err(jwt("expired".into()));
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf
            .as_f64()
            .ok_or_else(|| jwt("claim `nbf` is not a number".into()))?;
        if nbf - leeway > now {
            return Err(jwt("not valid yet (nbf)".into()));
        }
    }
    // The issuer was picked by this same (now verified) claim; checked again so that this
    // function alone states every rule.
    if claims.get("iss").and_then(Value::as_str) != Some(iss) {
        return Err(jwt("wrong issuer".into()));
    }
    if let Some(want) = &issuer.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == want,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(want)),
            _ => false,
        };
        if !ok {
            return Err(jwt("wrong audience".into()));
        }
    }
    for name in &issuer.required_claims {
        if claims.get(name).is_none_or(Value::is_null) {
            return Err(jwt(format!("missing claim `{name}`")));
        }
    }
    Ok(())
}

/// Maps verified claims to a principal through the issuer's [`ClaimsMapping`].
///
/// The key id and tenant are namespaced by the issuer, `jwt:<iss>:<value>` (see
/// [`namespaced`]): an issuer vouches for its own subjects only, so a token with `sub: alice`
/// must not act as the static key `alice` (its jobs, cache entries, limits and usage rows), nor
/// as another issuer's `alice`.
fn principal_from(
    iss: &str,
    map: &ClaimsMapping,
    claims: &Map<String, Value>,
) -> Result<Principal, AuthError> {
    let jwt = |msg: String| AuthError::Jwt(msg);
    let key_id = match claims.get(&map.key_id) {
        Some(Value::String(s)) if !s.is_empty() => namespaced(iss, s),
        Some(Value::Number(n)) => namespaced(iss, &n.to_string()),
        Some(_) => return Err(jwt(format!("claim `{}` is not a string", map.key_id))),
        None => return Err(jwt(format!("missing claim `{}`", map.key_id))),
    };
    let tenant = match claims.get(&map.tenant) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(namespaced(iss, s)),
        Some(_) => return Err(jwt(format!("claim `{}` is not a string", map.tenant))),
    };
    let models = match claims.get(&map.models) {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let names: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
            let names = names.ok_or_else(|| {
                jwt(format!(
                    "claim `{}` must be an array of strings",
                    map.models
                ))
            })?;
            Some(AllowList::new(names))
        }
        Some(_) => {
            return Err(jwt(format!(
                "claim `{}` must be an array of strings",
                map.models
            )))
        }
    };
    let limits = match claims.get(&map.requests_per_minute) {
        None | Some(Value::Null) => None,
        Some(v) => match v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
        {
            Some(rpm) => Some(crate::rate_limit::KeyLimits {
                requests: Some(crate::rate_limit::RequestLimit {
                    count: rpm,
                    period: std::time::Duration::from_secs(60),
                    burst: rpm,
                }),
                concurrency: None,
                tokens: Vec::new(),
            }),
            None => {
                return Err(jwt(format!(
                    "claim `{}` must be a positive integer",
                    map.requests_per_minute
                )))
            }
        },
    };
    let budget = match claims.get(&map.budget_usd) {
        None | Some(Value::Null) => None,
        Some(v) => {
            let budget = match v {
                Value::Number(n) => n.as_f64().and_then(crate::budget::Budget::per_day_usd),
                Value::Object(_) => {
                    serde_json::from_value::<crate::budget::BudgetConfig>(v.clone())
                        .ok()
                        .and_then(|c| crate::budget::Budget::from_config(&c).ok())
                }
                _ => None,
            };
            match budget {
                Some(b) => Some(std::sync::Arc::new(b)),
                None => {
                    return Err(jwt(format!(
                        "claim `{}` must be a positive number (USD per day) or {{\"usd_per_day\", \"usd_per_month\"}}",
                        map.budget_usd
                    )))
                }
            }
        }
    };
    Ok(Principal {
        key_id,
        tenant,
        models,
        limits,
        budget,
        configured: false,
    })
}

/// A token's subject (or tenant) as Lumen names it: `jwt:<iss>:<value>`.
///
/// Static key ids may not start with `jwt:` (config refuses them), and no configured issuer
/// followed by `:` starts another (config refuses that too), so the `iss` a name was made with
/// is always recoverable: names from different sources never meet.
pub(crate) fn namespaced(iss: &str, value: &str) -> String {
    format!("{JWT_PREFIX}{iss}:{value}")
}

/// What every JWT principal's id starts with, and a static key id may not.
pub(crate) const JWT_PREFIX: &str = "jwt:";

fn build_issuer(i: usize, cfg: &JwtConfig, problems: &mut Vec<(String, String)>) -> Option<Issuer> {
    let path = |field: &str| format!("jwt[{i}].{field}");
    let mut ok = true;

    let mut algorithms = Vec::with_capacity(cfg.algorithms.len());
    if cfg.algorithms.is_empty() {
        problems.push((
            path("algorithms"),
            "must list at least one algorithm".into(),
        ));
        ok = false;
    }
    for (j, name) in cfg.algorithms.iter().enumerate() {
        match Algorithm::from_str(name) {
            Ok(alg) => algorithms.push(alg),
            Err(_) => {
                let msg = if name.eq_ignore_ascii_case("none") {
                    "`none` (unsigned tokens) is never allowed".to_string()
                } else {
                    format!(
                        "unknown algorithm `{name}` (one of HS256 HS384 HS512 RS256 RS384 RS512 \
                         PS256 PS384 PS512 ES256 ES384 EdDSA)"
                    )
                };
                problems.push((format!("jwt[{i}].algorithms[{j}]"), msg));
                ok = false;
            }
        }
    }
    let mut families: Vec<AlgorithmFamily> = Vec::new();
    for alg in &algorithms {
        let family = alg.family();
        if !families.contains(&family) {
            families.push(family);
        }
    }
    let hmac = families.contains(&AlgorithmFamily::Hmac);
    if hmac && families.len() > 1 {
        problems.push((
            path("algorithms"),
            "HS* algorithms may not be mixed with asymmetric ones (algorithm confusion)".into(),
        ));
        ok = false;
    }

    for (j, name) in cfg.required_claims.iter().enumerate() {
        if name.is_empty() {
            problems.push((format!("jwt[{i}].required_claims[{j}]"), "is empty".into()));
            ok = false;
        }
    }
    for (field, name) in [
        ("key_id", &cfg.claims.key_id),
        ("tenant", &cfg.claims.tenant),
        ("models", &cfg.claims.models),
        ("budget_usd", &cfg.claims.budget_usd),
    ] {
        if name.is_empty() {
            problems.push((format!("jwt[{i}].claims.{field}"), "is empty".into()));
            ok = false;
        }
    }

    let keys = if hmac {
        for (field, set) in [
            ("public_key_file", cfg.public_key_file.is_some()),
            ("jwks_file", cfg.jwks_file.is_some()),
        ] {
            if set {
                problems.push((
                    path(field),
                    "not used with HS* algorithms (use `secret`)".into(),
                ));
                ok = false;
            }
        }
        match cfg.secret.as_deref() {
            None => {
                problems.push((path("secret"), "HS* algorithms need a `secret`".into()));
                None
            }
            Some("") => {
                problems.push((
                    path("secret"),
                    "is empty (an unset environment variable?)".into(),
                ));
                None
            }
            Some(secret) => Some(IssuerKeys::One(DecodingKey::from_secret(secret.as_bytes()))),
        }
    } else if algorithms.is_empty() {
        None
    } else {
        if cfg.secret.is_some() {
            problems.push((
                path("secret"),
                "only for HS* algorithms (use `public_key_file` or `jwks_file`)".into(),
            ));
            ok = false;
        }
        match (&cfg.public_key_file, &cfg.jwks_file) {
            (Some(_), Some(_)) => {
                problems.push((
                    path("public_key_file"),
                    "set either `public_key_file` or `jwks_file`, not both".into(),
                ));
                None
            }
            (None, None) => {
                problems.push((
                    format!("jwt[{i}]"),
                    "asymmetric algorithms need `public_key_file` or `jwks_file`".into(),
                ));
                None
            }
            (Some(file), None) => load_pem(file, &families)
                .map(IssuerKeys::One)
                .map_err(|msg| problems.push((path("public_key_file"), msg)))
                .ok(),
            (None, Some(file)) => load_jwks(file)
                .map(IssuerKeys::Set)
                .map_err(|msg| problems.push((path("jwks_file"), msg)))
                .ok(),
        }
    };

    let keys = keys?;
    if !ok {
        return None;
    }
    // Never empty here (no algorithms, no keys), but `?` costs nothing.
    let mut validation = Validation::new(*algorithms.first()?);
    validation.algorithms = algorithms;
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    Some(Issuer {
        audience: cfg.audience.clone(),
        leeway: cfg.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS),
        required_claims: cfg.required_claims.clone(),
        claims: cfg.claims.clone(),
        validation,
        keys,
    })
}

/// Reads one PEM public key; its type must be the one family the issuer's algorithms share.
fn load_pem(file: &str, families: &[AlgorithmFamily]) -> Result<DecodingKey, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    let [family] = families else {
        return Err(
            "one PEM key serves one key type: pin algorithms of one family, or use `jwks_file`"
                .into(),
        );
    };
    let (parsed, kind) = match family {
        AlgorithmFamily::Rsa => (DecodingKey::from_rsa_pem(&pem), "an RSA"),
        AlgorithmFamily::Ec => (DecodingKey::from_ec_pem(&pem), "an EC"),
        AlgorithmFamily::Ed => (DecodingKey::from_ed_pem(&pem), "an Ed25519"),
        AlgorithmFamily::Hmac => return Err("HS* algorithms use `secret`".into()),
    };
    parsed.map_err(|e| format!("`{file}` is not {kind} public key in PEM: {e}"))
}

/// Reads a local JWKS, keeping the keys meant for signatures.
fn load_jwks(file: &str) -> Result<Vec<JwksKey>, String> {
    let text = std::fs::read(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| format!("`{file}` is not a JWKS: {e}"))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for (k, jwk) in set.keys.iter().enumerate() {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => {
                // KeyAlgorithm also names encryption algorithms; those keys cannot sign.
                let name = serde_json::to_value(ka)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                match Algorithm::from_str(&name) {
                    Ok(alg) => Some(alg),
                    Err(_) => continue,
                }
            }
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("`{file}`: keys[{k}] is not a usable public key: {e}"))?;
        keys.push(JwksKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("`{file}` holds no signing key"));
    }
    Ok(keys)
}
