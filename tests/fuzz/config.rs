//! The config loader on arbitrary YAML: `lumen::config::parse` returns a snapshot or a list of
//! problems, and never panics.

use lumen::config::ConfigError;

use crate::engine::{outcome, shape, Target};

/// Everything the README documents, with an HS256 issuer instead of a key file.
const FULL: &str = r#"
listen: ["127.0.0.1:8080", { address: "127.0.0.1:8443" }]
admin_listen: "127.0.0.1:9090"
auth: required
keys:
  - { id: team-a, sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", tenant: acme, models: ["fast", "local/*"], expires_at: "2027-12-31T00:00:00Z",
      limits: { requests_per_minute: 60, burst: 10, concurrent_requests: 4, tokens_per_minute: 100000 } }
  - { id: ci, key: "${LUMEN_CI_KEY}", disabled: true }
jwt:
  - { issuer: "https://idp.example", audience: lumen, algorithms: [HS256], secret: "an-hmac-secret-of-at-least-32-bytes!!",
      leeway_seconds: 5, required_claims: [tenant], claims: { key_id: sub, tenant: org, models: models } }
cors: { allow_origins: ["https://app.example.com"] }
limits: { max_body_bytes: 2MiB, per_ip: { requests_per_minute: 60, ipv6_prefix: 56 } }
providers:
  groq:
    base_url: "https://api.groq.com/openai/v1"
    api_key: "${GROQ_API_KEY}"
    headers: { x-extra: "value" }
    connect_timeout: 5s
    timeout: 120s
    idle_timeout: 90s
    expose_models: false
    health: { interval: 5s, timeout: 2s, healthy_threshold: 2, unhealthy_threshold: 3 }
    circuit: { failures: 5, error_ratio: 0.5, window: 60s, min_requests: 20, cooldown: 30s }
    quota: { requests_per_minute: 30, tokens_per_day: 500000 }
  local:
    base_url: "http://127.0.0.1:8081/v1"
    spawn: { model: models/x.gguf, alias: x, options: "ctx=4096,slots=4", args: [] }
readiness: all_routes
routes:
  - model: fast
    strategy: priority
    targets: [ { provider: local, model: x }, { provider: groq, model: "llama-3.1-8b-instant", weight: 1 } ]
    retry: { attempts: 3, on: [connect, timeout, dropped, "429", 5xx], backoff: { base: 100ms, max: 2s }, deadline: 30s }
    limits: { requests_per_minute: 30 }
    cache: { ttl: 10m, scope: key, when: deterministic }
  - model: "*embed*"
    targets: [ { provider: local } ]
    cache: { ttl: 24h, scope: global }
cache: { memory: 256MiB, coalesce_wait: 60s }
jobs: { workers: 4, queue_size: 1000, result_ttl: 1h, default_model: fast }
"#;

pub fn config_target() -> Target {
    let seeds = [
        include_str!("../../conf/lumen.yaml"),
        include_str!("../../conf/examples/cloud.yaml"),
        FULL,
        "providers: {}\n",
        "listen: [\"127.0.0.1:8080\"]\nproviders:\n  a: { base_url: \"http://127.0.0.1:9/v1\" }\nroutes:\n  - model: m\n    targets: [ { provider: a } ]\n",
        "providers: &p { a: { base_url: \"http://h/v1\" } }\nroutes: [ { model: \"*\", targets: [ { provider: a } ] } ]\nx: *p\n",
    ];
    Target {
        name: "config_parse",
        seeds: seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        dict: [
            "${GROQ_API_KEY}",
            "${X}",
            "${",
            "\n  - ",
            ": ",
            "{ ",
            " }",
            "&a ",
            "*a",
            "!!str ",
            "---\n",
            "0s",
            "1ms",
            "99999999999h",
            "16EiB",
            "0B",
            "-1",
            "~",
            "'",
            "| \n",
            "http://[::1]:0/",
            "https://",
            "unix:/",
            "*",
            "?",
            "[a-",
            "\t",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        max_len: 8192,
        json: false,
    }
}

/// Some variables set, some not: both paths of `${VAR}` substitution.
fn lookup(name: &str) -> Option<String> {
    (name.len().is_multiple_of(2) || name == "GROQ_API_KEY").then(|| format!("value-of-{name}"))
}

pub fn check_config(input: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(input);
    // A key file named by the input is read at load: never one that blocks or never ends.
    if ["/dev/", "/proc/", "/sys/"]
        .iter()
        .any(|p| text.contains(p))
    {
        return outcome("device path");
    }
    match lumen::config::parse(&text, "fuzz.yaml", lookup) {
        Ok(snapshot) => outcome(("ok", snapshot.providers.len().min(4))),
        Err(e) => {
            // Formatting the problems (positions, redaction) is part of loading.
            let _ = e.to_string();
            // The kind of problem, not where: YAML paths carry names from the input.
            match e {
                ConfigError::Syntax { message, .. } => {
                    // serde_yaml puts the YAML path first (`providers.NAME.timeout: ...`).
                    let message = match message.split_once(": ") {
                        Some((path, rest)) if !path.contains(' ') => rest,
                        _ => &message,
                    };
                    outcome(("syntax", shape(message)))
                }
                ConfigError::Invalid { problems, .. } => outcome((
                    "invalid",
                    problems.len().min(4),
                    problems.first().map(|p| shape(&p.message)),
                )),
                ConfigError::MissingEnv { missing, .. } => outcome(("env", missing.len().min(4))),
                ConfigError::Io { .. } => outcome("io"),
            }
        }
    }
}
