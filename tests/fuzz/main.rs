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
//! | `sse_assemble` | `shape::Assembler` on arbitrary streams in arbitrary chunks | chunking never changes the answer; an answer renders and re-assembles to itself |
//! | `sse_render` | `shape::render_sse` on arbitrary bodies | what renders assembles, and renders again the same |
//! | `usage_stream` | `usage::UsageTap`, `usage::UsageStrip` in arbitrary chunks | same usage however chunked; the strip drops only whole usage-only events |
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
