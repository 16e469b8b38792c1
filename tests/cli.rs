//! `lumen check`: exit 0 on a good config, non-zero with file:line:column on a bad one.

use std::process::Command;

use lumen_test_support::harness::tempdir::Dir;

fn check(yaml: &str) -> (bool, String, String) {
    let dir = Dir::new("lumen-check");
    let path = dir.path().join("lumen.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("NOT_SET_ANYWHERE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .into_owned()
            .replace(&path.display().to_string(), "FILE"),
    )
}

#[test]
fn a_good_config_passes() {
    let (ok, stdout, _) = check(
        "providers:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nroutes:\n  - { model: m, targets: [ { provider: a } ] }\n",
    );
    assert!(ok);
    assert!(
        stdout.contains("ok (1 providers, 1 routes, 0 keys, 0 JWT issuers)"),
        "{stdout}"
    );
}

#[test]
fn a_typo_is_reported_with_line_and_column() {
    let (ok, _, stderr) =
        check("providers:\n  a:\n    base_url: \"http://127.0.0.1:1/v1\"\n    timout: 5s\n");
    assert!(!ok);
    assert!(stderr.starts_with("FILE:4:5: "), "{stderr}");
    assert!(stderr.contains("unknown field `timout`"), "{stderr}");
}

#[test]
fn a_dangling_reference_is_reported_with_line_and_column() {
    let (ok, _, stderr) = check(
        "providers:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nroutes:\n  - model: m\n    targets:\n      - { provider: b }\n",
    );
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "FILE:6:21: routes[0].targets[0].provider: unknown provider `b` (known: a)"
    );
}

#[test]
fn a_missing_variable_is_named() {
    let (ok, _, stderr) = check(
        "providers:\n  a: { base_url: \"http://127.0.0.1:1\", api_key: \"${NOT_SET_ANYWHERE}\" }\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("FILE:2:") && stderr.contains("`NOT_SET_ANYWHERE` is not set"),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["check", "--config", "/nonexistent/lumen.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lumen.yaml: cannot read"));
}

#[test]
fn the_shipped_configs_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    // conf/lumen.yaml names the quickstart model: `lumen-llama fetch-model smollm2` first
    // (scripts/test.sh does).
    for name in ["conf/examples/cloud.yaml", "conf/lumen.yaml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .current_dir(root)
            .args(["check", "--config", name])
            .env("GROQ_API_KEY", "x")
            .env("OPENAI_API_KEY", "x")
            .env("DEEPSEEK_API_KEY", "x")
            .env("TOGETHER_API_KEY", "x")
            .env("FIREWORKS_API_KEY", "x")
            .env("ANTHROPIC_API_KEY", "x")
            .env("LUMEN_TEAM_A_KEY", "x")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        // Every routed model of the shipped configs has a price (the catalog, or 0 locally).
        assert!(!stderr.contains("no price"), "{name}: {stderr}");
    }
}

#[test]
fn routed_models_without_a_price_are_warned_about_and_bad_prices_refused() {
    let base = "providers:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nroutes:\n  - { model: m, targets: [ { provider: a, model: up }, { provider: a, model: other } ] }\n";
    let (ok, _, stderr) = check(&format!(
        "prices:\n  - {{ provider: a, model: up, input: 1, output: 2 }}\n{base}"
    ));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: route `m`: no price for provider `a` model `other`"),
        "{stderr}"
    );
    assert!(!stderr.contains("model `up`"), "{stderr}");
    let (ok, _, stderr) = check(&format!(
        "prices:\n  - {{ provider: a, input: -1, output: 2 }}\n{base}"
    ));
    assert!(!ok);
    assert!(
        stderr.contains("prices[0]: `input` must be from 0"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&format!("prices_file: nowhere.yaml\n{base}"));
    assert!(!ok);
    assert!(stderr.contains("prices_file: cannot read"), "{stderr}");
    let (ok, _, stderr) = check(&format!(
        "tenants:\n  acme: {{ budget: {{ usd_per_week: 1 }} }}\n{base}"
    ));
    assert!(!ok);
    assert!(stderr.contains("unknown field `usd_per_week`"), "{stderr}");
    let (ok, _, stderr) = check(&format!(
        "keys:\n  - {{ id: k, key: sk-k, budget: {{ usd_per_day: 0 }} }}\n{base}"
    ));
    assert!(!ok);
    assert!(
        stderr.contains("keys[0].budget: usd_per_day must be above 0"),
        "{stderr}"
    );
}

#[test]
fn an_issuer_without_an_audience_is_warned_about() {
    let (ok, _, stderr) = check(
        "jwt:\n  - { issuer: \"https://idp.test\", algorithms: [HS256], secret: \"0123456789abcdef0123456789abcdef\" }\n  - { issuer: \"https://other.test\", audience: lumen, algorithms: [HS256], secret: \"0123456789abcdef0123456789abcdef\" }\nproviders:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nroutes:\n  - { model: m, targets: [ { provider: a } ] }\n",
    );
    assert!(ok, "a warning, not an error: {stderr}");
    assert!(
        stderr.contains("warning: jwt issuer `https://idp.test` sets no `audience`"),
        "{stderr}"
    );
    assert!(!stderr.contains("other.test"), "{stderr}");
}

#[test]
fn an_unknown_thread_model_is_refused_by_name() {
    let (ok, _, stderr) = check(
        "server: { runtime: fastest }\nproviders:\n  a: { base_url: \"http://127.0.0.1:1/v1\" }\nroutes:\n  - { model: m, targets: [ { provider: a } ] }\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("fastest") && stderr.contains("per_core"),
        "names the bad value and the good ones: {stderr}"
    );
}
