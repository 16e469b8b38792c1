//! Fuzz targets for everything that parses bytes from a client, a provider or an operator,
//! runnable on the stable toolchain as ordinary tests:
//!
//! ```text
//! cargo test --release --test fuzz                                      # 2 s per target (CI)
//! LUMEN_FUZZ_SECS=120 cargo test --release --test fuzz -- --nocapture   # longer, counts shown
//! LUMEN_FUZZ_SEED=1234 cargo test --release --test fuzz openai_parse    # replay one run
//! ```
//!
//! | target | what it feeds | beyond "never panics" |
//! |---|---|---|
//! | `openai_parse` | `openai::parse` (all four endpoints), `body_with_usage` | spans name their values; the body sent upstream is valid JSON, parses back to the same request, model spliced, usage asked for |
//! | `cache_key` | `cache::key`, `item_keys`, `canonical` | canonical JSON is valid and idempotent; the key ignores key order, whitespace and delivery fields; item keys match canonical equality |
//! | `cache_embed` | `embed::{items, with_items, split, merge}` | items read back; other fields kept; split accounts for every input; merge splits back |
//! | `sse_assemble` | `sse::Assembler` on arbitrary streams in arbitrary chunks | chunking never changes the answer; an answer renders and re-assembles to itself |
//! | `sse_render` | `sse::render_sse` on arbitrary bodies | what renders assembles, and renders again the same |
//! | `usage_stream` | `sse::usage::UsageTap`, `sse::usage::UsageStrip` in arbitrary chunks | same usage however chunked; the strip drops only whole usage-only events |
//! | `config_parse` | `config::parse` on arbitrary YAML | a snapshot or problems |
//! | `auth_headers` | `Authenticator::authenticate` on arbitrary headers and JWTs | only the live key, or a validly signed unexpired token, gets in |
//!
//! The loop itself (mutations, outcome feedback, shrinking) is in `engine.rs`.

mod auth;
mod config;
mod engine;
mod requests;
mod streams;

use engine::fuzz;

#[test]
fn openai_parse() {
    fuzz(requests::parse_target(), requests::check_parse);
}

#[test]
fn cache_key() {
    fuzz(requests::cache_key_target(), requests::check_cache_key);
}

#[test]
fn cache_embed() {
    fuzz(requests::embed_target(), requests::check_embed);
}

#[test]
fn sse_assemble() {
    fuzz(streams::assemble_target(), streams::check_assemble);
}

#[test]
fn sse_render() {
    fuzz(streams::render_target(), streams::check_render);
}

#[test]
fn usage_stream() {
    fuzz(streams::usage_target(), streams::check_usage);
}

#[test]
fn config_parse() {
    fuzz(config::config_target(), config::check_config);
}

#[test]
fn auth_headers() {
    fuzz(auth::auth_target(), auth::check_auth);
}

/// Finding F1 (issue 16): a stream with `"stream_options": null` is forwarded with the key
/// twice, `{"include_usage":true}` first and the client's `null` last; readers keep the last.
/// Fixed: the client's `stream_options` value is replaced in place.
#[test]
fn regression_f1_stream_options_null() {
    let body = br#"{"messages":[],"model":"t","stream":true,"stream_options":null,"":""}"#;
    let req = lumen::openai::parse(
        lumen::openai::Endpoint::ChatCompletions,
        bytes::Bytes::from_static(body),
    )
    .expect("a valid request");
    let sent: Vec<u8> = lumen::openai::body_with_usage(&req, None).concat();
    let value: serde_json::Value = serde_json::from_slice(&sent).expect("JSON");
    assert_eq!(
        value["stream_options"]["include_usage"],
        serde_json::Value::Bool(true),
        "{}",
        String::from_utf8_lossy(&sent)
    );
}

/// Finding F5 (issue 16): a stream whose delta `content` is a list assembles into an answer
/// that `render_sse` refuses. Fixed: such a stream is not assembled (not stored).
#[test]
fn regression_f5_array_content() {
    use lumen_plugins::sse::{render_sse, Assembler, Kind};
    let stream = b"data:{\"choices\":[{\"delta\":{\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}}]}\n\ndata:[DONE]\n\n";
    let mut assembler = Assembler::new(Kind::Chat, usize::MAX);
    assembler.push(stream);
    // Refused at assembly (not stored) would be fine too.
    if let Some(answer) = assembler.finish() {
        assert!(
            render_sse(Kind::Chat, &answer, false).is_some(),
            "stored, but not renderable: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}
