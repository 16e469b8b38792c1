//! `tracing:` as the gateway reads it, checked (see `config::snapshot`).

use std::time::Duration;

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.otlp: {0}")]
    Exporter(String),
}

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (a collector's port 4318).
    Http,
    /// OTLP/gRPC (port 4317).
    Grpc,
}

/// `tracing:`, checked.
#[derive(Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's URL (`http://collector:4318`, `https://` for TLS).
    pub otlp: String,
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded (0 to 1); a client's sampled flag wins when it sends one.
    pub sample: f64,
    pub service_name: String,
    /// Record prompts and answers (`gen_ai.input.messages`, `gen_ai.output.messages`).
    pub capture_content: bool,
    /// Continue a client's trace (else each request is a new trace, linked to the client's).
    pub trust_traceparent: bool,
    /// How long one export may take, retries included.
    pub timeout: Duration,
    /// How often the batch of ended spans is sent.
    pub every: Duration,
    /// A private CA (PEM) for an https:// collector; the system's roots otherwise.
    pub tls_ca: Option<Vec<u8>>,
    /// Sent with every export (lowercase names; values may be secrets).
    pub headers: Vec<(String, String)>,
}

/// Header values are left out: they are commonly a hosted collector's key.
impl std::fmt::Debug for TracingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("TracingSettings")
            .field("otlp", &self.otlp)
            .field("protocol", &self.protocol)
            .field("sample", &self.sample)
            .field("service_name", &self.service_name)
            .field("capture_content", &self.capture_content)
            .field("trust_traceparent", &self.trust_traceparent)
            .field("timeout", &self.timeout)
            .field("every", &self.every)
            .field("tls_ca", &self.tls_ca.is_some())
            .field("headers", &names)
            .finish()
    }
}
