//! Golden tests: YAML → snapshot, or YAML → the exact errors.

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "GROQ_API_KEY" => Some("gsk-secret".into()),
        _ => None,
    }
}

fn parse_ok(text: &str) -> Snapshot {
    match parse(text, "test.yaml", env) {
        Ok(s) => s,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn parse_err(text: &str) -> String {
    match parse(text, "test.yaml", env) {
        Ok(_) => panic!("expected an invalid config"),
        Err(e) => e.to_string(),
    }
}

const GOOD: &str = r#"
listen: ["127.0.0.1:8080"]
limits: { max_body_bytes: 2MiB }
providers:
  groq:
    base_url: "http://127.0.0.1:9/openai/v1/"
    api_key: "${GROQ_API_KEY}"
    timeout: 30s
  local: { base_url: "http://127.0.0.1:8081/v1", expose_models: true }
routes:
  - model: fast
    targets: [ { provider: groq, model: "llama-3.1-8b-instant" }, { provider: local } ]
  - model: "*embed*"
    targets: [ { provider: local, model: minilm } ]
"#;

#[test]
fn a_good_config_builds_a_snapshot() {
    let s = parse_ok(GOOD);
    assert_eq!(s.limits.max_body_bytes, 2 << 20);
    let groq = &s.providers["groq"];
    assert_eq!(groq.base_path, "/openai/v1");
    assert_eq!(groq.timeout, std::time::Duration::from_secs(30));
    let (name, value) = groq.credential.as_ref().unwrap();
    assert_eq!(name.as_str(), "authorization");
    assert_eq!(value, "Bearer gsk-secret");
    assert_eq!(s.routes.model_names().collect::<Vec<_>>(), ["fast"]);
    let fast = s.routes.resolve("fast").unwrap();
    assert_eq!(fast.targets.len(), 2);
    assert_eq!(
        fast.targets[0].model_json.as_deref(),
        Some(&br#""llama-3.1-8b-instant""#[..])
    );
    assert!(fast.targets[1].model_json.is_none());
    assert_eq!(
        s.routes.resolve("text-embedding-3-small").unwrap().name,
        "*embed*"
    );
    let direct = s.routes.resolve("local/qwen").unwrap();
    assert_eq!(
        direct.targets[0].model_json.as_deref(),
        Some(&br#""qwen""#[..])
    );
    assert!(
        s.routes.resolve("groq/x").is_none(),
        "groq does not expose its models"
    );
    assert!(s.routes.resolve("nope").is_none());
}

#[test]
fn exact_names_win_over_patterns_and_first_pattern_wins() {
    let s = parse_ok(
        r#"
providers: { a: { base_url: "http://127.0.0.1:1" }, b: { base_url: "http://127.0.0.1:2" } }
routes:
  - { model: "gpt-*", targets: [ { provider: a } ] }
  - { model: "gpt-4*", targets: [ { provider: b } ] }
  - { model: "gpt-4o", targets: [ { provider: b } ] }
"#,
    );
    assert_eq!(s.routes.resolve("gpt-4o").unwrap().name, "gpt-4o");
    assert_eq!(s.routes.resolve("gpt-4-turbo").unwrap().name, "gpt-*");
}

#[test]
fn unknown_keys_are_errors_with_line_and_column() {
    let err = parse_err("providers: {}\nroutes:\n  - model: x\n    retires: 3\n    targets: []\n");
    assert!(
        err.starts_with("test.yaml:4:5: routes[0]: unknown field `retires`"),
        "{err}"
    );
}

#[test]
fn syntax_errors_name_the_place() {
    let err = parse_err("providers:\n  a: { base_url: \"http://x\"\n");
    assert!(err.starts_with("test.yaml:"), "{err}");
    let (_, rest) = err.split_once(':').unwrap();
    let line: usize = rest.split(':').next().unwrap().parse().unwrap();
    assert!(line >= 2, "{err}");
}

#[test]
fn every_reference_problem_is_reported_with_its_position() {
    let err = parse_err(
        r#"providers:
  a: { base_url: "ftp://x" }
  b: { base_url: "http://127.0.0.1:1" }
routes:
  - model: fast
    targets:
      - provider: nope
  - model: fast
    targets: [ { provider: b } ]
  - model: empty
    targets: []
"#,
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "test.yaml:2:18: providers.a.base_url: `ftp://x` must start with http:// or https://",
            "test.yaml:7:19: routes[0].targets[0].provider: unknown provider `nope` (known: b)",
            "test.yaml:8:12: routes[1].model: model `fast` is routed twice",
            "test.yaml:11:5: routes[2].targets: route `empty` has no targets",
        ],
        "{err}"
    );
}

#[test]
fn missing_env_vars_are_named_and_secrets_never_echoed() {
    let err = parse_err(
        "providers:\n  a: { base_url: \"http://127.0.0.1:1\", api_key: \"${OPENAI_KEY}\" }\n",
    );
    assert_eq!(
        err,
        "test.yaml:2:50: environment variable `OPENAI_KEY` is not set"
    );
    // A secret used where a number is expected: the type error must not quote it.
    let err = parse_err("server: { threads: \"${GROQ_API_KEY}\" }\nproviders: {}\n");
    assert!(err.contains("invalid type"), "{err}");
    assert!(!err.contains("gsk-secret"), "{err}");
}

#[test]
fn durations_need_units() {
    let err = parse_err("providers:\n  a: { base_url: \"http://127.0.0.1:1\", timeout: 5 }\n");
    assert!(err.contains("duration"), "{err}");
}

#[test]
fn per_address_limits_key_ipv6_by_prefix_and_trust_only_listed_proxies() {
    let s = parse_ok("limits: { per_ip: { requests_per_minute: 60 } }\nproviders: {}\n");
    let per_ip = s.limits.per_ip.as_ref().unwrap();
    assert_eq!(per_ip.ipv6_prefix, 64, "one client per /64 by default");
    assert_eq!(per_ip.limit.count, 60);
    assert!(
        s.server.trusted_proxies.is_empty(),
        "no proxy trusted by default"
    );

    let s = parse_ok(
        "limits: { per_ip: { requests_per_second: 5, ipv6_prefix: 56 } }\n\
         server: { trusted_proxies: [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"] }\nproviders: {}\n",
    );
    assert_eq!(s.limits.per_ip.unwrap().ipv6_prefix, 56);
    let trusted: Vec<String> = s
        .server
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(trusted, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);

    let err = parse_err(
        "limits: { per_ip: { requests_per_minute: 60, ipv6_prefix: 0 } }\n\
         server: { trusted_proxies: [\"10.0.0.0/8\", \"10.1.2.3/8\", \"lb.internal\"] }\nproviders: {}\n",
    );
    assert!(err.contains("limits.per_ip.ipv6_prefix"), "{err}");
    assert!(err.contains("server.trusted_proxies[1]"), "{err}");
    assert!(err.contains("server.trusted_proxies[2]"), "{err}");
    assert!(!err.contains("server.trusted_proxies[0]"), "{err}");
}

const ROUTES: &str = r#"
providers:
  groq: { base_url: "https://api.groq.com/openai/v1", api_key: "${GROQ_API_KEY}" }
routes:
  - { model: fast, targets: [ { provider: groq, model: llama } ] }
"#;

fn redis_env(name: &str) -> Option<String> {
    match name {
        "REDIS_PASSWORD" => Some("s3cret-pw".into()),
        other => env(other),
    }
}

#[test]
fn redis_topologies_parse_with_credentials_from_the_environment() {
    use lumen_plugins::redis_link::Servers;
    let cluster = format!(
        "redis: {{ cluster: [\"redis://127.0.0.1:7000\", \"rediss://127.0.0.1:7001\"], username: lumen, password: \"${{REDIS_PASSWORD}}\" }}\n{ROUTES}"
    );
    let s = parse(&cluster, "test.yaml", redis_env).unwrap();
    let link = &s.redis.as_ref().unwrap().link;
    assert!(matches!(&link.servers, Servers::Cluster(n) if n.len() == 2));
    assert_eq!(link.username.as_deref(), Some("lumen"));
    assert_eq!(link.password.as_deref(), Some("s3cret-pw"));
    let shown = format!("{:?}", s.redis);
    assert!(
        !shown.contains("s3cret-pw"),
        "Debug hides the password: {shown}"
    );

    let sentinel = format!(
        "redis: {{ sentinel: {{ master: mymaster, nodes: [\"redis://:${{REDIS_PASSWORD}}@127.0.0.1:26379\"] }} }}\n{ROUTES}"
    );
    let s = parse(&sentinel, "test.yaml", redis_env).unwrap();
    let link = &s.redis.as_ref().unwrap().link;
    assert!(
        matches!(&link.servers, Servers::Sentinel { master, nodes } if master == "mymaster" && nodes.len() == 1)
    );
    assert!(!format!("{link:?}").contains("s3cret-pw"));
}

#[test]
fn redis_secrets_written_into_the_file_are_refused_and_never_echoed() {
    let literal =
        format!("redis: {{ url: \"redis://127.0.0.1:6379\", password: hunter22 }}\n{ROUTES}");
    let err = parse_err(&literal);
    assert!(err.contains("redis.password"), "{err}");
    assert!(err.contains("${REDIS_PASSWORD}"), "{err}");
    assert!(!err.contains("hunter22"), "{err}");
    let in_url =
        format!("redis: {{ cluster: [\"redis://user:hunter22@127.0.0.1:7000\"] }}\n{ROUTES}");
    let err = parse_err(&in_url);
    assert!(err.contains("redis.cluster[0]"), "{err}");
    assert!(!err.contains("hunter22"), "{err}");
    // A literal that merely occurs inside a substituted value (`gsk-secret`, the provider
    // key) is still a literal.
    let inside =
        format!("redis: {{ url: \"redis://127.0.0.1:6379\", password: secret }}\n{ROUTES}");
    assert!(parse_err(&inside).contains("redis.password"));
    let in_url = format!("redis: {{ url: \"redis://:gsk@127.0.0.1:6379\" }}\n{ROUTES}");
    assert!(parse_err(&in_url).contains("redis.url"));
}

#[test]
fn redis_needs_exactly_one_topology_and_a_prefix_without_braces() {
    let both = format!(
        "redis: {{ url: \"redis://127.0.0.1:6379\", cluster: [\"redis://127.0.0.1:7000\"] }}\n{ROUTES}"
    );
    assert!(
        parse_err(&both).contains("exactly one of `url`"),
        "{}",
        parse_err(&both)
    );
    let none = format!("redis: {{ prefix: lumen }}\n{ROUTES}");
    assert!(parse_err(&none).contains("exactly one of `url`"));
    let empty = format!("redis: {{ cluster: [] }}\n{ROUTES}");
    assert!(parse_err(&empty).contains("redis.cluster"));
    let braces =
        format!("redis: {{ url: \"redis://127.0.0.1:6379\", prefix: \"a}}b\" }}\n{ROUTES}");
    assert!(parse_err(&braces).contains("redis.prefix"));
    let scheme = format!(
        "redis: {{ sentinel: {{ master: m, nodes: [\"http://127.0.0.1:26379\"] }} }}\n{ROUTES}"
    );
    assert!(parse_err(&scheme).contains("redis.sentinel.nodes[0]"));
    let ca = format!(
        "redis: {{ url: \"rediss://127.0.0.1:6379\", tls_ca_file: /nonexistent/ca.pem }}\n{ROUTES}"
    );
    assert!(parse_err(&ca).contains("redis.tls_ca_file"));
}

#[test]
fn a_whole_redis_url_from_the_environment_may_carry_its_password() {
    let env = |name: &str| match name {
        "REDIS_URL" => Some("redis://:from-env-pw@127.0.0.1:6379".to_string()),
        other => redis_env(other),
    };
    let text = format!("redis: {{ url: \"${{REDIS_URL}}\" }}\n{ROUTES}");
    assert!(parse(&text, "test.yaml", env).is_ok());
}

#[test]
fn tracing_is_off_by_default_and_checked_when_on() {
    assert!(parse_ok(GOOD).tracing.is_none());
    let on = parse_ok(&format!(
        "{GOOD}tracing: {{ otlp: \"http://collector:4318\", sample: 0.25, capture_content: true }}\n"
    ));
    let t = on.tracing.unwrap();
    assert_eq!(t.protocol, crate::telemetry::OtlpProtocol::Http);
    assert_eq!(t.sample, 0.25);
    assert_eq!(t.service_name, "lumen");
    assert!(t.capture_content);
    let grpc = parse_ok(&format!(
        "{GOOD}tracing: {{ otlp: \"http://collector:4317\", protocol: grpc }}\n"
    ));
    assert_eq!(
        grpc.tracing.unwrap().protocol,
        crate::telemetry::OtlpProtocol::Grpc
    );
    let e = parse_err(&format!(
        "{GOOD}tracing: {{ otlp: \"collector:4318\", protocol: thrift, sample: 2, service_name: \" \" }}\n"
    ));
    for want in [
        "tracing.otlp",
        "tracing.protocol",
        "`thrift`",
        "tracing.sample",
        "tracing.service_name",
    ] {
        assert!(e.contains(want), "{want} missing from: {e}");
    }
    // https:// with headers whose values come from the environment, and never show.
    let hosted = parse_ok(&format!(
        "{GOOD}tracing: {{ otlp: \"https://api.collector.example\", headers: {{ X-Key: \"${{GROQ_API_KEY}}\" }} }}\n"
    ));
    let t = hosted.tracing.unwrap();
    assert_eq!(t.headers, [("x-key".to_string(), "gsk-secret".to_string())]);
    assert!(!format!("{t:?}").contains("gsk-secret"), "{t:?}");
    let e = parse_err(&format!(
        "{GOOD}tracing: {{ otlp: \"https://c:4318\", tls_ca_file: /nonexistent/ca.pem, headers: {{ \"bad name\": \"${{GROQ_API_KEY}}\" }} }}\n"
    ));
    assert!(e.contains("tracing.tls_ca_file"), "{e}");
    assert!(e.contains("tracing.headers.bad name"), "{e}");
    assert!(!e.contains("gsk-secret"), "{e}");
}
