//! Configuration: the YAML file (`raw`), `${VAR}` substitution (`env`), units, and the validated
//! runtime `Snapshot` that requests read through `arc-swap`.
//!
//! Loading is strict: unknown keys, missing variables, bad URLs and dangling references are all
//! errors, and every error names the file, line and column so `lumen check` reads like `nginx -t`.
//!
//! | file | what it holds |
//! |---|---|
//! | `raw.rs` | the YAML types, strict |
//! | `env.rs`, `units.rs`, `locate.rs` | `${VAR}`, durations and sizes, YAML paths → line:column |
//! | `problem.rs` | [`Problem`] and [`ConfigError`] (a leaf) |
//! | `providers.rs`, `snapshot.rs` | raw → the validated [`Snapshot`] |
//! | `reload.rs` | `SIGHUP` and file changes: validate, swap, tell systemd |
//!
//! Imports: `upstream` (it builds providers), `routing` (the route table), `jobs` (its
//! settings), the plugins; never `proxy` or `node`.

pub mod env;
mod locate;
pub mod problem;
mod providers;
pub mod raw;
pub mod reload;
pub mod snapshot;
pub mod units;

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

pub use crate::upstream::provider::Provider;
pub use problem::{ConfigError, Problem};
pub use snapshot::{Limits, Listener, Snapshot, Source};

/// Reads, substitutes, parses and validates the file at `path`. Blocking (file I/O and DNS):
/// call it at startup or from a blocking task, never on a request.
pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown, |name| std::env::var(name).ok())
}

/// `load` without the file: `text` is the file's content, `path` how to name it in errors.
pub fn parse(
    text: &str,
    path: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Snapshot, ConfigError> {
    let substituted = env::substitute(text, lookup).map_err(|missing| ConfigError::MissingEnv {
        path: path.to_string(),
        missing,
    })?;
    let raw: raw::RawConfig = serde_yaml::from_str(&substituted.text).map_err(|e| {
        match syntax_error(path, e) {
            ConfigError::Syntax {
                path,
                line,
                column,
                message,
            } => ConfigError::Syntax {
                path,
                line,
                column,
                // A type error quotes the offending value; it may be a substituted secret.
                message: substituted.redact(&message),
            },
            other => other,
        }
    })?;
    let source = Source {
        path: path.to_string(),
        hash: format!("{:016x}", fnv1a(text.as_bytes())),
        loaded_at: SystemTime::now(),
    };
    // Secrets come only from the environment: a password written into the file would be
    // copied wherever the file goes.
    let literal: Vec<Problem> = raw
        .redis
        .as_ref()
        .map(|r| r.secrets())
        .unwrap_or_default()
        .into_iter()
        // From the environment: the secret is a whole substituted value, or the password of
        // one (`url: ${REDIS_URL}`). Not merely a part of one: a short literal password that
        // happens to occur inside some provider key is still written in the file.
        .filter(|(_, secret)| {
            !substituted.values.iter().any(|v| {
                v == secret
                    // `redis://${REDIS_CREDS}@host` with `user:pw` in the variable.
                    || v.split_once(':').is_some_and(|(_, pw)| pw == secret)
                    || lumen_plugins::redis_link::url_password(v) == Some(secret.as_str())
            })
        })
        .map(|(at, _)| {
            Problem::at(
                at,
                "write the password as ${REDIS_PASSWORD} (any variable): secrets come only from the environment",
            )
        })
        .collect();
    let built = match (snapshot::build(raw, source), literal.is_empty()) {
        (Err(ConfigError::Invalid { path, mut problems }), _) => {
            problems.extend(literal);
            Err(ConfigError::Invalid { path, problems })
        }
        (Ok(_), false) => Err(ConfigError::Invalid {
            path: path.to_string(),
            problems: literal,
        }),
        (other, _) => other,
    };
    built.map_err(|err| match err {
        ConfigError::Invalid { path, mut problems } => {
            let positions = locate::positions(&substituted.text);
            for p in &mut problems {
                p.position = positions.get(&p.path).copied();
                p.message = substituted.redact(&p.message);
            }
            ConfigError::Invalid { path, problems }
        }
        other => other,
    })
}

fn syntax_error(path: &str, e: serde_yaml::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    // serde_yaml appends " at line X column Y"; we print the position in front instead.
    let mut message = e.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    ConfigError::Syntax {
        path: path.to_string(),
        line,
        column,
        message,
    }
}

/// Hash of the config text for `/admin/config`: stable and cheap, not a security boundary.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("source", &self.source)
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
