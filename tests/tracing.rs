//! Following one request (issue #29): every call gets a span named by its request id (the
//! caller's `x-request-id`, else its W3C `traceparent`'s trace id, else one made by the
//! server), the id comes back on the answer, and the events of the engine's queue and of the
//! batcher thread that ran the call's rows are logged inside it. Checked through the real
//! server, gRPC and HTTP, with a subscriber that records each event with its spans' fields.

mod common;

use common::{client, request};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One event: its message and the fields of the event and of every span around it (the
/// innermost value of a name wins).
type Event = HashMap<String, String>;

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Event>>>);

impl<S> Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<Fields>() {
                values.record(f);
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let mut all: Event = HashMap::new();
        if let Some(scope) = ctx.event_scope(event) {
            // Outermost first, so that inner spans' values win.
            for span in scope.from_root() {
                all.insert(format!("span:{}", span.name()), "1".into());
                if let Some(sf) = span.extensions().get::<Fields>() {
                    all.extend(sf.0.iter().cloned());
                }
            }
        }
        all.extend(f.0);
        self.0.lock().unwrap().push(all);
    }
}

/// The events recorded so far, from every thread of this test binary.
fn events() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("tidings", tracing::Level::DEBUG);
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(capture.clone().with_filter(filter)),
        )
        .expect("the only subscriber of this test binary");
        capture
    })
}

/// Events whose `request_id` is `id`, after waiting up to 10 s for one with `message`.
async fn events_of(id: &str, message: &str) -> Vec<Event> {
    for _ in 0..100 {
        let got: Vec<Event> = events()
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.get("request_id").map(String::as_str) == Some(id))
            .cloned()
            .collect();
        if got
            .iter()
            .any(|e| e.get("message").map(String::as_str) == Some(message))
        {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {message:?} event for request {id}");
}

fn messages(evs: &[Event]) -> Vec<&str> {
    evs.iter()
        .filter_map(|e| e.get("message").map(String::as_str))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_is_followed_from_the_edge_to_the_batcher() {
    events();
    let srv = common::server();
    let mut c = client(srv).await;
    let mut r = tonic::Request::new(request("item-1", "Angela Merkel visited Paris."));
    r.metadata_mut()
        .insert("x-request-id", "req-unary-1".parse().unwrap());
    let resp = c.analyze(r).await.expect("analyzed");
    assert_eq!(
        resp.metadata().get("x-request-id").unwrap(),
        "req-unary-1",
        "the request id comes back"
    );
    let evs = events_of("req-unary-1", "rows run").await;
    let msgs = messages(&evs);
    for m in ["admitted", "tokenized; queued", "rows run", "analyzed"] {
        assert!(msgs.contains(&m), "no {m:?} event in {msgs:?}");
    }
    let run = evs.iter().find(|e| e["message"] == "rows run").unwrap();
    // Logged on the batcher thread, inside the call's and the item's spans.
    assert_eq!(run["route"], "/tidings.v1.Tidings/Analyze", "{run:?}");
    assert_eq!(run["item_id"], "item-1", "{run:?}");
    assert_eq!(run["caller"], "interactive", "{run:?}");
    assert!(run["row_tokens"].parse::<usize>().unwrap() > 0, "{run:?}");
    let analyzed = evs.iter().find(|e| e["message"] == "analyzed").unwrap();
    assert!(
        analyzed["tokens"].parse::<u32>().unwrap() > 0,
        "{analyzed:?}"
    );
    assert!(analyzed.contains_key("inference_ms"), "{analyzed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_names_the_call_and_an_id_is_made_without_one() {
    events();
    let srv = common::server();
    let mut c = client(srv).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut r = tonic::Request::new(request("t", "Tokyo is in Japan."));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap(),
    );
    let resp = c.analyze(r).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), trace);
    let evs = events_of(trace, "rows run").await;
    assert!(evs.iter().all(|e| e["trace_id"] == trace));
    // No id given: one is made and returned.
    let resp = c.analyze(request("n", "Tokyo is in Japan.")).await.unwrap();
    let made = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(made.len(), 32, "{made}");
    events_of(&made, "rows run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_of_a_stream_is_followed_inside_the_stream_call() {
    events();
    let srv = common::server();
    let mut c = client(srv).await;
    let reqs: Vec<_> = (0..3)
        .map(|i| {
            request(
                &format!("s{i}"),
                "Emmanuel Macron met Olaf Scholz in Berlin.",
            )
        })
        .collect();
    let mut r = tonic::Request::new(futures::stream::iter(reqs));
    r.metadata_mut()
        .insert("x-request-id", "req-stream-1".parse().unwrap());
    let resp = c.analyze_stream(r).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-stream-1");
    let answers: Vec<_> = resp.into_inner().collect().await;
    assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
    let evs = events_of("req-stream-1", "stream ended").await;
    for i in 0..3 {
        let id = format!("s{i}");
        assert!(
            evs.iter().any(|e| e["message"] == "rows run"
                && e.get("item_id") == Some(&id)
                && e["caller"] == "batch"),
            "no batcher event for item {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_call_is_followed_too() {
    events();
    let srv = common::server();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/analyze", common::http_url(srv)))
        .header("x-request-id", "req-http-1")
        .json(&serde_json::json!({"id": "h1", "text": "Angela Merkel visited Paris."}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-http-1");
    let evs = events_of("req-http-1", "rows run").await;
    let run = evs.iter().find(|e| e["message"] == "rows run").unwrap();
    assert_eq!(run["protocol"], "http", "{run:?}");
    assert_eq!(run["route"], "/v1/analyze", "{run:?}");
    assert_eq!(run["item_id"], "h1", "{run:?}");
}
