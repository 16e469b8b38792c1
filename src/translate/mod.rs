//! Translation between the APIs clients speak and the one most targets speak (DESIGN.md step
//! 6). Chat Completions is the hub: every OpenAI-compatible provider and the sidecar speak it,
//! so a request in another API family is translated to a chat request on its way in, and the
//! chat answer (whole, or chunk by chunk) back into the client's family on its way out. A
//! target that speaks the client's API natively gets the request as it came (no translation).
//!
//! | file | what it does |
//! |---|---|
//! | `responses.rs` | OpenAI's Responses API: request → chat, chat answer → `response`, chat stream → Responses events |
//!
//! Pure functions over JSON values, no I/O: the pipeline decides when to translate, these only
//! say how. Client input is never trusted: every shape is checked and a wrong one is a
//! [`TranslateError`] (a 400 naming the field), never a panic.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod responses;

/// A request that cannot be translated, said in the client's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// A field has the wrong shape or a value the API does not define.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A field the API defines that a translated request cannot carry (a built-in tool, a
    /// stored item reference): the target would need to speak the client's API natively.
    #[error("`{field}` is not supported on this route: {reason}")]
    Unsupported { field: String, reason: String },
}

impl TranslateError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
        TranslateError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> TranslateError {
        TranslateError::Unsupported {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field the error names (an OpenAI error's `param`).
    pub fn field(&self) -> &str {
        match self {
            TranslateError::Invalid { field, .. } | TranslateError::Unsupported { field, .. } => {
                field
            }
        }
    }
}
