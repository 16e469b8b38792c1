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
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's URL (`http://collector:4318`).
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
}
