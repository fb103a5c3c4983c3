//! A shared service: one caller's stream, labels or batch backlog never hurts another caller,
//! and no request field, header or message size can hurt the server. Each test is the
//! regression test of a defect of issue #9, run through a real server and a real client.

mod common;

use common::{client, label, request, TestServer};
use futures::StreamExt;
use std::time::Duration;
use tidings::engine::EngineConfig;
use tidings::proto;
use tidings::server::ServerConfig;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;

/// A short article dense with names: a large answer (many entities) for little model work,
/// so that unread answers fill a client's receive window quickly.
fn name_dense(i: usize) -> String {
    format!(
        "Item {i}: ministers from Paris, London, Berlin, Madrid, Rome, Vienna, Warsaw, Prague, \
         Lisbon, Dublin, Athens, Oslo, Stockholm, Helsinki and Copenhagen met Angela Merkel, \
         Emmanuel Macron, Boris Johnson and Pedro Sanchez in Brussels."
    )
}

/// A server whose queue holds 4096 tokens: a stream's 32 items in flight can fill it.
fn small_queue_server() -> TestServer {
    common::start(
        EngineConfig {
            max_queue_tokens: 4096,
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    )
}

/// Every answer of a stream `request`, up to and including its final status.
async fn answers(
    c: &mut proto::tidings_client::TidingsClient<tonic::transport::Channel>,
    request: impl tonic::IntoStreamingRequest<Message = proto::AnalyzeRequest>,
) -> Vec<Result<proto::AnalyzeResponse, tonic::Status>> {
    c.analyze_stream(request)
        .await
        .expect("stream accepted")
        .into_inner()
        .collect()
        .await
}

/// Opens a stream that sends `article(i)` requests (each with fresh labels when `labels`)
/// and never reads an answer. Returns once the server has stopped reading (3 s without a
/// send going through), with what keeps the stream open.
async fn stalled_stream(
    srv: &TestServer,
    labels: bool,
) -> (
    tonic::Response<tonic::Streaming<proto::AnalyzeResponse>>,
    tokio::sync::mpsc::Sender<proto::AnalyzeRequest>,
    usize,
) {
    let mut c = common::small_window_client(srv).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream = c.analyze_stream(ReceiverStream::new(rx)).await.unwrap();
    let mut sent = 0;
    for i in 0..5_000 {
        let mut r = request(&format!("stall{i}"), &name_dense(i));
        if labels {
            r.labels = vec![label(format!("topic {i}")), label(format!("other {i}"))];
        }
        if tokio::time::timeout(Duration::from_secs(3), tx.send(r))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    assert!(
        sent < 5_000,
        "the server kept reading a stream nobody reads"
    );
    (stream, tx, sent)
}

/// Defect 1: a stream whose client stops reading held queue room (its waiting items kept
/// being handed permits nobody polled) and the label lock, so that other callers got
/// RESOURCE_EXHAUSTED or hung. Unary calls, requests with new labels and other streams must
/// go on being answered while it stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_hurts_no_other_caller() {
    let srv = small_queue_server();
    let (_stream, _tx, sent) = stalled_stream(&srv, true).await;
    eprintln!("the stalled stream got {sent} requests in before the server stopped reading");
    let mut c = client(&srv).await;
    for i in 0..5 {
        let mut r = tonic::Request::new(request(&format!("u{i}"), "Angela Merkel visited Paris."));
        r.set_timeout(Duration::from_secs(10));
        let resp = c.analyze(r).await.unwrap_or_else(|s| {
            panic!("unary call {i} while a stream is stalled: {s:?}");
        });
        assert!(resp.into_inner().entities.iter().any(|e| e.text == "Paris"));
        let mut r = tonic::Request::new(request(&format!("l{i}"), "The striker scored twice."));
        r.get_mut().labels = vec![label(format!("Sport {i}")), label(format!("Finance {i}"))];
        r.set_timeout(Duration::from_secs(10));
        c.analyze(r).await.unwrap_or_else(|s| {
            panic!("a call with new labels while a stream is stalled: {s:?}");
        });
    }
    // Another batch caller's stream still gets through.
    let reqs: Vec<_> = (0..4)
        .map(|i| request(&format!("other{i}"), "Tokyo and Osaka are in Japan."))
        .collect();
    let mut r = tonic::Request::new(futures::stream::iter(reqs));
    r.set_timeout(Duration::from_secs(20));
    let out = answers(&mut c, r).await;
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
}

/// Defect 2: overflowing the label cache cleared it, texts the same request had counted as
/// cached were gone, and the request failed with UNAVAILABLE "engine stopped".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_cache_eviction_never_fails_a_request() {
    let srv = common::start(
        EngineConfig {
            label_cache: 4,
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    );
    let mut c = client(&srv).await;
    let with_labels = |names: &[&str]| {
        let mut r = request("cache", "The striker scored twice in the final.");
        r.labels = names.iter().map(|n| label(*n)).collect();
        r
    };
    c.analyze(with_labels(&["Sports", "Business"]))
        .await
        .unwrap();
    for round in 0..3 {
        let names = [
            "Sports", "Business", "Politics", "Science", "Weather", "Crime",
        ];
        let resp = c
            .analyze(with_labels(&names))
            .await
            .unwrap_or_else(|s| panic!("round {round}: {s:?}"));
        let resp = resp.into_inner();
        assert_eq!(resp.topics.len(), names.len());
        assert_eq!(resp.topics[0].label, "Sports");
    }
}

/// Defect 3: while a stream had a backlog, every permit released went to its waiting items
/// first, so unary calls only saw RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_backlog_never_makes_unary_calls_resource_exhausted() {
    let srv = small_queue_server();
    let mut c = client(&srv).await;
    // 32 items in flight (the stream's limit) need more than the queue holds.
    let reqs: Vec<_> = (0..150)
        .map(|i| request(&format!("s{i}"), &name_dense(i).repeat(3)))
        .collect();
    let mut stream = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    // Wait for the backlog to build.
    for _ in 0..20 {
        stream.next().await.unwrap().unwrap();
    }
    let reader = tokio::spawn(async move { stream.count().await });
    let mut c = client(&srv).await;
    let mut codes = Vec::new();
    for i in 0..10 {
        // Each a few times the work of a stream item: room for it never frees up while
        // stream items wait first in line for every released token.
        let r = c
            .analyze(request(&format!("u{i}"), &name_dense(i).repeat(8)))
            .await;
        codes.push(r.map_or_else(|s| s.code(), |_| Code::Ok));
    }
    assert!(
        codes.iter().all(|c| *c == Code::Ok),
        "unary calls under a stream backlog: {codes:?}"
    );
    assert_eq!(reader.await.unwrap(), 130);
}

/// Defect 9: a `grpc-timeout` with more than the 8 digits gRPC allows overflowed the
/// stream's deadline and panicked its task. Like tonic, the server ignores such a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_grpc_timeout_is_ignored_not_a_panic() {
    let srv = common::server();
    let mut c = client(srv).await;
    let mut r = tonic::Request::new(futures::stream::iter(vec![request(
        "t1",
        "Angela Merkel visited Paris.",
    )]));
    r.metadata_mut()
        .insert("grpc-timeout", "9999999999999999999H".parse().unwrap());
    let out = answers(&mut c, r).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].as_ref().expect("answered").id, "t1");
    // The longest valid value (8 digits of hours) is a deadline far away, not an overflow.
    let mut r = tonic::Request::new(futures::stream::iter(vec![request("t2", "Paris.")]));
    r.metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    let out = answers(&mut c, r).await;
    assert!(out[0].is_ok(), "{out:?}");
}

/// Defect 10: `id`, `entity_types` and `tasks` were bounded only by the message size, and
/// `id` is echoed in answers, messages and headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_entity_types_and_tasks_are_bounded() {
    let srv = common::server();
    let mut c = client(srv).await;
    let field_of = |s: &tonic::Status| {
        s.get_error_details()
            .bad_request()
            .map(|b| b.field_violations[0].field.clone())
    };
    let mut r = request(&"x".repeat(100_000), "Paris.");
    let s = c.analyze(r.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(field_of(&s).as_deref(), Some("id"));
    assert!(s.message().len() < 1_000, "the status echoes the long id");
    r.id = "ok".into();
    r.entity_types = vec!["PER".to_string(); 10_000];
    let s = c.analyze(r.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(field_of(&s).as_deref(), Some("entity_types"));
    r.entity_types = Vec::new();
    r.tasks = vec![proto::Task::Entities as i32; 10_000];
    let s = c.analyze(r).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(field_of(&s).as_deref(), Some("tasks"));
    common::assert_still_serving(srv).await;
}

/// Defect 13: the first failed item of a stream ended it at once, and the answers of up to
/// 63 items in flight were thrown away. AnalyzeStream still ends with the bad item's status,
/// but only after answering every good item read before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stream_item_loses_no_answer_of_the_items_before_it() {
    let srv = common::server();
    let mut c = client(srv).await;
    let mut reqs: Vec<_> = (0..20)
        .map(|i| request(&format!("g{i}"), &name_dense(i)))
        .collect();
    reqs.push(request("bad", "   "));
    let mut out = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut ok = 0;
    let status = loop {
        match out.next().await {
            Some(Ok(_)) => ok += 1,
            Some(Err(s)) => break s,
            None => panic!("the stream ended without the bad item's status"),
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"bad\""), "{status:?}");
    assert_eq!(ok, 20, "answers of good items were thrown away");
}

/// Defect 15: a message over the size limit was answered OUT_OF_RANGE; gRPC's status-code
/// guide says RESOURCE_EXHAUSTED, and the message says what the limit is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted_naming_the_limit() {
    let srv = common::start(
        EngineConfig::default(),
        ServerConfig {
            max_message_bytes: 64 * 1024,
            ..ServerConfig::default()
        },
    );
    let mut c = client(&srv).await;
    let big = "Paris is big. ".repeat(10_000);
    let s = c.analyze(request("big", &big)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("65536"), "{s:?}");
    let out = answers(&mut c, futures::stream::iter(vec![request("big", &big)])).await;
    let s = out.last().unwrap().as_ref().unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    common::assert_still_serving(&srv).await;
}

/// Issue #30, defect 1: a stream read up to 32 requests ahead of the engine, whatever their
/// size, with no bound across streams: requests at the size limits waiting for queue room
/// took a server past its memory limit. Now the process holds at most `max_pending_bytes`
/// of stream requests read and not yet answered (and one parked per stream): past that it
/// stops reading (the client's sends stall behind HTTP/2 flow control) until answers free
/// room, and every request read is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_requests_waiting_for_room_hold_bounded_memory() {
    // One long article fills the batch pool for seconds: the queue holds exactly its cost.
    let long = common::summit_article().repeat(40);
    let long: String = long.chars().take(190_000).collect();
    let srv = common::start(
        EngineConfig {
            max_queue_tokens: common::cost(&long),
            ..EngineConfig::default()
        },
        ServerConfig {
            max_pending_bytes: 512 * 1024,
            ..ServerConfig::default()
        },
    );
    let mut c = client(&srv).await;
    let (long_tx, long_rx) = tokio::sync::mpsc::channel(1);
    let long_stream = c
        .analyze_stream(ReceiverStream::new(long_rx))
        .await
        .unwrap();
    long_tx.send(request("long", &long)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 100 kB requests of little model work each (a sentence padded with spaces), which
    // wait for the long article's room: 5 fit in 512 KiB, one more is parked.
    let padded = |i: usize| {
        format!(
            "Angela Merkel visited Paris on day {i}.{}",
            " ".repeat(100_000)
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut c2 = client(&srv).await;
    let stream = c2.analyze_stream(ReceiverStream::new(rx)).await.unwrap();
    let mut sent = 0;
    for i in 0..64 {
        match tokio::time::timeout(
            Duration::from_secs(1),
            tx.send(request(&format!("p{i}"), &padded(i))),
        )
        .await
        {
            Ok(r) => r.unwrap(),
            Err(_) => break,
        }
        sent += 1;
    }
    eprintln!("{sent} requests of 100 kB went out before the server stopped reading");
    // Before the fix the server read 32 (and the client's window held more): 45 went out.
    // Now 6 are read; HTTP/2 windows and the client's buffer hold about 12 more.
    assert!(
        sent <= 24,
        "{sent} requests of 100 kB sent while the server held 512 KiB of them"
    );
    // The long article goes away; every request sent is answered.
    drop((long_tx, long_stream));
    drop(tx);
    let out: Vec<_> = tokio::time::timeout(
        Duration::from_secs(120),
        stream.into_inner().collect::<Vec<_>>(),
    )
    .await
    .expect("every answer within 2 minutes");
    assert_eq!(
        out.len(),
        sent,
        "{:?}",
        out.iter().filter(|r| r.is_err()).collect::<Vec<_>>()
    );
    for r in &out {
        let r = r.as_ref().unwrap_or_else(|s| panic!("{s:?}"));
        assert!(r.entities.iter().any(|e| e.text == "Paris"), "{r:?}");
    }
    common::assert_still_serving(&srv).await;
}

/// Labels at every limit: 64 labels, each with a 2,000-character description and 16
/// examples of 2,000 characters, all distinct (tagged with `tag`).
fn labels_at_the_limits(tag: &str) -> Vec<proto::TopicLabel> {
    let text = |k: String| {
        let mut t = format!("{tag} {k} ");
        while t.len() < 2_000 {
            t.push_str("markets rallied as the central bank held rates ");
        }
        t.chars().take(2_000).collect::<String>()
    };
    (0..64)
        .map(|j| proto::TopicLabel {
            name: format!("label {j}"),
            description: text(format!("d{j}")),
            examples: (0..16).map(|k| text(format!("e{j}.{k}"))).collect(),
            ..Default::default()
        })
        .collect()
}

/// Issue #30, defect 3: admission capped a request's estimate at the pool's size, and label
/// texts took room that was not there, so one request with labels at every limit (~280k
/// tokens of label work, more than the 262,144 of the queue) took the whole interactive pool
/// for ~30 s and every other unary call got RESOURCE_EXHAUSTED. Label work is now admitted
/// on an upper bound of its cost, and a request whose labels cannot fit is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_work_larger_than_the_queue_is_refused_at_once() {
    let srv = common::server();
    let mut c = client(srv).await;
    let mut r = tonic::Request::new(request("labels", "The striker scored twice."));
    r.get_mut().labels = labels_at_the_limits("refused");
    r.set_timeout(Duration::from_secs(60));
    let t0 = std::time::Instant::now();
    let mut big = c.clone();
    let call = tokio::spawn(async move { big.analyze(r).await });
    // Meanwhile other unary calls are answered.
    for i in 0..5 {
        let mut u = tonic::Request::new(request(&format!("u{i}"), "Angela Merkel visited Paris."));
        u.set_timeout(Duration::from_secs(30));
        c.analyze(u)
            .await
            .unwrap_or_else(|s| panic!("unary call {i} beside a request with huge labels: {s:?}"));
    }
    let s = call.await.unwrap().unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("labels:") && s.message().contains("262144"),
        "{s:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refused after {:?}",
        t0.elapsed()
    );
}

/// Issue #30, defect 4: label texts were tokenized on the async runtime, up to 1,152 texts
/// of 2,000 characters a request, blocking a worker that also answers health probes. Two
/// such requests at once must leave health checks answered promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_tokenizing_leaves_health_checks_answered() {
    let srv = common::start(
        EngineConfig {
            max_queue_tokens: 1 << 20,
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    );
    let mut calls = Vec::new();
    for k in 0..2 {
        let mut c = client(&srv).await;
        let mut r = tonic::Request::new(request(&format!("l{k}"), "The striker scored twice."));
        r.get_mut().labels = labels_at_the_limits(&format!("health {k}"));
        r.set_timeout(Duration::from_secs(4));
        calls.push(tokio::spawn(async move { c.analyze(r).await }));
    }
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(common::channel(&srv).await);
    let mut slowest = Duration::ZERO;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let t = std::time::Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health check");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("slowest health check while labels were tokenized: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a health check took {slowest:?}"
    );
    for c in calls {
        // Cut short by their deadline: 2 x 280k tokens of label work is a minute of work.
        let _ = c.await.unwrap();
    }
}
