//! What can be wrong with a config: one [`Problem`] per finding, with its YAML path, and the
//! [`ConfigError`] that `lumen check` prints. A leaf: every part of the config (and `jobs`,
//! `routing`, which validate their own sections) reports through it.

use super::env;

/// One problem found while validating, with the YAML path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `routes[2].targets[0].provider`.
    pub path: String,
    pub message: String,
    /// Filled in from the file's text after validation: (line, column), 1-based.
    pub position: Option<(usize, usize)>,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            position: None,
        }
    }
}

/// Why a config could not be loaded. Messages never include substituted secret values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", missing_vars(.path, .missing))]
    MissingEnv {
        path: String,
        missing: Vec<env::MissingVar>,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", list_problems(.path, .problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn missing_vars(path: &str, missing: &[env::MissingVar]) -> String {
    let lines: Vec<String> = missing
        .iter()
        .map(|m| {
            format!(
                "{path}:{}:{}: environment variable `{}` is not set",
                m.line, m.column, m.name
            )
        })
        .collect();
    lines.join("\n")
}

fn list_problems(path: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| match p.position {
            Some((line, col)) => format!("{path}:{line}:{col}: {}: {}", p.path, p.message),
            None => format!("{path}: {}: {}", p.path, p.message),
        })
        .collect();
    lines.join("\n")
}
