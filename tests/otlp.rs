//! OpenTelemetry export (issue #29): `tidings serve --otlp-endpoint` sends its spans to a
//! real OTLP/gRPC receiver that this test runs (the official OTLP protos' `TraceService`,
//! from the opentelemetry-proto crate). A call from the gRPC edge and one from the HTTP
//! edge, each carrying the caller's W3C `traceparent`, must each arrive as one trace: the
//! caller's trace id, the call span a child of the caller's span, and under it the article's
//! spans through admission, tokenizing, the queue, inference and decoding. A call without a
//! `traceparent` gets a trace of its own, and the request id it is answered with is that
//! trace's id, so a log line and a trace can be matched.

mod common;

use common::process;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of trace `trace` (hex), by name.
fn trace_of(spans: &[Span], trace: &str) -> Vec<Span> {
    spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace)
        .cloned()
        .collect()
}

/// The one span called `name` in `spans`.
fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {names:?}");
    found[0]
}

/// Checks that trace `trace` holds a call through `call` whose parent is the caller's span
/// `caller_span` (hex; empty for a call that started the trace), and the article's spans
/// under it.
fn assert_one_trace(spans: &[Span], trace: &str, call: &str, caller_span: &str) {
    let spans = trace_of(spans, trace);
    let call = named(&spans, call);
    assert_eq!(hex(&call.parent_span_id), caller_span, "the call's parent");
    let item = named(&spans, "item");
    assert_eq!(
        item.parent_span_id, call.span_id,
        "the article's span is the call's"
    );
    for stage in ["admission", "tokenize", "queue", "decode"] {
        let s = named(&spans, stage);
        assert_eq!(s.parent_span_id, item.span_id, "{stage} is the article's");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    let inference: Vec<&Span> = spans.iter().filter(|s| s.name == "inference").collect();
    assert!(!inference.is_empty(), "at least one inference span");
    for s in &inference {
        assert_eq!(s.parent_span_id, item.span_id, "inference is the article's");
    }
    // The stages in order: the queue ends when the first slice starts.
    let queue = named(&spans, "queue");
    let first = inference
        .iter()
        .map(|s| s.start_time_unix_nano)
        .min()
        .unwrap();
    assert!(
        queue.end_time_unix_nano <= first,
        "the queue ends before inference"
    );
    assert!(named(&spans, "tokenize").end_time_unix_nano <= queue.start_time_unix_nano);
}

#[test]
fn spans_arrive_at_an_otlp_receiver_as_one_trace_per_call() {
    let received = Receiver::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let otlp = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // Logs quieted to warnings must not quiet the traces (the export has its own filter).
    // This file holds one test, so the variable reaches only its server.
    std::env::set_var("RUST_LOG", "warn");
    let (port, http_port) = (process::free_port(), process::free_port());
    let server = process::serve(
        port,
        &[
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--otlp-endpoint",
            &format!("http://{otlp}"),
        ],
    );
    let text = common::summit_article();
    let grpc_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let http_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "00f067aa0ba902b7";
    let own_trace_request_id = rt.block_on(async {
        let mut client = process::connect(port).await;
        let mut req = tonic::Request::new(common::request("a", &text));
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{grpc_trace}-{caller_span}-01").parse().unwrap(),
        );
        req.metadata_mut()
            .insert("x-request-id", "caller-7".parse().unwrap());
        let resp = client.analyze(req).await.unwrap();
        assert_eq!(resp.metadata().get("x-request-id").unwrap(), "caller-7");
        let resp = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{http_port}/v1/analyze"))
            .header("traceparent", format!("00-{http_trace}-{caller_span}-01"))
            .json(&serde_json::json!({"id": "b", "text": text}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        assert_eq!(resp.headers()["x-request-id"], http_trace);
        let resp = client.analyze(common::request("c", &text)).await.unwrap();
        resp.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    });
    // Stopping the server flushes the spans it has not sent yet.
    process::stop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = received.0.lock().unwrap().clone();
        let traces = [grpc_trace, http_trace, own_trace_request_id.as_str()];
        if traces.iter().all(|t| !trace_of(&spans, t).is_empty())
            || std::time::Instant::now() > deadline
        {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_one_trace(
        &spans,
        grpc_trace,
        "grpc /tidings.v1.Tidings/Analyze",
        caller_span,
    );
    assert_one_trace(&spans, http_trace, "http /v1/analyze", caller_span);
    assert_one_trace(
        &spans,
        &own_trace_request_id,
        "grpc /tidings.v1.Tidings/Analyze",
        "",
    );
}
