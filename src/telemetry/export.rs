//! Getting spans out: the OTLP exporter (HTTP/protobuf or gRPC, over TLS for https://, with
//! the configured headers), behind the SDK's batch processor, bounded and counted.
//!
//! The SDK's `BatchSpanProcessor` runs on its own thread with a bounded queue, and never blocks
//! a request: a span that finds the queue full is dropped. It counts such drops privately
//! (one log line at the first), so the queue's bound is kept here instead ([`Bounded`]), which
//! counts every span dropped, and [`Counted`] counts what was exported and what failed to be
//! (a collector down or slow). Both show in `lumen_otel_spans_total{result}`.
//!
//! The exporter's HTTP client and tonic's channel need a tokio runtime, and the batch thread
//! has none (Pingora's runtimes belong to its services): their I/O runs on one small runtime of
//! its own ([`io_runtime`]), one thread, never dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::settings::{OtlpProtocol, TelemetryError, TracingSettings};
use super::tls::{self, Connector};

/// Spans waiting for export, at most: past it, spans are dropped (and counted).
pub const MAX_QUEUE: usize = 4096;
/// Spans sent in one export request, at most.
const MAX_BATCH: usize = 512;

/// What happened to ended spans: `lumen_otel_spans_total{result}`.
#[derive(Clone)]
pub struct SpanCounters {
    pub exported: IntCounter,
    /// The collector refused them, was down, or did not answer in time.
    pub failed: IntCounter,
    /// The queue was full (the collector is slower than the traffic).
    pub dropped: IntCounter,
}

/// The runtime the exporters' I/O runs on.
fn io_runtime() -> Result<&'static tokio::runtime::Runtime, TelemetryError> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lumen-otlp")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Exporter(format!("starting the export runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The SDK's hyper client (over [`Connector`]: http:// and https://), its requests run on
/// [`io_runtime`].
#[derive(Debug, Clone)]
struct OnRuntime {
    inner: opentelemetry_http::hyper::HyperClient<Connector>,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.rt
            .spawn(async move { inner.send_bytes(req).await })
            .await?
    }
}

/// The exporter for `settings`: OTLP/HTTP posts to `<otlp>/v1/traces` (unless the URL names
/// that path already), gRPC to the URL as given.
pub fn exporter(
    settings: &TracingSettings,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let rt = io_runtime()?;
    let built = match settings.protocol {
        OtlpProtocol::Http => {
            let base = settings.otlp.trim_end_matches('/');
            let endpoint = if base.ends_with("/v1/traces") {
                base.to_string()
            } else {
                format!("{base}/v1/traces")
            };
            let connector = Connector::new(tls::client_config(settings.tls_ca.as_deref())?);
            let client = OnRuntime {
                inner: opentelemetry_http::hyper::HyperClient::new(
                    connector,
                    settings.timeout,
                    None,
                ),
                rt: rt.handle().clone(),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(endpoint)
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(settings.timeout)
                .with_headers(settings.headers.iter().cloned().collect())
                .build()
        }
        OtlpProtocol::Grpc => {
            // tonic's channel starts its worker on the runtime it is built in.
            let _in = rt.enter();
            let mut metadata = http::HeaderMap::new();
            for (name, value) in &settings.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    metadata.insert(n, v);
                }
            }
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.otlp.clone())
                .with_timeout(settings.timeout)
                .with_metadata(MetadataMap::from_headers(metadata));
            if settings.otlp.starts_with("https://") {
                let tls = match &settings.tls_ca {
                    Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                builder.with_tls_config(tls).build()
            } else {
                builder.build()
            }
        }
    };
    built.map_err(|e| TelemetryError::Exporter(e.to_string()))
}

/// The batch processor over `exporter`, bounded and counted.
pub fn processor<E: SpanExporter + 'static>(
    exporter: E,
    counters: SpanCounters,
    every: Duration,
) -> Bounded {
    let waiting = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        counters: counters.clone(),
        waiting: waiting.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE)
            .with_max_export_batch_size(MAX_BATCH)
            .with_scheduled_delay(every)
            .build(),
    )
    .build();
    Bounded {
        inner: batch,
        counters,
        waiting,
    }
}

/// Counts what the exporter did with each batch.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counters: SpanCounters,
    /// Spans handed to the batch processor and not yet to the exporter.
    waiting: Arc<AtomicUsize>,
}

impl std::fmt::Debug for SpanCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanCounters")
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.waiting.fetch_sub(n, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        let n = n as u64;
        match &result {
            Ok(()) => self.counters.exported.inc_by(n),
            Err(e) => {
                self.counters.failed.inc_by(n);
                tracing::debug!(error = %e, spans = n, "OTLP export failed; spans dropped");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The batch processor, with its queue's bound kept here so that every drop is counted.
#[derive(Debug)]
pub struct Bounded {
    inner: BatchSpanProcessor,
    counters: SpanCounters,
    waiting: Arc<AtomicUsize>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUE {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.counters.dropped.inc();
            return;
        }
        self.inner.on_end(span)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}
