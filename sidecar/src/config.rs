//! Which models to serve and how: `--model` flags or a YAML file, validated into [`ModelSpec`]s.
//!
//! Flag form: `--model ALIAS=PATH[:key=value,key=value...]`, for example
//! `--model fast=models/x.gguf:ctx=2048,slots=4,threads=2`. The options part starts at the last
//! `:` whose remainder is a list of `key=value`, so ordinary paths need no quoting. YAML form
//! (`--config FILE`) uses the same keys:
//!
//! ```yaml
//! host: 127.0.0.1        # optional; the command line wins when both are given
//! port: 8081
//! models:
//!   - alias: smollm2
//!     path: models/SmolLM2-135M-Instruct.Q4_1.gguf
//!     sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
//!   - { alias: embed, path: models/all-MiniLM-L6-v2.gguf, pooling: mean }
//! ```
//!
//! Keys: `ctx` (context tokens per slot; default min(4096, trained) for chat, min(512,
//! trained) for embeddings), `slots` (parallel sequences, default 4), `queue` (requests waiting
//! beyond the slots before 503, default 16), `threads` (default: all cores), `gpu_layers`
//! (passed to llama.cpp, default 0), `pooling` (`mean`, `cls`, `last` or `rank`: loads the model
//! for `/v1/embeddings`, or `/v1/rerank` with `rank`), `sha256` (checked before loading),
//! `prompt_cache` (keep each slot's KV cache after a request and reuse the longest matching
//! prefix for the next one; default true), `min_prefix` (the fewest shared tokens worth
//! reusing, default 64: below it a request takes the least recently used slot and starts over)
//! and `cache_generated` (keep the generated tokens' cache too, as llama-server does: a next
//! turn skips re-reading the last answer, but its answer may differ from a cold start's in the
//! last bits of a near tie; default false) and `prompt_cache_ram` (host memory for slot caches
//! that another conversation evicted, so their conversation's next turn is restored instead of
//! read again: bytes, or with a unit such as `512MiB` or `2GiB`; default 0, none).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

/// How an embedding model pools token vectors into one vector per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
    Last,
    /// A classification head over a query/document pair: one relevance score (rerankers).
    Rank,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            "last" => Ok(Self::Last),
            "rank" => Ok(Self::Rank),
            other => Err(format!(
                "unknown pooling {other:?} (expected mean, cls, last or rank)"
            )),
        }
    }
}

/// One model to serve, as written by the operator; zero or absent options mean "default".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients put in `"model"`.
    pub alias: String,
    pub path: PathBuf,
    #[serde(default)]
    pub ctx: Option<u32>,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub queue: Option<u32>,
    #[serde(default)]
    pub threads: Option<u32>,
    #[serde(default)]
    pub gpu_layers: Option<u32>,
    /// Present: an embedding (or, with `rank`, reranking) model; absent: a chat model.
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// Expected SHA-256 of the file, checked before loading when given.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Keep each slot's KV cache between requests and reuse matching prefixes (default true).
    #[serde(default)]
    pub prompt_cache: Option<bool>,
    /// Fewest leading tokens a request must share with a slot's cache to reuse it (default 64).
    #[serde(default)]
    pub min_prefix: Option<u32>,
    /// Keep generated tokens' KV cells too (faster next turns, not byte-identical to a cold
    /// start; default false).
    #[serde(default)]
    pub cache_generated: Option<bool>,
    /// Host memory for evicted slot caches (default none).
    #[serde(default)]
    pub prompt_cache_ram: Option<Bytes>,
}

/// A size in bytes, written as a whole number or with a binary unit (`KiB`, `MiB`, `GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl std::str::FromStr for Bytes {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let units = [
            ("GiB", 1usize << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("B", 1),
        ];
        let (digits, factor) = units
            .iter()
            .find_map(|&(unit, f)| text.strip_suffix(unit).map(|d| (d.trim_end(), f)))
            .unwrap_or((text, 1));
        digits
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .map(Bytes)
            .ok_or_else(|| format!("{text:?} is not a size such as 536870912 or 512MiB"))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A YAML number or a string with a unit.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(usize),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Number(n) => Ok(Bytes(n)),
            Written::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

pub const DEFAULT_SLOTS: u32 = 4;
pub const DEFAULT_QUEUE: u32 = 16;
/// Below this many shared tokens, reusing a slot's cache saves less than it costs to evict a
/// longer conversation from the slot (llama-server's `--cache-reuse` works in chunks of this order).
pub const DEFAULT_MIN_PREFIX: u32 = 64;
/// Upper bounds that catch typos (`slots=400`) before llama.cpp allocates for them.
const MAX_SLOTS: u32 = 64;
const MAX_QUEUE: u32 = 4096;

/// The YAML file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--model {0:?}: expected ALIAS=PATH[:key=value,...]")]
    Syntax(String),
    #[error("--model {spec:?}: {message}")]
    Option { spec: String, message: String },
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("invalid model configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Parses one `--model` flag.
pub fn parse_model_flag(flag: &str) -> Result<ModelSpec, ConfigError> {
    let (alias, rest) = flag
        .split_once('=')
        .ok_or_else(|| ConfigError::Syntax(flag.into()))?;
    let (path, options) = match rest.rsplit_once(':') {
        Some((path, opts)) if !opts.is_empty() && opts.split(',').all(|kv| kv.contains('=')) => {
            (path, Some(opts))
        }
        _ => (rest, None),
    };
    if alias.is_empty() || path.is_empty() {
        return Err(ConfigError::Syntax(flag.into()));
    }
    let mut spec = ModelSpec {
        alias: alias.into(),
        path: PathBuf::from(path),
        ctx: None,
        slots: None,
        queue: None,
        threads: None,
        gpu_layers: None,
        pooling: None,
        sha256: None,
        prompt_cache: None,
        min_prefix: None,
        cache_generated: None,
        prompt_cache_ram: None,
    };
    for kv in options.into_iter().flat_map(|o| o.split(',')) {
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        let bad = |message: String| ConfigError::Option {
            spec: flag.into(),
            message,
        };
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| bad(format!("{key}={v}: not a whole number")))
        };
        match key {
            "ctx" => spec.ctx = Some(number(value)?),
            "slots" => spec.slots = Some(number(value)?),
            "queue" => spec.queue = Some(number(value)?),
            "threads" => spec.threads = Some(number(value)?),
            "gpu_layers" => spec.gpu_layers = Some(number(value)?),
            "pooling" => spec.pooling = Some(value.parse().map_err(bad)?),
            "sha256" => spec.sha256 = Some(value.to_string()),
            "min_prefix" => spec.min_prefix = Some(number(value)?),
            "prompt_cache_ram" => {
                spec.prompt_cache_ram = Some(value.parse().map_err(|e| bad(format!("{key}: {e}")))?)
            }
            "prompt_cache" | "cache_generated" => {
                let on = match value {
                    "true" => true,
                    "false" => false,
                    v => return Err(bad(format!("{key}={v}: expected true or false"))),
                };
                if key == "prompt_cache" {
                    spec.prompt_cache = Some(on);
                } else {
                    spec.cache_generated = Some(on);
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown option {other:?} (known: ctx, slots, queue, threads, gpu_layers, \
                     pooling, sha256, prompt_cache, min_prefix, cache_generated, \
                     prompt_cache_ram)"
                )))
            }
        }
    }
    Ok(spec)
}

/// Parses a YAML config file's text.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    Ok(serde_yaml::from_str(text)?)
}

/// Checks the whole list and reports every problem at once.
pub fn validate(models: &[ModelSpec]) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if models.is_empty() {
        problems.push("no models: give at least one --model ALIAS=PATH or --config FILE".into());
    }
    let mut seen = BTreeSet::new();
    for m in models {
        let a = &m.alias;
        if !seen.insert(a.as_str()) {
            problems.push(format!("{a}: alias used twice"));
        }
        if !m.path.is_file() {
            problems.push(format!("{a}: model file {} not found", m.path.display()));
        }
        if m.ctx == Some(0) {
            problems.push(format!("{a}: ctx must be at least 1"));
        }
        match m.slots {
            Some(0) => problems.push(format!("{a}: slots must be at least 1")),
            Some(n) if n > MAX_SLOTS => {
                problems.push(format!("{a}: slots={n} is above the limit of {MAX_SLOTS}"))
            }
            _ => {}
        }
        if m.queue.is_some_and(|q| q > MAX_QUEUE) {
            problems.push(format!("{a}: queue is above the limit of {MAX_QUEUE}"));
        }
        if m.threads == Some(0) {
            problems.push(format!("{a}: threads must be at least 1"));
        }
        if let Some(sha) = &m.sha256 {
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                problems.push(format!("{a}: sha256 must be 64 hex digits"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_with_options() {
        let m = parse_model_flag("fast=models/x.gguf:ctx=2048,slots=4,threads=2").unwrap();
        assert_eq!(m.alias, "fast");
        assert_eq!(m.path, PathBuf::from("models/x.gguf"));
        assert_eq!((m.ctx, m.slots, m.threads), (Some(2048), Some(4), Some(2)));
        assert_eq!(m.pooling, None);
        let m = parse_model_flag("c=m.gguf:prompt_cache=false,min_prefix=8").unwrap();
        assert_eq!((m.prompt_cache, m.min_prefix), (Some(false), Some(8)));
        assert!(parse_model_flag("c=m.gguf:prompt_cache=yes").is_err());
        let m = parse_model_flag("c=m.gguf:cache_generated=true").unwrap();
        assert_eq!(m.cache_generated, Some(true));
        let m = parse_model_flag("c=m.gguf:prompt_cache_ram=512MiB").unwrap();
        assert_eq!(m.prompt_cache_ram, Some(Bytes(512 << 20)));
        let err = parse_model_flag("c=m.gguf:prompt_cache_ram=lots").unwrap_err();
        assert!(err.to_string().contains("not a size"), "{err}");
        assert_eq!("2 GiB".parse(), Ok(Bytes(2 << 30)));
        assert_eq!("4096".parse(), Ok(Bytes(4096)));
        assert!("99999999999999999999GiB".parse::<Bytes>().is_err());
    }

    #[test]
    fn flag_without_options_keeps_colons_in_paths() {
        let m = parse_model_flag("a=/data/c:d/model.gguf").unwrap();
        assert_eq!(m.path, PathBuf::from("/data/c:d/model.gguf"));
        let m = parse_model_flag("e=m.gguf:pooling=rank").unwrap();
        assert_eq!(m.pooling, Some(Pooling::Rank));
    }

    #[test]
    fn flag_errors_name_the_problem() {
        assert!(matches!(
            parse_model_flag("nopath"),
            Err(ConfigError::Syntax(_))
        ));
        let err = parse_model_flag("a=m.gguf:ctx=big").unwrap_err();
        assert!(err.to_string().contains("not a whole number"), "{err}");
        let err = parse_model_flag("a=m.gguf:colour=red").unwrap_err();
        assert!(err.to_string().contains("unknown option"), "{err}");
        let err = parse_model_flag("a=m.gguf:pooling=max").unwrap_err();
        assert!(err.to_string().contains("unknown pooling"), "{err}");
    }

    #[test]
    fn yaml_is_strict() {
        let ok = parse_file("models:\n  - { alias: e, path: m.gguf, pooling: mean, slots: 2 }\n")
            .unwrap();
        assert_eq!(ok.models[0].pooling, Some(Pooling::Mean));
        assert_eq!(ok.models[0].slots, Some(2));
        let ram = parse_file(
            "models:\n  - { alias: c, path: m.gguf, prompt_cache_ram: 1GiB }\n  - { alias: d, path: m.gguf, prompt_cache_ram: 1024 }\n",
        )
        .unwrap();
        assert_eq!(ram.models[0].prompt_cache_ram, Some(Bytes(1 << 30)));
        assert_eq!(ram.models[1].prompt_cache_ram, Some(Bytes(1024)));
        assert!(parse_file("models:\n  - { alias: e, path: m.gguf, slot: 2 }\n").is_err());
    }

    #[test]
    fn validation_reports_every_problem() {
        let mut a = parse_model_flag("a=/nonexistent/a.gguf:slots=0").unwrap();
        a.sha256 = Some("xyz".into());
        let b = parse_model_flag("a=/nonexistent/b.gguf").unwrap();
        let Err(ConfigError::Invalid(problems)) = validate(&[a, b]) else {
            panic!("expected problems");
        };
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }
}
