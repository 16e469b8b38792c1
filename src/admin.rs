//! The admin listener (loopback by default): `/metrics` for Prometheus.
//!
//! It is a separate Pingora service so that scrapes never share a port, a limit or a failure
//! mode with client traffic.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;

/// Answers admin requests from shared gateway state.
pub struct AdminApp {
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, content_type, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "application/json",
                lumen_plugins::error_body(
                    "unknown admin endpoint",
                    "invalid_request_error",
                    "unknown_url",
                ),
            ),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
