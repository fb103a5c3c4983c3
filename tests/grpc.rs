//! A user's session over real gRPC: the real server on loopback, the real models, the
//! generated tonic client.

mod common;

use common::{
    assert_groups_contain, assert_offsets_slice, client, request, server, summit_article,
    SUMMIT_ENTITIES,
};
use futures::StreamExt;
use std::collections::HashSet;
use std::time::Duration;
use tidings::engine::EngineConfig;
use tidings::proto::{self, analyze_batch_item::Outcome, AnalyzeBatchRequest, TopicLabel};
use tidings::server::ServerConfig;
use tonic::Code;

#[tokio::test]
async fn summit_article_is_world_news_about_kim_and_putin() {
    summit_read_right(server()).await;
}

/// The same golden reading from the multi-task model (`models/multitask`): one encoder, one
/// forward pass per window for both tasks, topics from its pooled states.
#[tokio::test]
async fn the_multitask_model_reads_the_summit_article_from_one_encoder() {
    let srv = common::start_with(
        common::shared_models(),
        EngineConfig::default(),
        ServerConfig::default(),
    );
    let info = client(&srv)
        .await
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.models.len(), 2);
    assert!(info.models.iter().all(|m| m.shared_encoder), "{info:?}");
    // The arithmetic in effect, not the weights' file dtype: the servers of these tests run
    // int8, the serving default, where the CPU has a kernel for it (issue #30: GetInfo said
    // "f32" while int8 ran).
    let int8 = tidings::model::qgemm::available();
    for m in &info.models {
        assert_eq!(m.dtype, if int8 { "int8" } else { "f32" }, "{m:?}");
        assert_eq!(m.engine, "fused", "{m:?}");
        assert!(!m.kernel.is_empty() && m.kernel != "candle", "{m:?}");
    }
    summit_read_right(&srv).await;
}

/// The fixture's topics, entities, offsets and reading, as the shipped models give them.
async fn summit_read_right(srv: &common::TestServer) {
    let mut c = client(srv).await;
    let text = summit_article();
    let resp = c
        .analyze(request("summit", &text))
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(resp.id, "summit");
    // What the shipped models read in the fixture (checked with `tidings analyze`): world
    // news at 0.99 (no other topic above 0.01), and each name below with its label.
    let first = &resp.topics[0];
    assert!(
        first.label == "world" && first.score > 0.8,
        "first topic {first:?}: {:?}",
        resp.topics
    );
    let sum: f32 = resp.topics.iter().map(|t| t.score).sum();
    assert!((sum - 1.0).abs() < 1e-3, "topic scores sum to {sum}");
    assert!(resp.topics.windows(2).all(|w| w[0].score >= w[1].score));
    assert_offsets_slice(&text, &resp);
    assert_groups_contain(&resp, SUMMIT_ENTITIES);
    assert_groups_contain(&resp, &[("Khasan", "LOC"), ("Vostochny", "LOC")]);
    for (who, at_least) in [("Kim Jong Un", 6), ("Vladimir Putin", 4)] {
        let g = resp.entity_groups.iter().find(|g| g.text == who).unwrap();
        assert!(
            g.mentions >= at_least,
            "{who} mentioned {} times (\"Kim\" and \"Putin\" count)",
            g.mentions
        );
    }
    let reading = resp.reading.unwrap();
    assert!(
        reading.tokens > 500 && reading.windows >= 3 && !reading.truncated,
        "{reading:?}"
    );
    assert!(resp.timing.unwrap().total_us > 0);
}

#[tokio::test]
async fn offsets_slice_back_through_emoji_and_accents() {
    let mut c = client(server()).await;
    let text = "😀🎉 Zoë Saldaña met Emmanuel Macron in Zürich 🇨🇭 and São Paulo’s mayor, then flew to Kraków. Ｔｏｋｙｏ e\u{301}te\u{301} 🙂 Angela Merkel";
    let resp = c
        .analyze(request("uni", text))
        .await
        .expect("analyze")
        .into_inner();
    assert_offsets_slice(text, &resp);
    let found: Vec<&str> = resp.entities.iter().map(|e| e.text.as_str()).collect();
    assert!(found.contains(&"Emmanuel Macron"), "{found:?}");
    assert!(found.iter().any(|f| f.contains("Zürich")), "{found:?}");
    let macron = resp
        .entities
        .iter()
        .find(|e| e.text == "Emmanuel Macron")
        .unwrap();
    // "😀🎉 " is 3 chars but 9 bytes: char and byte offsets must differ by that much.
    assert_eq!(
        macron.byte_start - macron.start,
        text[..macron.byte_start as usize].len() as u32
            - text[..macron.byte_start as usize].chars().count() as u32
    );
}

#[tokio::test]
async fn request_time_labels_and_options() {
    let mut c = client(server()).await;
    let mut req = request(
        "labels",
        "The striker scored twice as the club won the cup final on Saturday.",
    );
    req.labels = vec![
        TopicLabel {
            name: "Sports".into(),
            description: "games, teams and players".into(),
            ..TopicLabel::default()
        },
        common::label("Business"),
        common::label("Science"),
    ];
    req.top_k = 2;
    req.tasks = vec![proto::Task::Topics as i32];
    let resp = c.analyze(req).await.expect("analyze").into_inner();
    assert_eq!(resp.topics.len(), 2);
    assert_eq!(resp.topics[0].label, "Sports");
    assert!(resp.entities.is_empty(), "entities not requested");

    let mut req = request("types", &summit_article());
    req.tasks = vec![proto::Task::Entities as i32];
    req.entity_types = vec!["PER".into()];
    req.min_entity_score = 0.5;
    let resp = c.analyze(req).await.expect("analyze").into_inner();
    assert!(resp.topics.is_empty());
    assert!(!resp.entities.is_empty());
    assert!(resp
        .entities
        .iter()
        .all(|e| e.label == "PER" && e.score >= 0.5));
}

#[tokio::test]
async fn batch_answers_every_item_in_order_and_isolates_errors() {
    let mut c = client(server()).await;
    let mut requests: Vec<_> = (0..6)
        .map(|i| {
            request(
                &format!("b{i}"),
                &format!("Item {i}: Angela Merkel visited Paris."),
            )
        })
        .collect();
    requests[3].text = "   ".into();
    let resp = c
        .analyze_batch(AnalyzeBatchRequest { requests })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(resp.items.len(), 6);
    for (i, item) in resp.items.iter().enumerate() {
        match item.outcome.as_ref().expect("outcome") {
            Outcome::Response(r) => {
                assert_ne!(i, 3);
                assert_eq!(r.id, format!("b{i}"));
                assert!(
                    r.entities.iter().any(|e| e.text == "Paris"),
                    "{:?}",
                    r.entities
                );
            }
            Outcome::Error(e) => {
                assert_eq!(i, 3);
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.id, "b3");
                assert!(e.message.contains("text"));
            }
        }
    }
}

#[tokio::test]
async fn stream_returns_every_id() {
    let mut c = client(server()).await;
    let n = 40;
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            request(
                &format!("s{i}"),
                &format!(
                    "Article {i}. Shares of Apple rose in New York after the earnings report."
                ),
            )
        })
        .collect();
    let out = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .expect("stream")
        .into_inner();
    let ids: Vec<String> = out.map(|r| r.expect("item").id).collect().await;
    assert_eq!(ids.len(), n);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), n, "duplicated ids");
    assert!((0..n).all(|i| unique.contains(&format!("s{i}"))));
}

#[tokio::test]
async fn stream_with_an_invalid_item_ends_with_its_status() {
    let mut c = client(server()).await;
    let reqs = vec![request("ok", "Berlin is big."), request("bad", "")];
    let mut out = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .expect("stream")
        .into_inner();
    let mut err = None;
    while let Some(item) = out.next().await {
        if let Err(s) = item {
            err = Some(s);
            break;
        }
    }
    let s = err.expect("the invalid item must end the stream with a status");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("bad"), "{}", s.message());
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_field() {
    let mut c = client(server()).await;
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let limits = info.limits.unwrap();
    let cases: Vec<(&str, proto::AnalyzeRequest)> = vec![
        ("text", request("e", "")),
        ("text", request("w", " \n\t ")),
        (
            "max_text_chars",
            request(
                "big",
                &"word ".repeat(limits.max_text_chars as usize / 5 + 1),
            ),
        ),
        (
            "tasks[0]",
            proto::AnalyzeRequest {
                tasks: vec![0],
                ..request("t", "ok")
            },
        ),
        (
            "tasks[0]",
            proto::AnalyzeRequest {
                tasks: vec![99],
                ..request("t", "ok")
            },
        ),
        (
            "entity_types[0]",
            proto::AnalyzeRequest {
                entity_types: vec!["DATE".into()],
                ..request("t", "ok")
            },
        ),
        (
            "labels[0].name",
            proto::AnalyzeRequest {
                labels: vec![TopicLabel::default()],
                ..request("t", "ok")
            },
        ),
        (
            "duplicate",
            proto::AnalyzeRequest {
                labels: vec![common::label("a"), common::label("A")],
                ..request("t", "ok")
            },
        ),
        (
            "max_labels",
            proto::AnalyzeRequest {
                labels: (0..=limits.max_labels)
                    .map(|i| common::label(format!("l{i}")))
                    .collect(),
                ..request("t", "ok")
            },
        ),
    ];
    for (needle, req) in cases {
        let s = c.analyze(req).await.expect_err(needle);
        assert_eq!(s.code(), Code::InvalidArgument, "{needle}: {s:?}");
        assert!(
            s.message().contains(needle),
            "{needle} not in {:?}",
            s.message()
        );
    }
    let too_many = AnalyzeBatchRequest {
        requests: (0..=limits.max_batch_items)
            .map(|i| request(&i.to_string(), "ok"))
            .collect(),
    };
    let s = c.analyze_batch(too_many).await.expect_err("too many items");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("max_batch_items"));
    // The server still answers a normal request.
    common::assert_still_serving(server()).await;
}

#[tokio::test]
async fn deadline_exceeded_is_reported_and_the_server_survives() {
    let mut c = client(server()).await;
    let mut req = tonic::Request::new(request("late", &summit_article().repeat(20)));
    req.set_timeout(Duration::from_millis(1));
    // The server answers DEADLINE_EXCEEDED (see the next test); tonic's client also runs its
    // own timer on the same deadline and reports CANCELLED "Timeout expired" if it fires first.
    let late = |s: &tonic::Status| {
        s.code() == Code::DeadlineExceeded
            || (s.code() == Code::Cancelled && s.message() == "Timeout expired")
    };
    let s = c.analyze(req).await.expect_err("1 ms cannot be enough");
    assert!(late(&s), "{s:?}");
    let mut req = tonic::Request::new(proto::AnalyzeBatchRequest {
        requests: vec![request("late", &summit_article().repeat(20))],
    });
    req.set_timeout(Duration::from_millis(1));
    let s = c
        .analyze_batch(req)
        .await
        .expect_err("1 ms cannot be enough");
    assert!(late(&s), "{s:?}");
    common::assert_still_serving(server()).await;
}

#[tokio::test]
async fn the_server_caps_unary_calls_with_deadline_exceeded() {
    let srv = common::start(
        EngineConfig::default(),
        ServerConfig {
            request_timeout: Duration::from_millis(50),
            ..ServerConfig::default()
        },
    );
    let mut c = client(&srv).await;
    let s = c
        .analyze(request("long", &summit_article().repeat(40)))
        .await
        .expect_err("50 ms cannot be enough for 40 summit articles");
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("request timeout"), "{s:?}");
    // Streams are not capped by it: a batch job may take hours.
    let reqs = (0..3).map(|i| request(&format!("s{i}"), &summit_article().repeat(4)));
    let answers: Vec<_> = c
        .analyze_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(answers.len(), 3);
    assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
}

#[tokio::test]
async fn health_reflection_and_info() {
    let channel = common::channel(server()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "tidings.v1.Tidings"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    match msg.message_response.unwrap() {
        MessageResponse::ListServicesResponse(l) => {
            assert!(
                l.service.iter().any(|s| s.name == "tidings.v1.Tidings"),
                "{l:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut c = client(server()).await;
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.models.len(), 2);
    let ner = info.models.iter().find(|m| m.task == "entities").unwrap();
    assert!(ner.labels.contains(&"B-PER".to_string()));
    assert!(info.default_topics.contains(&"world".to_string()));
    // The default NER model is NER-only: topics run on the second encoder.
    let topics = info.models.iter().find(|m| m.task == "topics").unwrap();
    assert!(!ner.shared_encoder && !topics.shared_encoder, "{info:?}");
    assert_ne!(ner.path, topics.path);
}

#[tokio::test]
async fn concurrent_clients_get_the_single_request_answer() {
    let srv = server();
    let texts: Vec<String> = (0..8)
        .map(|i| format!("Report {i}: Angela Merkel and Emmanuel Macron met in Berlin to discuss trade with China. {}", "The talks went on. ".repeat(i * 10)))
        .collect();
    let mut c = client(srv).await;
    let mut alone = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        alone.push(
            c.analyze(request(&i.to_string(), t))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let tasks = (0..32).map(|k| {
        let t = texts[k % texts.len()].clone();
        async move {
            let mut c = client(srv).await;
            (
                k % 8,
                c.analyze(request(&(k % 8).to_string(), &t))
                    .await
                    .unwrap()
                    .into_inner(),
            )
        }
    });
    for (i, got) in futures::future::join_all(tasks).await {
        let want = &alone[i];
        assert_eq!(got.entities.len(), want.entities.len(), "item {i}");
        for (g, w) in got.entities.iter().zip(&want.entities) {
            assert_eq!(
                (&g.text, &g.label, g.start, g.end),
                (&w.text, &w.label, w.start, w.end)
            );
            assert!(
                (g.score - w.score).abs() < 1e-3,
                "batched vs alone score {} vs {}",
                g.score,
                w.score
            );
        }
        for (g, w) in got.topics.iter().zip(&want.topics) {
            assert_eq!(g.label, w.label);
            assert!((g.score - w.score).abs() < 1e-3);
        }
    }
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_recovers() {
    // A queue that holds one long article and not two: concurrent long articles must
    // overflow it.
    let text = summit_article().repeat(3);
    let cost = common::cost(&text);
    let srv = common::one_article_queue_server(&text);
    let calls = (0..12).map(|i| {
        let text = text.clone();
        let srv = &srv;
        async move {
            let mut c = client(srv).await;
            c.analyze(request(&i.to_string(), &text)).await
        }
    });
    let results = futures::future::join_all(calls).await;
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(exhausted > 0, "no call was refused");
    assert!(ok > 0, "no call was served");
    assert_eq!(ok + exhausted, 12, "{results:?}");
    // An article larger than the whole queue is refused as too large, not left waiting.
    let huge = summit_article().repeat(12);
    assert!(common::cost(&huge) > cost * 3 / 2);
    let mut c = client(&srv).await;
    let s = c.analyze(request("huge", &huge)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    common::assert_still_serving(&srv).await;
}
