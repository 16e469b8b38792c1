//! Every way a request can fail, and the one mapping from failure to HTTP status and
//! OpenAI-shaped body (`{"error":{"message","type","param","code"}}`).
//!
//! Who is at fault decides the status: the client → 4xx; an upstream → 502/504; us → 500. The
//! `match` in [`GatewayError::parts`] has no catch-all, so a new variant cannot ship without a
//! status. Messages never carry secrets (keys, tokens, provider credentials).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use http::StatusCode;

pub use crate::openai::RequestError;

/// An upstream that did not give a usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to provider `{provider}`")]
    Connect { provider: String },
    #[error("provider `{provider}` did not answer in time")]
    Timeout { provider: String },
    #[error("provider `{provider}` closed the connection or sent an invalid response")]
    Protocol { provider: String },
    #[error("provider `{provider}` answered with HTTP {status}")]
    Status { provider: String, status: u16 },
    /// A success that cannot be what was asked for (e.g. fewer embeddings than inputs).
    #[error("provider `{provider}` sent an answer that does not fit the request: {detail}")]
    Mismatch { provider: String, detail: String },
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("unknown endpoint {method} {path}")]
    UnknownEndpoint { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error(transparent)]
    Auth(#[from] lumen_plugins::auth::AuthError),
    #[error("this key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("rate limit exceeded ({}): retry after the time in the Retry-After header", .0.label())]
    RateLimited(lumen_plugins::rate_limit::LimitReason),
    /// A dollar budget would be exceeded: `scope` is `key` or `tenant`, `period` `day` or
    /// `month`, `remaining` what is left, in USD.
    #[error("the {scope} budget for this {period} is spent ({remaining} USD left, less than this request may cost); it resets at the time in the Retry-After header")]
    BudgetExceeded {
        scope: &'static str,
        period: &'static str,
        remaining: String,
    },
    /// A budgeted caller asked for a model one of whose targets has no price.
    #[error("this key has a dollar budget, and the model `{model}` has no price at provider `{provider}`, so its cost cannot be counted (the operator adds it to `prices:`)")]
    Unpriced { model: String, provider: String },
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("no provider can serve the model `{route}` right now ({detail}); retry after the time in the Retry-After header")]
    NoTarget { route: String, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("no job `{0}` (unknown, expired, or another key's)")]
    JobNotFound(String),
    #[error("no response with id `{0}` (unknown, expired, deleted, or another key's)")]
    ResponseNotFound(String),
    #[error("previous response with id `{0}` not found (unknown, expired, deleted, stored with `store: false`, or another key's)")]
    PreviousResponseNotFound(String),
    #[error(transparent)]
    Store(#[from] crate::stored::StoreError),
    #[error(transparent)]
    JobRefused(#[from] crate::jobs::SubmitError),
    #[error(transparent)]
    Batch(#[from] crate::batches::BatchError),
    #[error("{0}")]
    BadJob(String),
    #[error("with auth off, this gateway answers only requests addressed to localhost or an IP address (the Host header)")]
    HostNotAllowed,
    #[error("the gateway is shutting down; retry the request")]
    ShuttingDown,
}

/// What a client sees of an error.
#[derive(Debug, PartialEq, Eq)]
pub struct ErrorParts {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `api_error`, …
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl GatewayError {
    pub fn parts(&self) -> ErrorParts {
        use GatewayError as G;
        use RequestError as R;
        use UpstreamError as U;
        let (status, kind, code, param) = match self {
            G::UnknownEndpoint { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
                None,
            ),
            G::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
                None,
            ),
            G::Request(r) => match r {
                R::BodyTooLarge { .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    Some("request_too_large"),
                    None,
                ),
                R::BodyTimeout => (
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    Some("request_timeout"),
                    None,
                ),
                R::ReadBody(_) => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("invalid_body"),
                    None,
                ),
                R::InvalidJson(_) | R::NotAnObject => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("invalid_json"),
                    None,
                ),
                R::MissingModel => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("missing_model"),
                    Some("model"),
                ),
                R::InvalidField { field, .. } => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("invalid_value"),
                    Some(*field),
                ),
                R::MissingField(field) => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("missing_required_parameter"),
                    Some(*field),
                ),
                R::NotJson => (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    Some("unsupported_media_type"),
                    None,
                ),
                // (The message names the field: it is built from the client's input.)
                R::Translate(crate::translate::TranslateError::Invalid { .. }) => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("invalid_value"),
                    None,
                ),
                R::Translate(crate::translate::TranslateError::Unsupported { .. }) => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("unsupported_value"),
                    None,
                ),
            },
            G::Auth(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
            ),
            G::ModelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("model_not_allowed"),
                Some("model"),
            ),
            G::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some("rate_limit_exceeded"),
                None,
            ),
            G::BudgetExceeded { scope, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exceeded",
                Some(if *scope == "tenant" {
                    "tenant_budget_exceeded"
                } else {
                    "key_budget_exceeded"
                }),
                None,
            ),
            G::Unpriced { .. } => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("model_not_priced"),
                Some("model"),
            ),
            G::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
            ),
            G::Upstream(u) => match u {
                U::Connect { .. } | U::Protocol { .. } => (
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("upstream_unavailable"),
                    None,
                ),
                U::Timeout { .. } => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "api_error",
                    Some("upstream_timeout"),
                    None,
                ),
                // Only when the provider's own answer could not be passed on.
                U::Status { status: 429, .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    Some("upstream_rate_limited"),
                    None,
                ),
                U::Status { .. } => (
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("upstream_error"),
                    None,
                ),
                U::Mismatch { .. } => (
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("upstream_invalid_answer"),
                    None,
                ),
            },
            G::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("server_shutting_down"),
                None,
            ),
            G::NoTarget { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("no_available_provider"),
                None,
            ),
            G::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                Some("internal_error"),
                None,
            ),
            G::JobNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("job_not_found"),
                None,
            ),
            G::ResponseNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                None,
            ),
            G::PreviousResponseNotFound(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("previous_response_not_found"),
                Some("previous_response_id"),
            ),
            G::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("response_store_unavailable"),
                None,
            ),
            G::JobRefused(crate::jobs::SubmitError::Unavailable(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("job_store_unavailable"),
                None,
            ),
            G::JobRefused(crate::jobs::SubmitError::ShuttingDown) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("shutting_down"),
                None,
            ),
            G::JobRefused(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some("job_queue_full"),
                None,
            ),
            G::Batch(b) => {
                use crate::batches::BatchError as B;
                match b {
                    B::NotFound(..) => (
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        Some("not_found"),
                        Some("id"),
                    ),
                    B::Invalid { param, .. } => (
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        Some("invalid_request"),
                        *param,
                    ),
                    B::FileTooLarge { .. } => (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        Some("file_too_large"),
                        Some("file"),
                    ),
                    B::Conflict(_) => (
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        Some("batch_not_cancellable"),
                        None,
                    ),
                    B::Store(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "api_error",
                        Some("batch_store_unavailable"),
                        None,
                    ),
                }
            }
            G::BadJob(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_job"),
                None,
            ),
            // Not a permission of the caller's: the request was not meant for this gateway.
            G::HostNotAllowed => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("host_not_allowed"),
                None,
            ),
        };
        ErrorParts {
            status,
            kind,
            code,
            param,
        }
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> Vec<u8> {
        let parts = self.parts();
        serde_json::to_vec(&serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": parts.kind,
                "param": parts.param,
                "code": parts.code,
            }
        }))
        .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_who_is_at_fault() {
        let s = |e: GatewayError| e.parts().status.as_u16();
        assert_eq!(s(RequestError::BodyTooLarge { limit: 1 }.into()), 413);
        assert_eq!(s(RequestError::BodyTimeout.into()), 408);
        assert_eq!(s(RequestError::MissingModel.into()), 400);
        assert_eq!(s(GatewayError::ModelNotFound("x".into())), 404);
        assert_eq!(s(lumen_plugins::auth::AuthError::UnknownKey.into()), 401);
        assert_eq!(s(GatewayError::ModelNotAllowed("x".into())), 403);
        assert_eq!(s(GatewayError::HostNotAllowed), 403);
        assert_eq!(s(RequestError::NotJson.into()), 415);
        assert_eq!(
            s(UpstreamError::Connect {
                provider: "p".into()
            }
            .into()),
            502
        );
        assert_eq!(
            s(UpstreamError::Timeout {
                provider: "p".into()
            }
            .into()),
            504
        );
        assert_eq!(s(GatewayError::Internal("x".into())), 500);
        assert_eq!(
            s(GatewayError::NoTarget {
                route: "r".into(),
                detail: "p: unhealthy".into()
            }),
            503
        );
    }

    #[test]
    fn body_has_openai_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&GatewayError::ModelNotFound("gpt-9".into()).body()).unwrap();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }
}
