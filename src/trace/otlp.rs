//! OpenTelemetry export (`serve --otlp-endpoint`): the spans of [`super`] sent as traces over
//! OTLP/gRPC to a collector, and a caller's W3C `traceparent` continued, so that a call's
//! edge, admission, tokenizing, queue and inference spans arrive as one trace under the
//! caller's own.
//!
//! Built on the opentelemetry crates (the SDK's batch span processor, the OTLP exporter) and
//! tracing-opentelemetry, which turns the `tracing` spans Tidings already makes into
//! OpenTelemetry spans. Without the flag none of this is installed and the spans cost what
//! they cost before.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The exporter's own runtime could not be started.
    #[error("starting the OTLP exporter's runtime")]
    Runtime(#[source] std::io::Error),
    /// The endpoint or the exporter's settings were refused.
    #[error("building the OTLP exporter for {endpoint}")]
    Build {
        /// The endpoint asked for.
        endpoint: String,
        /// What the exporter said.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// How long one export may take before it is given up (the collector is down or slow; the
/// spans of that batch are lost, the server is not held up).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The OTLP exporter on a runtime of its own. The SDK's batch processor exports from a
/// plain thread, and tonic's channel needs a Tokio reactor: without one that thread panics
/// ("there is no reactor running") and every later span is lost
/// (open-telemetry/opentelemetry-rust#2673). One worker thread is plenty for a few batches
/// a second, and it keeps exports off the server's runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _in_runtime = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _in_runtime = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once, while the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The installed export: flushes what is left and stops when dropped (at the end of
/// `main`, after the server drained).
pub struct Export {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").finish_non_exhaustive()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("tidings: flushing the last spans to the OTLP endpoint: {e}");
        }
    }
}

/// A batch exporter to `endpoint` (e.g. `http://localhost:4317`) and the `tracing` layer
/// that feeds it; the service is named `tidings`. The batch processor's settings come from
/// the standard `OTEL_BSP_*` variables (default: a batch every 5 s, at most 2,048 spans
/// queued; more are dropped, never held).
pub fn layer<S>(endpoint: &str) -> Result<(impl tracing_subscriber::Layer<S>, Export), OtlpError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tidings-otlp")
        .enable_all()
        .build()
        .map_err(OtlpError::Runtime)?;
    let inner = {
        // tonic's lazy channel spawns its worker on the runtime it is built in.
        let _in_runtime = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| OtlpError::Build {
                endpoint: endpoint.to_string(),
                source,
            })?
    };
    let exporter = OnRuntime {
        inner: Arc::new(inner),
        runtime: Arc::new(runtime),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("tidings")
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tidings"));
    Ok((layer, Export { provider }))
}

/// The headers of a call, as the propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` (a call's, just made) continue the caller's trace when its `headers` carry
/// a valid W3C `traceparent`, and returns the trace id the span is exported under; `None`
/// when no export is installed.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        // Refused only when no export is installed: the span then has no OpenTelemetry side.
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let ours = cx.span().span_context().clone();
    ours.is_valid().then(|| ours.trace_id().to_string())
}
