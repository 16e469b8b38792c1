//! This process's tracer: the SDK's provider, its sampler and exporter.

use std::sync::Arc;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use super::export::{self, SpanCounters};
use super::settings::{TelemetryError, TracingSettings};

/// This process's tracer and the exporter behind it.
pub struct Telemetry {
    provider: SdkTracerProvider,
    pub(super) tracer: SdkTracer,
    pub(super) propagator: TraceContextPropagator,
    pub(super) capture_content: bool,
    pub(super) trust_traceparent: bool,
}

impl Telemetry {
    /// Starts the exporter for `settings`.
    pub fn start(
        settings: &TracingSettings,
        counters: SpanCounters,
    ) -> Result<Arc<Telemetry>, TelemetryError> {
        let exporter = export::exporter(settings)?;
        Ok(Arc::new(Telemetry::with_exporter(
            settings, exporter, counters,
        )))
    }

    fn with_exporter<E: opentelemetry_sdk::trace::SpanExporter + 'static>(
        settings: &TracingSettings,
        exporter: E,
        counters: SpanCounters,
    ) -> Telemetry {
        let provider = SdkTracerProvider::builder()
            .with_span_processor(export::processor(exporter, counters, settings.every))
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("lumen");
        Telemetry {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            capture_content: settings.capture_content,
            trust_traceparent: settings.trust_traceparent,
        }
    }

    /// Sends what has ended and stops the exporter (at shutdown; blocks up to the export
    /// timeout, so it runs off the runtimes).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "OTLP exporter shutdown");
        }
    }
}
