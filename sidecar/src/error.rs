//! Every way a request can fail, and the one mapping to an HTTP status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`.
//!
//! Client mistakes are 4xx. Capacity problems (queue full, still loading) are 503 with
//! `Retry-After`, which the gateway reads as "try another target". Our own failures are 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("could not parse the JSON body of the request: {0}")]
    BadJson(String),
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    /// As `InvalidParam`, for a field whose name is built per request (`messages[2].role`).
    #[error("{message}")]
    InvalidField { param: String, message: String },
    #[error("The model `{0}` does not exist or is not served here")]
    ModelNotFound(String),
    #[error("{message}")]
    WrongModelKind { message: String },
    #[error(
        "This model's maximum context length is {limit} tokens. However, you requested \
         {requested} tokens ({prompt} in the prompt, {completion} for the completion). Please \
         reduce the length of the prompt or of max_tokens."
    )]
    ContextExceeded {
        param: &'static str,
        limit: u32,
        requested: u64,
        prompt: u64,
        completion: u64,
    },
    #[error("The server is at capacity for model `{0}`; retry shortly")]
    QueueFull(String),
    #[error("Model `{0}` is still loading; retry shortly")]
    Loading(String),
    #[error("Unknown path {0}")]
    NotFound(String),
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Status, OpenAI `type`, `param` and `code` for each variant.
    fn parts(&self) -> (StatusCode, &'static str, Option<&str>, Option<&'static str>) {
        use StatusCode as S;
        match self {
            ApiError::BadJson(_) => (
                S::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some("invalid_json"),
            ),
            ApiError::InvalidParam { param, .. } => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some(param),
                Some("invalid_value"),
            ),
            ApiError::InvalidField { param, .. } => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some(param.as_str()),
                Some("invalid_value"),
            ),
            ApiError::ModelNotFound(_) => (
                S::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::WrongModelKind { .. } => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some("model"),
                Some("model_not_supported"),
            ),
            ApiError::ContextExceeded { param, .. } => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some(param),
                Some("context_length_exceeded"),
            ),
            ApiError::QueueFull(_) => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("server_overloaded"),
            ),
            ApiError::Loading(_) => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("model_loading"),
            ),
            ApiError::NotFound(_) => (
                S::NOT_FOUND,
                "invalid_request_error",
                None,
                Some("unknown_url"),
            ),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "server_error", None, None),
        }
    }

    /// The error body, also used as an SSE `data:` payload when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, param, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_exceeded_is_a_400_with_its_code() {
        let e = ApiError::ContextExceeded {
            param: "messages",
            limit: 128,
            requested: 300,
            prompt: 290,
            completion: 10,
        };
        let body = e.body();
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert_eq!(body["error"]["param"], "messages");
        assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn queue_full_says_when_to_retry() {
        let r = ApiError::QueueFull("m".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn unknown_model_is_404_model_not_found() {
        let e = ApiError::ModelNotFound("nope".into());
        assert_eq!(e.body()["error"]["code"], "model_not_found");
        assert_eq!(e.into_response().status(), StatusCode::NOT_FOUND);
    }
}
