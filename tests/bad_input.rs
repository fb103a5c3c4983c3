//! The bad-input matrix: each hostile or odd input gets its status (or a sound answer), and
//! the server answers a normal request afterwards.

mod common;

use common::{assert_offsets_slice, client, request, server};
use futures::StreamExt;
use std::time::Duration;
use tidings::proto;
use tonic::Code;

async fn still_serving() {
    common::assert_still_serving(server()).await;
}

#[tokio::test]
async fn odd_but_valid_texts_get_sound_answers() {
    let mut c = client(server()).await;
    let cases: Vec<(&str, String)> = vec![
        ("nul", "Paris\0London and\0Berlin".to_string()),
        ("punctuation", "!!! ... ??? ;;; --- *** ((( )))".to_string()),
        ("emoji", "😀".repeat(10_000)),
        (
            "rtl",
            "قال الرئيس إن Cairo مدينة كبيرة. שלום Jerusalem".to_string(),
        ),
        (
            "combining",
            "Ame\u{301}lie and Zoe\u{308} went to Mu\u{308}nchen with Bjo\u{308}rk.".to_string(),
        ),
        ("long word", "a".repeat(100_000)),
        (
            "control",
            "Line\u{7}one\u{1b}[31m red\r\nTokyo\u{200b}Osaka".to_string(),
        ),
    ];
    for (name, text) in cases {
        let resp = c
            .analyze(request(name, &text))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"))
            .into_inner();
        assert_offsets_slice(&text, &resp);
        assert!(!resp.topics.is_empty(), "{name}: topics");
        assert!(!resp.reading.unwrap().truncated);
    }
    still_serving().await;
}

#[tokio::test]
async fn oversized_inputs_are_refused_by_limit() {
    let mut c = client(server()).await;
    // 1 MB of text: over max_text_chars.
    let s = c
        .analyze(request("1mb", &"word ".repeat(200_000)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("max_text_chars"), "{}", s.message());
    // 20 MB: over the message size limit, refused before decoding.
    let s = c
        .analyze(request("20mb", &"x".repeat(20 << 20)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            s.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{s:?}"
    );
    // 1,000 labels.
    let mut req = request("labels", "Some text.");
    req.labels = (0..1000)
        .map(|i| common::label(format!("label {i}")))
        .collect();
    let s = c.analyze(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("max_labels"));
    still_serving().await;
}

/// `AnalyzeRequest` with `text` as raw bytes, to put invalid UTF-8 on the wire.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(bytes = "vec", tag = "2")]
    text: Vec<u8>,
}

#[tokio::test]
async fn invalid_utf8_on_the_wire_is_an_error_not_a_crash() {
    let mut grpc = tonic::client::Grpc::new(common::channel(server()).await);
    grpc.ready().await.unwrap();
    let codec: tonic_prost::ProstCodec<RawRequest, proto::AnalyzeResponse> =
        tonic_prost::ProstCodec::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tidings.v1.Tidings/Analyze");
    let req = RawRequest {
        id: "bad".into(),
        text: vec![b'P', 0xff, 0xfe, b'x'],
    };
    let s = grpc
        .unary(tonic::Request::new(req), path, codec)
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::Internal | Code::InvalidArgument),
        "{s:?}"
    );
    still_serving().await;
}

#[tokio::test]
async fn streams_that_misbehave_do_not_hurt_the_server() {
    let srv = server();
    // A stream that sends nothing and ends: no responses, a clean end.
    let mut c = client(srv).await;
    let out = c
        .analyze_stream(futures::stream::empty())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.count().await, 0);
    // A stream that sends nothing and stays open: the client's deadline ends it.
    let mut req = tonic::Request::new(futures::stream::pending::<proto::AnalyzeRequest>());
    req.set_timeout(Duration::from_millis(500));
    match c.analyze_stream(req).await {
        Ok(r) => {
            let mut out = r.into_inner();
            let first = out.next().await;
            assert!(matches!(first, Some(Err(_)) | None), "{first:?}");
        }
        Err(s) => assert!(
            matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{s:?}"
        ),
    }
    // A client that cancels mid-stream.
    let reqs: Vec<_> = (0..50)
        .map(|i| request(&format!("c{i}"), "Tokyo and Osaka are in Japan."))
        .collect();
    let mut out = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let _ = out.next().await;
    drop(out);
    // A client that never reads its responses: the server stops reading its requests
    // (back-pressure) instead of buffering without bound. The client's HTTP/2 receive
    // window is kept small, so that the unread answers fill it after a few dozen articles
    // rather than megabytes of them.
    let mut c = common::small_window_client(srv).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let long = common::summit_article();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        for i in 0..10_000 {
            let r = request(&format!("n{i}"), &long);
            if tokio::time::timeout(Duration::from_secs(3), tx.send(r))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let stream = c
        .analyze_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let sent = sender.await.unwrap();
    assert!(
        sent < 10_000,
        "the server kept reading {sent} requests nobody read answers to"
    );
    drop(stream);
    still_serving().await;
}

/// Issue #30: a stream item whose invalid id is huge gets INVALID_ARGUMENT that names the id by
/// its first bytes and size, not the whole id echoed into the trailers (megabytes of
/// `grpc-message` and `tidings-item-id` that clients reject as a protocol error).
#[tokio::test]
async fn a_huge_invalid_stream_id_gets_a_readable_status() {
    let srv = server();
    let mut c = client(srv).await;
    let huge = "x".repeat(2 << 20);
    let reqs = vec![request(&huge, "Tokyo and Osaka are in Japan.")];
    let got = match c.analyze_stream(futures::stream::iter(reqs)).await {
        Ok(r) => r.into_inner().next().await.expect("an answer").unwrap_err(),
        Err(s) => s,
    };
    assert_eq!(got.code(), Code::InvalidArgument, "{got:?}");
    assert!(got.message().contains("bytes"), "{}", got.message());
    assert!(got.message().len() < 1_000, "{} bytes", got.message().len());
    assert!(got.metadata().get("tidings-item-id").is_none());
    still_serving().await;
}
