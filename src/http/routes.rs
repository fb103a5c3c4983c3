//! The route table. The router and the OpenAPI document are both made from [`ROUTES`], so
//! the document lists exactly what is served.

use super::{handlers, HttpState};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use std::time::Instant;

/// One HTTP route, described for the OpenAPI document.
#[derive(Debug)]
pub struct Route {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Path, as the router matches it.
    pub path: &'static str,
    /// The OpenAPI operationId; also picks the handler.
    pub operation_id: &'static str,
    /// One line saying what it does.
    pub summary: &'static str,
    /// The `tidings.v1.Tidings` method it stands for: its proto comment describes it.
    pub rpc: Option<&'static str>,
    /// Request body: media type and the proto message (schema) it holds.
    pub request: Option<(&'static str, &'static str)>,
    /// Success body: media type and the proto message it holds (`None`: described here).
    pub response: (&'static str, Option<&'static str>),
    /// Whether the bearer token (when the server has one) is required.
    pub auth: bool,
    /// Whether a `timeout` applies.
    pub deadline: bool,
}

/// Every route served.
pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/v1/analyze",
        operation_id: "analyze",
        summary: "Analyze one article: its topics and named entities.",
        rpc: Some("Analyze"),
        request: Some(("application/json", "AnalyzeRequest")),
        response: ("application/json", Some("AnalyzeResponse")),
        auth: true,
        deadline: true,
    },
    Route {
        method: "POST",
        path: "/v1/analyze:batch",
        operation_id: "analyzeBatch",
        summary: "Analyze several articles; per-item results in request order.",
        rpc: Some("AnalyzeBatch"),
        request: Some(("application/json", "AnalyzeBatchRequest")),
        response: ("application/json", Some("AnalyzeBatchResponse")),
        auth: true,
        deadline: true,
    },
    Route {
        method: "POST",
        path: "/v1/analyze:stream",
        operation_id: "analyzeStream",
        summary: "A batch job as newline-delimited JSON: one AnalyzeRequest per line in, one \
                  AnalyzeBatchItem per line out (answers may come out of order; match them by \
                  `id`), then a last line `{\"end\": {code, status, message}}` that says how \
                  the stream ended (code 0 = every line answered). A line that is not a valid \
                  AnalyzeRequest is answered by an item error naming its line number. The \
                  server reads only as fast as it analyzes (back-pressure).",
        rpc: Some("AnalyzeStreamItems"),
        request: Some(("application/x-ndjson", "AnalyzeRequest")),
        response: ("application/x-ndjson", Some("AnalyzeBatchItem")),
        auth: true,
        deadline: true,
    },
    Route {
        method: "GET",
        path: "/v1/info",
        operation_id: "getInfo",
        summary: "The loaded models, their labels and the server's limits.",
        rpc: Some("GetInfo"),
        request: None,
        response: ("application/json", Some("GetInfoResponse")),
        auth: true,
        deadline: false,
    },
    Route {
        method: "GET",
        path: "/healthz",
        operation_id: "healthz",
        summary: "Liveness: 200 while the process serves HTTP at all.",
        rpc: None,
        request: None,
        response: ("application/json", None),
        auth: false,
        deadline: false,
    },
    Route {
        method: "GET",
        path: "/readyz",
        operation_id: "readyz",
        summary: "Readiness: 200 while the server takes work, 503 once it drains for \
                  shutdown.",
        rpc: None,
        request: None,
        response: ("application/json", None),
        auth: false,
        deadline: false,
    },
    Route {
        method: "GET",
        path: "/openapi.json",
        operation_id: "openapi",
        summary: "This document.",
        rpc: None,
        request: None,
        response: ("application/json", None),
        auth: false,
        deadline: false,
    },
    Route {
        method: "GET",
        path: "/",
        operation_id: "page",
        summary: "A page to paste an article into and see what Tidings read: entities \
                  highlighted in the text, topic scores, entity groups.",
        rpc: None,
        request: None,
        response: ("text/html", None),
        auth: false,
        deadline: false,
    },
];

/// The handler of an operation.
fn handler(operation_id: &str) -> MethodRouter<HttpState> {
    match operation_id {
        "analyze" => post(handlers::analyze),
        "analyzeBatch" => post(handlers::analyze_batch),
        "analyzeStream" => post(handlers::analyze_stream),
        "getInfo" => get(handlers::info),
        "healthz" => get(handlers::healthz),
        "readyz" => get(handlers::readyz),
        "openapi" => get(handlers::openapi),
        "page" => get(handlers::page),
        other => panic!("route table names an operation without a handler: {other}"),
    }
}

/// The router of [`ROUTES`].
pub fn router(state: HttpState) -> Router {
    let mut router = Router::new();
    for r in ROUTES {
        router = router.route(r.path, handler(r.operation_id));
    }
    router
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::from_fn(crate::trace::http_middleware))
        .with_state(state)
}

/// Counts HTTP calls by route, method and status, and records their latency (to the
/// response head; a stream's body runs on).
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    // Known methods only: hyper accepts any token as a method, and every label value is a
    // series kept for the life of the process.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("tidings_http_requests_total", "route" => route.clone(), "method" => method, "status" => status.clone())
        .increment(1);
    metrics::histogram!("tidings_http_request_seconds", "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    resp
}
