//! One admin answer (status, content type, body, extra headers), as the admin routes and the
//! pages build it. A leaf of `admin`.

use http::{header, StatusCode};
use serde::Serialize;

/// One admin answer.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Vec<(header::HeaderName, String)>,
}

impl Reply {
    pub(crate) fn new(
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Vec<u8>>,
    ) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn json<T: Serialize>(value: &T) -> Reply {
        Reply::new(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(value).unwrap_or_default(),
        )
        // Usage and key ids: never kept in a browser's or a proxy's cache.
        .header(header::CACHE_CONTROL, "no-store")
    }

    pub(crate) fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Reply {
        Reply::new(
            status,
            "application/json",
            lumen_plugins::error_body(message, kind, code),
        )
    }

    pub(crate) fn header(mut self, name: header::HeaderName, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}
