//! Tests of [`Authenticator`] through its public API: API keys, JWTs, config problems.
//!
//! RSA and EC keys under `testdata/` were made with `openssl genpkey` for these tests only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com";
const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!!";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn testdata(name: &str) -> String {
    format!("{}/src/auth/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(testdata(name)).unwrap()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn x_api_key(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    h
}

fn key(id: &str, clear: &str) -> KeyConfig {
    KeyConfig {
        id: id.into(),
        sha256: None,
        key: Some(clear.into()),
        tenant: None,
        models: None,
        expires_at: None,
        disabled: false,
        limits: None,
        budget: None,
    }
}

fn issuer(algorithms: &[&str]) -> JwtConfig {
    JwtConfig {
        issuer: ISS.into(),
        audience: Some("lumen".into()),
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        secret: None,
        public_key_file: None,
        jwks_file: None,
        leeway_seconds: None,
        required_claims: Vec::new(),
        claims: ClaimsMapping::default(),
    }
}

fn hs_issuer() -> JwtConfig {
    JwtConfig {
        secret: Some(SECRET.into()),
        ..issuer(&["HS256"])
    }
}

fn rs_issuer() -> JwtConfig {
    JwtConfig {
        public_key_file: Some(testdata("rsa_public.pem")),
        ..issuer(&["RS256", "PS256"])
    }
}

fn es_issuer() -> JwtConfig {
    JwtConfig {
        public_key_file: Some(testdata("ec_public.pem")),
        ..issuer(&["ES256"])
    }
}

fn auth_keys(keys: &[KeyConfig]) -> Authenticator {
    Authenticator::new(AuthMode::Required, keys, &[]).unwrap()
}

fn auth_jwt(jwt: JwtConfig) -> Authenticator {
    Authenticator::new(AuthMode::Required, &[], &[jwt]).unwrap()
}

/// Claims valid at [`NOW`] for the default issuer.
fn claims() -> Value {
    json!({ "iss": ISS, "aud": "lumen", "sub": "user-1", "exp": NOW + 600, "iat": NOW - 10 })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap()
}

fn jwt_reason(result: Result<Option<Arc<Principal>>, AuthError>) -> String {
    match result {
        Err(AuthError::Jwt(reason)) => reason,
        other => panic!("expected a JWT rejection, got {other:?}"),
    }
}

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
}

// ---- API keys ----

#[test]
fn api_key_in_either_header() {
    let auth = auth_keys(&[KeyConfig {
        tenant: Some("acme".into()),
        ..key("ci", "lm-secret-1")
    }]);
    for headers in [bearer("lm-secret-1"), x_api_key("lm-secret-1"), {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("bearer lm-secret-1"),
        );
        h
    }] {
        let p = auth.authenticate(&headers, now()).unwrap().unwrap();
        assert_eq!(p.key_id, "ci");
        assert_eq!(p.tenant.as_deref(), Some("acme"));
        assert!(p.may_use("anything"));
    }
}

#[test]
fn bearer_wins_over_x_api_key() {
    let auth = auth_keys(&[key("a", "key-a"), key("b", "key-b")]);
    let mut h = bearer("key-a");
    h.insert("x-api-key", HeaderValue::from_static("key-b"));
    assert_eq!(auth.authenticate(&h, now()).unwrap().unwrap().key_id, "a");
}

#[test]
fn missing_and_unknown_keys() {
    let auth = auth_keys(&[key("ci", "lm-secret-1")]);
    assert!(matches!(
        auth.authenticate(&HeaderMap::new(), now()),
        Err(AuthError::Missing)
    ));
    assert!(matches!(
        auth.authenticate(&bearer(""), now()),
        Err(AuthError::Missing)
    ));
    let mut basic = HeaderMap::new();
    basic.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert!(matches!(
        auth.authenticate(&basic, now()),
        Err(AuthError::Missing)
    ));
    let err = auth
        .authenticate(&bearer("lm-secret-2"), now())
        .unwrap_err();
    assert!(matches!(err, AuthError::UnknownKey));
    assert!(!err.to_string().contains("lm-secret-2"));
}

#[test]
fn disabled_key_is_refused() {
    let auth = auth_keys(&[KeyConfig {
        disabled: true,
        ..key("old", "lm-old")
    }]);
    assert!(matches!(
        auth.authenticate(&x_api_key("lm-old"), now()),
        Err(AuthError::Disabled)
    ));
}

#[test]
fn expired_key_is_refused_from_its_expiry() {
    let auth = auth_keys(&[KeyConfig {
        expires_at: Some("2027-01-31T00:00:00Z".into()),
        ..key("temp", "lm-temp")
    }]);
    let expiry = UNIX_EPOCH + Duration::from_secs(1_801_353_600);
    let h = bearer("lm-temp");
    assert!(auth
        .authenticate(&h, expiry - Duration::from_secs(1))
        .is_ok());
    assert!(matches!(
        auth.authenticate(&h, expiry),
        Err(AuthError::Expired)
    ));
    assert!(matches!(
        auth.authenticate(&h, expiry + Duration::from_secs(86_400)),
        Err(AuthError::Expired)
    ));
}

#[test]
fn allow_list_with_globs() {
    let auth = auth_keys(&[KeyConfig {
        models: Some(vec!["local/*".into(), "gpt-4?".into(), "o3".into()]),
        ..key("limited", "lm-limited")
    }]);
    let p = auth
        .authenticate(&bearer("lm-limited"), now())
        .unwrap()
        .unwrap();
    assert!(p.may_use("local/llama-3.1-8b"));
    assert!(p.may_use("gpt-4o"));
    assert!(p.may_use("o3"));
    assert!(!p.may_use("gpt-4"));
    assert!(!p.may_use("gpt-4o-mini"));
    assert!(!p.may_use("o3-mini"));
    assert!(!p.may_use("openai/local/x"));
}

#[test]
fn key_principals_are_shared_not_rebuilt() {
    let auth = auth_keys(&[key("ci", "lm-secret-1")]);
    let a = auth
        .authenticate(&bearer("lm-secret-1"), now())
        .unwrap()
        .unwrap();
    let b = auth
        .authenticate(&bearer("lm-secret-1"), now())
        .unwrap()
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn hash_key_known_vector() {
    assert_eq!(
        hash_key("test"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[test]
fn generated_key_round_trips_through_authenticate() {
    let (k, hash) = generate_key();
    assert!(k.starts_with("lm-"));
    assert_eq!(k.len(), 3 + 43);
    assert_eq!(hash, hash_key(&k));
    let (other, _) = generate_key();
    assert_ne!(k, other);
    let auth = auth_keys(&[KeyConfig {
        sha256: Some(hash.to_uppercase()),
        key: None,
        ..key("generated", "")
    }]);
    let p = auth.authenticate(&bearer(&k), now()).unwrap().unwrap();
    assert_eq!(p.key_id, "generated");
    assert!(matches!(
        auth.authenticate(&bearer(&other), now()),
        Err(AuthError::UnknownKey)
    ));
}

#[test]
fn mode_off_reads_nothing() {
    let auth = Authenticator::new(AuthMode::Off, &[key("ci", "lm-1")], &[]).unwrap();
    assert_eq!(auth.mode(), AuthMode::Off);
    assert!(auth
        .authenticate(&HeaderMap::new(), now())
        .unwrap()
        .is_none());
    assert!(auth.authenticate(&bearer("junk"), now()).unwrap().is_none());
    let anon = Principal::anonymous();
    assert_eq!(anon.key_id, "anonymous");
    assert!(anon.may_use("any/model"));
}

#[test]
fn key_config_problems_carry_their_paths() {
    let problems = Authenticator::new(
        AuthMode::Off,
        &[
            key("a", "lm-1"),
            key("a", "lm-2"),
            key("c", "lm-1"),
            KeyConfig {
                sha256: Some("abc".into()),
                key: None,
                ..key("d", "")
            },
            KeyConfig {
                sha256: Some(hash_key("x")),
                ..key("e", "x")
            },
            KeyConfig {
                key: None,
                ..key("f", "")
            },
            KeyConfig {
                expires_at: Some("next tuesday".into()),
                ..key("g", "lm-g")
            },
            key("h", "${LUMEN_KEY}"),
        ],
        &[],
    )
    .unwrap_err();
    let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "keys[1].id",
            "keys[2].key",
            "keys[3].sha256",
            "keys[4].sha256",
            "keys[5]",
            "keys[6].expires_at",
            "keys[7].key",
        ],
        "{problems:?}"
    );
    assert!(problems[0].1.contains("duplicate"));
    assert!(problems[1].1.contains("same key as `a`"));
}

#[test]
fn jwt_callers_never_share_a_name_with_a_static_key_or_another_issuer() {
    const OTHER: &str = "https://other.example.com";
    let auth = Authenticator::new(
        AuthMode::Required,
        &[key("user-1", "lm-user-1")],
        &[
            hs_issuer(),
            JwtConfig {
                issuer: OTHER.into(),
                ..hs_issuer()
            },
        ],
    )
    .unwrap();
    let from_key = auth
        .authenticate(&bearer("lm-user-1"), now())
        .unwrap()
        .unwrap();
    let from_idp = auth
        .authenticate(&bearer(&hs256(&claims())), now())
        .unwrap()
        .unwrap();
    let from_other = auth
        .authenticate(
            &bearer(&hs256(&with(claims(), json!({ "iss": OTHER })))),
            now(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(from_key.key_id, "user-1");
    assert_eq!(from_idp.key_id, "jwt:https://idp.example.com:user-1");
    assert_eq!(from_other.key_id, "jwt:https://other.example.com:user-1");
    assert!(from_key.configured && !from_idp.configured);
    // Numeric subjects are namespaced the same way.
    let numeric = hs256(&with(claims(), json!({"sub": 42})));
    let p = auth
        .authenticate(&bearer(&numeric), now())
        .unwrap()
        .unwrap();
    assert_eq!(p.key_id, "jwt:https://idp.example.com:42");
}

#[test]
fn static_key_ids_may_not_take_the_jwt_namespace() {
    let problems = Authenticator::new(
        AuthMode::Required,
        &[
            key("jwt:https://idp.example.com:alice", "lm-a"),
            key("jwtish", "lm-b"),
        ],
        &[],
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "keys[0].id");
    assert!(problems[0].1.contains("reserved"), "{problems:?}");
}

#[test]
fn issuers_whose_names_could_collide_are_refused() {
    let problems = Authenticator::new(
        AuthMode::Required,
        &[],
        &[
            JwtConfig {
                issuer: "https://idp".into(),
                ..hs_issuer()
            },
            JwtConfig {
                issuer: "https://idp:8443".into(),
                ..hs_issuer()
            },
            JwtConfig {
                issuer: "https://idp2".into(),
                ..hs_issuer()
            },
        ],
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "jwt[1].issuer");
    assert!(problems[0].1.contains("collide"), "{problems:?}");
}

#[test]
fn key_config_yaml_is_strict() {
    let ok: KeyConfig =
        serde_json::from_value(json!({"id": "a", "sha256": hash_key("k")})).unwrap();
    assert!(!ok.disabled);
    assert!(serde_json::from_value::<KeyConfig>(json!({"id": "a", "sha_256": "x"})).is_err());
    let mode: AuthMode = serde_json::from_value(json!("off")).unwrap();
    assert_eq!(mode, AuthMode::Off);
    let jwt: JwtConfig = serde_json::from_value(
        json!({"issuer": ISS, "algorithms": ["HS256"], "claims": {"tenant": "org"}}),
    )
    .unwrap();
    assert_eq!(jwt.claims.key_id, "sub");
    assert_eq!(jwt.claims.tenant, "org");
    assert!(serde_json::from_value::<JwtConfig>(
        json!({"issuer": ISS, "algorithms": [], "aud": "x"})
    )
    .is_err());
}

// ---- JWTs: accepted ----

#[test]
fn valid_hs256_token_maps_claims() {
    let auth = auth_jwt(hs_issuer());
    let token = hs256(&with(
        claims(),
        json!({"tenant": "acme", "models": ["local/*", "gpt-4o"]}),
    ));
    let p = auth.authenticate(&bearer(&token), now()).unwrap().unwrap();
    assert_eq!(p.key_id, "jwt:https://idp.example.com:user-1");
    assert_eq!(
        p.tenant.as_deref(),
        Some("jwt:https://idp.example.com:acme")
    );
    assert!(p.may_use("local/qwen"));
    assert!(p.may_use("gpt-4o"));
    assert!(!p.may_use("gpt-4o-mini"));
    // Also through X-API-Key.
    assert!(auth.authenticate(&x_api_key(&token), now()).is_ok());
}

#[test]
fn custom_claims_mapping() {
    let auth = auth_jwt(JwtConfig {
        claims: ClaimsMapping {
            key_id: "client_id".into(),
            tenant: "org".into(),
            models: "allowed_models".into(),
            requests_per_minute: "quota".into(),
            budget_usd: "spend".into(),
        },
        ..hs_issuer()
    });
    let token = hs256(&with(
        claims(),
        json!({"client_id": "svc-7", "org": "acme", "allowed_models": ["o3"], "models": ["x"]}),
    ));
    let p = auth.authenticate(&bearer(&token), now()).unwrap().unwrap();
    assert_eq!(p.key_id, "jwt:https://idp.example.com:svc-7");
    assert_eq!(
        p.tenant.as_deref(),
        Some("jwt:https://idp.example.com:acme")
    );
    assert!(p.may_use("o3"));
    assert!(!p.may_use("x"));

    let no_id = hs256(&claims());
    assert!(jwt_reason(auth.authenticate(&bearer(&no_id), now())).contains("client_id"));
    let bad_models = hs256(&with(
        claims(),
        json!({"client_id": "a", "allowed_models": "o3"}),
    ));
    assert!(jwt_reason(auth.authenticate(&bearer(&bad_models), now())).contains("array"));
}

#[test]
fn a_budget_claim_gives_the_caller_a_dollar_budget() {
    let auth = auth_jwt(hs_issuer());
    let caller = |extra: Value| {
        let token = hs256(&with(claims(), extra));
        auth.authenticate(&bearer(&token), now())
    };
    let budget = |extra: Value| caller(extra).unwrap().unwrap().budget.clone();
    let per_day = budget(json!({"budget_usd": 2.5})).unwrap();
    assert_eq!(
        (per_day.per_day, per_day.per_month),
        (Some(2_500_000), None)
    );
    let both = budget(json!({"budget_usd": {"usd_per_day": 1, "usd_per_month": 20}})).unwrap();
    assert_eq!(
        (both.per_day, both.per_month),
        (Some(1_000_000), Some(20_000_000))
    );
    assert!(budget(json!({})).is_none());
    for bad in [json!(0), json!(-1), json!("5"), json!({"usd_per_week": 1})] {
        let refused = caller(json!({ "budget_usd": bad }));
        assert!(jwt_reason(refused).contains("budget_usd"), "{bad}");
    }
}

#[test]
fn valid_rs256_and_ps256_tokens() {
    let auth = auth_jwt(rs_issuer());
    for alg in [Algorithm::RS256, Algorithm::PS256] {
        let token = sign(alg, &rsa_key(), &claims());
        let p = auth.authenticate(&bearer(&token), now()).unwrap().unwrap();
        assert_eq!(p.key_id, "jwt:https://idp.example.com:user-1");
        assert!(p.may_use("any"));
    }
}

#[test]
fn valid_es256_token() {
    let auth = auth_jwt(es_issuer());
    let token = sign(Algorithm::ES256, &ec_key(), &claims());
    assert!(auth.authenticate(&bearer(&token), now()).unwrap().is_some());
}

#[test]
fn jwks_picks_key_by_kid() {
    let auth = auth_jwt(JwtConfig {
        jwks_file: Some(testdata("jwks.json")),
        ..issuer(&["RS256", "PS256"])
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &rsa_key()).unwrap();
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
    // No kid: the only key is used.
    let token = sign(Algorithm::RS256, &rsa_key(), &claims());
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
    // Unknown kid.
    header.kid = Some("rsa-2".into());
    let token = jsonwebtoken::encode(&header, &claims(), &rsa_key()).unwrap();
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("kid"));
    // The JWK says RS256: a PS256 token is refused even though the issuer allows PS256.
    let mut header = Header::new(Algorithm::PS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &rsa_key()).unwrap();
    assert!(auth.authenticate(&bearer(&token), now()).is_err());
}

#[test]
fn several_issuers_are_told_apart_by_iss() {
    let other = JwtConfig {
        issuer: "https://other.example.com".into(),
        secret: Some("another-secret-another-secret-!!".into()),
        ..issuer(&["HS256"])
    };
    let rs = JwtConfig {
        issuer: "https://rs.example.com".into(),
        ..rs_issuer()
    };
    let auth = Authenticator::new(AuthMode::Required, &[], &[hs_issuer(), rs, other]).unwrap();
    assert_eq!(auth.counts(), (0, 3));
    let rs_claims = with(claims(), json!({"iss": "https://rs.example.com"}));
    let token = sign(Algorithm::RS256, &rsa_key(), &rs_claims);
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
    // The RS issuer's name on an HS token: refused, HS256 is not pinned there.
    let token = hs256(&rs_claims);
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("not allowed"));
    // And the other way round: an RS token naming the HS issuer.
    let token = sign(Algorithm::RS256, &rsa_key(), &claims());
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("not allowed"));
    let token = hs256(&claims());
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
    // Signed with our secret but claiming the other issuer.
    let token = hs256(&with(claims(), json!({"iss": "https://other.example.com"})));
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&token), now())),
        "bad signature"
    );
}

// ---- JWTs: refused ----

#[test]
fn alg_none_is_rejected() {
    let auth = auth_jwt(hs_issuer());
    let header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let payload = b64(&claims());
    // As usually sent (empty signature): not JWT-shaped, so an unknown API key.
    let unsigned = format!("{header}.{payload}.");
    assert!(matches!(
        auth.authenticate(&bearer(&unsigned), now()),
        Err(AuthError::UnknownKey)
    ));
    // With something in the signature slot.
    let faked = format!("{header}.{payload}.c2ln");
    assert!(jwt_reason(auth.authenticate(&bearer(&faked), now())).contains("none"));
    let header = b64(&json!({"alg": "None"}));
    let faked = format!("{header}.{payload}.c2ln");
    assert!(auth.authenticate(&bearer(&faked), now()).is_err());
}

#[test]
fn algorithm_outside_the_issuers_list_is_rejected() {
    let auth = auth_jwt(hs_issuer());
    let token = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims(),
    );
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("not allowed"));

    let auth = auth_jwt(rs_issuer());
    let token = sign(Algorithm::RS384, &rsa_key(), &claims());
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("not allowed"));
}

#[test]
fn algorithm_confusion_is_rejected() {
    // The classic attack: HMAC-sign with the issuer's public key as the secret.
    let auth = auth_jwt(rs_issuer());
    let pem = read("rsa_public.pem");
    let token = sign(Algorithm::HS256, &EncodingKey::from_secret(&pem), &claims());
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("not allowed"));
    // Same against a JWKS issuer, and against the key's DER form.
    let auth = auth_jwt(JwtConfig {
        jwks_file: Some(testdata("jwks.json")),
        ..issuer(&["RS256"])
    });
    assert!(auth.authenticate(&bearer(&token), now()).is_err());
}

#[test]
fn expired_token_is_rejected_beyond_leeway() {
    let auth = auth_jwt(hs_issuer());
    let within = hs256(&with(claims(), json!({"exp": NOW - 20})));
    assert!(auth.authenticate(&bearer(&within), now()).is_ok());
    let beyond = hs256(&with(claims(), json!({"exp": NOW - 31})));
    let reason = jwt_reason(auth.authenticate(&bearer(&beyond), now()));
    assert_eq!(reason, "expired");

    let strict = auth_jwt(JwtConfig {
        leeway_seconds: Some(0),
        ..hs_issuer()
    });
    assert!(strict.authenticate(&bearer(&within), now()).is_err());
}

#[test]
fn token_without_exp_is_rejected() {
    let auth = auth_jwt(hs_issuer());
    let token = hs256(&with(claims(), json!({"exp": null})));
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("exp"));
    let token = hs256(&with(claims(), json!({"exp": "tomorrow"})));
    assert!(auth.authenticate(&bearer(&token), now()).is_err());
}

#[test]
fn token_not_yet_valid_is_rejected() {
    let auth = auth_jwt(hs_issuer());
    let future = hs256(&with(claims(), json!({"nbf": NOW + 300})));
    assert!(jwt_reason(auth.authenticate(&bearer(&future), now())).contains("nbf"));
    let skewed = hs256(&with(claims(), json!({"nbf": NOW + 10})));
    assert!(auth.authenticate(&bearer(&skewed), now()).is_ok());
}

#[test]
fn wrong_issuer_or_audience_is_rejected() {
    let auth = auth_jwt(hs_issuer());
    let token = hs256(&with(claims(), json!({"iss": "https://evil.example.com"})));
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&token), now())),
        "unknown issuer"
    );
    let token = hs256(&with(claims(), json!({"iss": null})));
    assert!(jwt_reason(auth.authenticate(&bearer(&token), now())).contains("iss"));

    let token = hs256(&with(claims(), json!({"aud": "someone-else"})));
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&token), now())),
        "wrong audience"
    );
    let token = hs256(&with(claims(), json!({"aud": null})));
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&token), now())),
        "wrong audience"
    );
    let token = hs256(&with(claims(), json!({"aud": ["other", "lumen"]})));
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
}

#[test]
fn missing_required_claim_is_rejected() {
    let auth = auth_jwt(JwtConfig {
        required_claims: vec!["tenant".into()],
        ..hs_issuer()
    });
    let token = hs256(&claims());
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&token), now())),
        "missing claim `tenant`"
    );
    let token = hs256(&with(claims(), json!({"tenant": "acme"})));
    assert!(auth.authenticate(&bearer(&token), now()).is_ok());
}

#[test]
fn bad_signatures_are_rejected_without_echoing_the_token() {
    let auth = auth_jwt(hs_issuer());
    let wrong_secret = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-secret"),
        &claims(),
    );
    let err = auth
        .authenticate(&bearer(&wrong_secret), now())
        .unwrap_err();
    assert_eq!(err.to_string(), "invalid token: bad signature");
    assert!(!err.to_string().contains(&wrong_secret));

    // Claims swapped after signing.
    let good = hs256(&claims());
    let sig = good.rsplit('.').next().unwrap();
    let forged = format!(
        "{}.{}.{sig}",
        b64(&json!({"alg": "HS256", "typ": "JWT"})),
        b64(&with(claims(), json!({"sub": "admin"})))
    );
    assert_eq!(
        jwt_reason(auth.authenticate(&bearer(&forged), now())),
        "bad signature"
    );

    // An RS issuer given an ES-signed token.
    let auth = auth_jwt(rs_issuer());
    let es = sign(Algorithm::ES256, &ec_key(), &claims());
    assert!(auth.authenticate(&bearer(&es), now()).is_err());
    // Garbage in JWT shape.
    assert!(auth.authenticate(&bearer("aaa.bbb.ccc"), now()).is_err());
}

// ---- JWT config ----

#[test]
fn jwt_config_problems_carry_their_paths() {
    let cases: Vec<(JwtConfig, &str)> = vec![
        (issuer(&[]), "jwt[0].algorithms"),
        (
            JwtConfig {
                secret: Some(SECRET.into()),
                ..issuer(&["HS256", "XS999"])
            },
            "jwt[0].algorithms[1]",
        ),
        (
            JwtConfig {
                secret: Some(SECRET.into()),
                ..issuer(&["none"])
            },
            "jwt[0].algorithms[0]",
        ),
        (
            JwtConfig {
                secret: Some(SECRET.into()),
                ..issuer(&["HS256", "RS256"])
            },
            "jwt[0].algorithms",
        ),
        (issuer(&["HS256"]), "jwt[0].secret"),
        (
            JwtConfig {
                secret: Some(String::new()),
                ..issuer(&["HS256"])
            },
            "jwt[0].secret",
        ),
        (
            JwtConfig {
                public_key_file: Some(testdata("rsa_public.pem")),
                ..hs_issuer()
            },
            "jwt[0].public_key_file",
        ),
        (issuer(&["RS256"]), "jwt[0]"),
        (
            JwtConfig {
                public_key_file: Some(testdata("no-such-file.pem")),
                ..issuer(&["RS256"])
            },
            "jwt[0].public_key_file",
        ),
        (
            JwtConfig {
                public_key_file: Some(testdata("ec_public.pem")),
                ..issuer(&["RS256"])
            },
            "jwt[0].public_key_file",
        ),
        (
            JwtConfig {
                public_key_file: Some(testdata("rsa_public.pem")),
                ..issuer(&["RS256", "ES256"])
            },
            "jwt[0].public_key_file",
        ),
        (
            JwtConfig {
                jwks_file: Some(testdata("rsa_public.pem")),
                ..issuer(&["RS256"])
            },
            "jwt[0].jwks_file",
        ),
        (
            JwtConfig {
                secret: Some(SECRET.into()),
                ..rs_issuer()
            },
            "jwt[0].secret",
        ),
    ];
    for (cfg, want) in cases {
        let problems =
            Authenticator::new(AuthMode::Required, &[], std::slice::from_ref(&cfg)).unwrap_err();
        assert!(
            problems.iter().any(|(p, _)| p == want),
            "{cfg:?}: want a problem at {want}, got {problems:?}"
        );
    }

    let problems =
        Authenticator::new(AuthMode::Required, &[], &[hs_issuer(), hs_issuer()]).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, "jwt[1].issuer");
}

#[test]
fn jwt_and_key_shapes_are_told_apart() {
    assert!(looks_like_jwt("eyJh.eyJi.c2ln"));
    assert!(!looks_like_jwt("eyJh.eyJi."));
    assert!(!looks_like_jwt("a.b.c.d"));
    assert!(!looks_like_jwt("lm-abc_def"));
    assert!(!looks_like_jwt("a.b+c.d"));
}

#[test]
fn limits_come_from_the_key_or_the_token() {
    let mut k = key("limited", "sk-limited");
    k.limits = Some(crate::rate_limit::LimitsConfig {
        requests_per_minute: Some(10),
        burst: Some(2),
        ..Default::default()
    });
    let auth = Authenticator::new(AuthMode::Required, &[k], &[]).unwrap();
    let p = auth
        .authenticate(&x_api_key("sk-limited"), SystemTime::now())
        .unwrap()
        .unwrap();
    let requests = p.limits.as_ref().unwrap().requests.clone().unwrap();
    assert_eq!((requests.count, requests.burst), (10, 2));

    let mut bad = key("bad", "sk-bad");
    bad.limits = Some(crate::rate_limit::LimitsConfig {
        requests_per_minute: Some(0),
        ..Default::default()
    });
    let problems = Authenticator::new(AuthMode::Required, &[bad], &[])
        .err()
        .unwrap();
    assert_eq!(problems[0].0, "keys[0].limits");
}
