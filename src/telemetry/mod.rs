//! OpenTelemetry traces (`tracing:` in the config; off without it).
//!
//! Each traced request has one SERVER span (named `{operation} {model}` once the model is
//! known, with the GenAI semantic conventions' `gen_ai.*` attributes), and a CLIENT child per
//! upstream attempt: a fallback, a retry or a hedge is one more child, its failure on it
//! (`error.type`). A cache lookup, a job's queue wait and the request's Redis calls are
//! children too (`spans::redis_call`, through the Redis link's observer). The attempt's span context goes to the
//! provider as W3C `traceparent`/`tracestate`, and a client's own `traceparent` makes the
//! server span its child, so a trace crosses the client, every node it passes and the provider.
//! A job's submit hands its trace to the worker that runs it (`jobs`).
//!
//! Prompts and answers are recorded only with `capture_content: true`. A collector may be
//! https:// (`tls`: the system's roots or `tls_ca_file`), with `headers` on every export.
//!
//! Spans are built with the `opentelemetry` API directly, in the request's own state
//! ([`RequestTrace`], in `RequestCtx`): nothing global, nothing on the `tracing` crate's hot
//! path. A request that is not sampled carries a non-recording span, which costs its ids.
//! Export is batched on the SDK's own thread, bounded and counted (`export`): a collector
//! that is down or slow never slows or fails a request.

mod export;
mod settings;
pub mod spans;
mod tls;
mod tracer;

pub use export::{SpanCounters, MAX_QUEUE};
pub use settings::{OtlpProtocol, TelemetryError, TracingSettings};
pub use spans::RequestTrace;
pub use tls::pem_certificates;
pub use tracer::Telemetry;
