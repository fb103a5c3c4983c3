//! One span per call, gRPC and HTTP alike, named by a request id the caller can give.
//!
//! Every call gets a `call` span with its route, request id and W3C trace id. The request
//! id comes from the caller's `x-request-id` (metadata or header), else from the trace id of
//! its W3C `traceparent`, else it is made here; it is sent back as `x-request-id` on the
//! answer. The span is current while the call's handler runs, stream tasks are spawned
//! inside it, and the engine carries it with each job into the batcher thread
//! ([`crate::engine`]), so that every event from the edge to the forward pass that ran the
//! call's rows names the call: `RUST_LOG=tidings=debug` (with `serve --log-json`, one JSON
//! object per line) follows one request through the queue and the batcher.
//!
//! Under the call, each article has an `item` span ([`item_span`]) and under that its
//! stages: `admission`, `tokenize`, `queue`, one `inference` span per slice, `decode`.
//! [`otlp`] exports the lot as OpenTelemetry traces (`serve --otlp-endpoint`), continuing
//! the caller's `traceparent`.

pub mod otlp;

use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tracing::Instrument;

/// Sets up logging from `RUST_LOG` (default `info`) on stderr (one JSON object per line
/// when `json`), and, when `otlp` names a collector, the export of the spans to it as
/// OpenTelemetry traces ([`otlp`]). Keep the returned export alive while the process runs:
/// dropping it sends the last spans.
pub fn init(json: bool, otlp: Option<&str>) -> Result<Option<otlp::Export>, otlp::OtlpError> {
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let logs = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(logs())
    });
    let lines = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(logs())
    });
    // The export has a filter of its own: `RUST_LOG=warn` quiets the logs, not the traces,
    // and the exporter's own HTTP/2 and gRPC spans are never exported back to it.
    let (export_layer, export) = match otlp {
        Some(endpoint) => {
            let (layer, export) = otlp::layer(endpoint)?;
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target("tidings", tracing::Level::INFO);
            (Some(layer.with_filter(spans)), Some(export))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(text)
        .with(lines)
        .with(export_layer)
        .init();
    Ok(export)
}

/// The header (and gRPC metadata key) of the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The request id of a call, as a request extension (set by [`Traced`] and
/// [`http_middleware`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Longest request id taken from a caller; a longer one is replaced by one made here.
const MAX_REQUEST_ID: usize = 128;

/// The trace id (32 lowercase hex digits, not all zero) of a valid W3C `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// A caller's request id is kept when it is 1 to 128 visible ASCII characters.
fn usable(id: &str) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Random lowercase hex of `bytes` bytes.
fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The request id and trace id of a call with `headers`: the trace id its spans are
/// exported under when they are (`exported`), else its `traceparent`'s, else a new one.
pub fn ids(headers: &http::HeaderMap, exported: Option<String>) -> (String, String) {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = exported
        .or_else(|| get("traceparent").and_then(trace_id_of).map(str::to_string))
        .unwrap_or_else(|| random_hex(16));
    let request = match get(REQUEST_ID) {
        Some(id) if usable(id) => id.to_string(),
        _ => trace.clone(),
    };
    (request, trace)
}

/// The span of one call with `headers`: `protocol` ("grpc" or "http"), its route, and its
/// ids ([`ids`]); on the way out its `status` and `ms`. Each article of the call gets an
/// [`item_span`] inside it. Returns the span and the call's request id.
pub fn call_span(
    protocol: &'static str,
    route: &str,
    headers: &http::HeaderMap,
) -> (tracing::Span, String) {
    let span = tracing::info_span!(
        "call",
        otel.name = %format_args!("{protocol} {route}"),
        otel.kind = "server",
        protocol,
        route,
        request_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        status = tracing::field::Empty,
        ms = tracing::field::Empty,
    );
    let exported = otlp::continue_trace(&span, headers);
    let (request_id, trace_id) = ids(headers, exported);
    span.record("request_id", request_id.as_str());
    span.record("trace_id", trace_id.as_str());
    (span, request_id)
}

/// The span of one article of a call (a unary call's one, a batch's or a stream's each):
/// its `item_id` and `caller` class; the service records the `ner_model` that tags it (when
/// entities run) once the request is validated, and its `tokens`, `windows`, and where its
/// time went (`queue_ms`, `inference_ms`) when it is answered. The engine carries it with
/// the article's job into the batcher.
pub fn item_span(item_id: &str, caller: &'static str) -> tracing::Span {
    tracing::info_span!(
        "item",
        item_id,
        caller,
        ner_model = tracing::field::Empty,
        tokens = tracing::field::Empty,
        windows = tracing::field::Empty,
        queue_ms = tracing::field::Empty,
        inference_ms = tracing::field::Empty,
    )
}

/// Sets `x-request-id` on an answer, records its status and time on `span`, and logs it.
fn finish<B>(
    resp: &mut http::Response<B>,
    request_id: &str,
    span: &tracing::Span,
    started: Instant,
    grpc: bool,
) {
    if let Ok(v) = http::HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let status = if grpc {
        // A trailers-only answer (an error) carries its status in the headers; a streamed
        // one's comes in the trailers, after this point.
        resp.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("streamed")
            .to_string()
    } else {
        resp.status().as_u16().to_string()
    };
    let ms = started.elapsed().as_secs_f64() * 1e3;
    span.record("status", status.as_str());
    span.record("ms", ms);
    tracing::debug!(parent: span, status = %status, ms, "answered");
}

/// Wraps the gRPC service: a [`call_span`] per call, `x-request-id` on every answer.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Traced<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let (span, request_id) = call_span("grpc", req.uri().path(), req.headers());
        req.extensions_mut().insert(RequestId(request_id.clone()));
        let started = Instant::now();
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let mut resp = fut.await?;
                finish(
                    &mut resp,
                    &request_id,
                    &tracing::Span::current(),
                    started,
                    true,
                );
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

/// The HTTP API's middleware: a [`call_span`] per route, `x-request-id` on every answer.
pub async fn http_middleware(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let (span, request_id) = call_span("http", &route, req.headers());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let started = Instant::now();
    async move {
        let mut resp = next.run(req).await;
        finish(
            &mut resp,
            &request_id,
            &tracing::Span::current(),
            started,
            false,
        );
        resp
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_caller_when_usable() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            "junk",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        assert_eq!(
            ids(&h, None),
            (
                "4bf92f3577b34da6a3ce929d0e0e4736".to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736".to_string()
            )
        );
        h.insert(REQUEST_ID, "job-7/item-3".parse().unwrap());
        assert_eq!(ids(&h, None).0, "job-7/item-3");
        // Too long, or not visible ASCII: one is made.
        h.insert(REQUEST_ID, "x".repeat(129).parse().unwrap());
        let (r, t) = ids(&h, None);
        assert_eq!(r, t);
        let (made, trace) = ids(&http::HeaderMap::new(), None);
        assert_eq!((made.len(), trace.len()), (32, 32));
        assert_ne!(ids(&http::HeaderMap::new(), None).1, trace);
    }
}
