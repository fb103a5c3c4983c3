//! Topics through the real server: multi-label scores, `min_topic_score`, label ids and
//! parents, and the IPTC Media Topics taxonomy served by `tidings serve --taxonomy`.

mod common;

use common::{client, request, server};
use tidings::proto::{self, TopicLabel};
use tonic::Code;

fn label(name: &str, id: &str, parent: &str) -> TopicLabel {
    TopicLabel {
        name: name.into(),
        id: id.into(),
        parent: parent.into(),
        ..Default::default()
    }
}

const DEBT_DEAL: &str = "Congressional leaders and the White House reached a deal late on \
    Sunday to raise the federal debt ceiling, averting a default that economists warned would \
    rattle financial markets. Stocks rallied and Treasury yields fell as investors welcomed \
    the agreement, which still needs votes in the House and the Senate this week.";

#[tokio::test]
async fn multi_label_scores_are_independent_and_cut_by_min_score() {
    let mut c = client(server()).await;
    let labels = vec![
        label("politics", "", ""),
        label("business and finance", "", ""),
        label("sports", "", ""),
    ];
    let single = c
        .analyze(proto::AnalyzeRequest {
            labels: labels.clone(),
            ..request("one", DEBT_DEAL)
        })
        .await
        .unwrap()
        .into_inner();
    let sum: f32 = single.topics.iter().map(|t| t.score).sum();
    assert!((sum - 1.0).abs() < 1e-3, "softmax scores sum to 1: {sum}");
    let multi = c
        .analyze(proto::AnalyzeRequest {
            labels: labels.clone(),
            multi_label: true,
            ..request("many", DEBT_DEAL)
        })
        .await
        .unwrap()
        .into_inner();
    let score = |name: &str| {
        multi
            .topics
            .iter()
            .find(|t| t.label == name)
            .map(|t| t.score)
            .unwrap()
    };
    // An article about two things scores high on both, and low on the third.
    assert!(score("politics") > 0.35, "{:?}", multi.topics);
    assert!(score("business and finance") > 0.5, "{:?}", multi.topics);
    assert!(score("sports") < 0.15, "{:?}", multi.topics);
    assert!(multi.topics.iter().map(|t| t.score).sum::<f32>() > 1.0);
    // min_topic_score cuts the list (before top_k).
    let cut = c
        .analyze(proto::AnalyzeRequest {
            labels,
            multi_label: true,
            min_topic_score: 0.3,
            ..request("cut", DEBT_DEAL)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.topics.len(), 2, "{:?}", cut.topics);
    assert!(cut.topics.iter().all(|t| t.score >= 0.3));
    let s = c
        .analyze(proto::AnalyzeRequest {
            min_topic_score: 1.5,
            ..request("bad", DEBT_DEAL)
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("min_topic_score"));
}

#[tokio::test]
async fn label_ids_come_back_and_children_never_outscore_parents() {
    let mut c = client(server()).await;
    // "sports" under "politics" is nonsense on purpose: its own score would be far higher
    // than its parent's for a football report, so the cap must show.
    let labels = vec![
        label("politics", "p-1", ""),
        label("football", "f-1", "p-1"),
        label("economy", "e-1", ""),
    ];
    let text = "The striker scored twice as the home side won the cup final 3-1 in front of \
                a sold-out stadium.";
    let resp = c
        .analyze(proto::AnalyzeRequest {
            labels: labels.clone(),
            multi_label: true,
            ..request("tree", text)
        })
        .await
        .unwrap()
        .into_inner();
    let get = |id: &str| resp.topics.iter().find(|t| t.id == id).unwrap().score;
    assert!(get("f-1") <= get("p-1"), "{:?}", resp.topics);
    // Without the parent the child scores far higher: the cap did something.
    let free = c
        .analyze(proto::AnalyzeRequest {
            labels: vec![label("politics", "p-1", ""), label("football", "f-1", "")],
            multi_label: true,
            ..request("free", text)
        })
        .await
        .unwrap()
        .into_inner();
    let f = free.topics.iter().find(|t| t.id == "f-1").unwrap().score;
    assert!(
        f > 0.5 && f > get("f-1") + 0.2,
        "{:?} vs {:?}",
        free.topics,
        resp.topics
    );
    // Bad parents are refused, naming the label.
    for (labels, needle) in [
        (
            vec![label("a", "", ""), label("b", "", "nobody")],
            "labels[1].parent",
        ),
        (vec![label("a", "", "b"), label("b", "", "a")], "cycle"),
        (vec![label("a", "", "a")], "labels[0].parent"),
    ] {
        let s = c
            .analyze(proto::AnalyzeRequest {
                labels,
                ..request("bad", text)
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains(needle), "{needle}: {}", s.message());
    }
    // Over HTTP the same, in proto3 JSON.
    let (code, v) = common::post_json(
        server(),
        "/v1/analyze",
        &serde_json::json!({"text": text, "multiLabel": true, "minTopicScore": 0.0,
            "labels": [{"name": "sport", "id": "s-1"}, {"name": "economy", "id": "e-1"}]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["topics"][0]["id"], "s-1", "{v}");
}

/// `tidings serve --taxonomy models/topics/iptc-media-topics.json`: the 17 IPTC top-level
/// subjects as the default topics, each answered with its qcode.
#[test]
fn iptc_media_topics_taxonomy_answers_with_qcodes() {
    use common::process;
    let port = process::free_port();
    let child = process::serve(
        port,
        &["--taxonomy", "models/topics/iptc-media-topics.json"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = process::connect(port).await;
        let info = c
            .get_info(proto::GetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.default_topics.len(), 17, "{:?}", info.default_topics);
        let top = |resp: proto::AnalyzeResponse| resp.topics[0].clone();
        let sport = top(c
            .analyze(request(
                "s",
                "The striker scored twice as the home side won the cup final 3-1.",
            ))
            .await
            .unwrap()
            .into_inner());
        assert_eq!(sport.id, "medtop:15000000", "{sport:?}");
        assert_eq!(sport.label, "sport");
        let multi = c
            .analyze(proto::AnalyzeRequest {
                multi_label: true,
                min_topic_score: 0.5,
                ..request("d", DEBT_DEAL)
            })
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = multi.topics.iter().map(|t| t.id.as_str()).collect();
        assert!(
            ids.contains(&"medtop:04000000"),
            "economy, business and finance: {:?}",
            multi.topics
        );
        assert!(ids.iter().all(|i| i.starts_with("medtop:")));
    });
    process::stop(child);
}

/// `--refine-topics`: once the server has seen enough articles scored with its default
/// taxonomy, that taxonomy's single-label scores come from a memory of them labelled by
/// refined prototypes; multi-label scores keep the calibrated originals. Only the default
/// taxonomy's traffic feeds the pool, and request labels are never adapted online (issue
/// #28): a caller with its own labels neither steers nor is steered by others' traffic.
#[tokio::test]
async fn prototypes_are_refined_with_the_articles_the_server_sees() {
    use tidings::engine::{EngineConfig, REFINE_MIN_POOL};
    let srv = common::start(
        EngineConfig {
            refine_pool: 1024,
            ..EngineConfig::default()
        },
        tidings::server::ServerConfig::default(),
    );
    let mut c = client(&srv).await;
    let labels = vec![
        label("World", "", ""),
        label("Sports", "", ""),
        label("Business", "", ""),
    ];
    let probe = |own: bool, multi: bool| proto::AnalyzeRequest {
        labels: if own { labels.clone() } else { Vec::new() },
        multi_label: multi,
        ..request("probe", DEBT_DEAL)
    };
    let mut probes = Vec::new();
    for (own, multi) in [(false, false), (false, true), (true, false)] {
        probes.push(c.analyze(probe(own, multi)).await.unwrap().into_inner());
    }
    // The summit article, sentence by sentence: news for the pool.
    let sentences: Vec<String> = common::summit_article()
        .split(". ")
        .filter(|s| s.split_whitespace().count() > 4)
        .map(str::to_string)
        .collect();
    let feeder = c.clone();
    let traffic = |own_labels: bool| {
        let sentences = sentences.clone();
        let labels = labels.clone();
        let mut c = feeder.clone();
        async move {
            let mut seen = 0;
            while seen < REFINE_MIN_POOL + 8 {
                let requests = (0..64)
                    .map(|i| proto::AnalyzeRequest {
                        labels: if own_labels {
                            labels.clone()
                        } else {
                            Vec::new()
                        },
                        ..request(
                            &format!("w{}", seen + i),
                            &sentences[(seen + i) % sentences.len()],
                        )
                    })
                    .collect();
                let r = c
                    .analyze_batch(proto::AnalyzeBatchRequest { requests })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.items.iter().all(|i| matches!(
                    i.outcome,
                    Some(proto::analyze_batch_item::Outcome::Response(_))
                )));
                seen += 64;
            }
        }
    };
    let scores = |r: &proto::AnalyzeResponse| {
        let mut v: Vec<(String, u32)> = r
            .topics
            .iter()
            .map(|t| (t.label.clone(), t.score.to_bits()))
            .collect();
        v.sort();
        v
    };
    // Traffic with its own labels feeds nothing.
    traffic(true).await;
    let after_own = c.analyze(probe(false, false)).await.unwrap().into_inner();
    assert_eq!(
        scores(&probes[0]),
        scores(&after_own),
        "articles scored with request labels must not adapt the default taxonomy"
    );
    // The default taxonomy's traffic adapts the default taxonomy, and only it.
    traffic(false).await;
    let mut after = Vec::new();
    for (own, multi) in [(false, false), (false, true), (true, false)] {
        after.push(c.analyze(probe(own, multi)).await.unwrap().into_inner());
    }
    assert_ne!(
        scores(&probes[0]),
        scores(&after[0]),
        "refinement changed nothing: {:?} vs {:?}",
        probes[0].topics,
        after[0].topics
    );
    assert_eq!(
        scores(&probes[1]),
        scores(&after[1]),
        "multi-label scores must not drift"
    );
    assert_eq!(
        scores(&probes[2]),
        scores(&after[2]),
        "a caller's own labels are not steered by other callers' traffic"
    );
}

/// `tidings train topics --prior TAX --unlabelled FILE`: a few-shot head with a memory of
/// unlabelled articles (and the labelled ones), served by `serve --topic-head` through gRPC.
#[test]
fn few_shot_head_with_memory_is_trained_and_served() {
    use common::process;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let line = |label: &str, text: &str| {
        serde_json::json!({"label": label, "text": text}).to_string() + "\n"
    };
    let labelled: String = [
        (
            "markets",
            "Shares fell on Wall Street as bond yields rose after the inflation report.",
        ),
        (
            "markets",
            "The central bank left interest rates unchanged and the dollar weakened.",
        ),
        (
            "markets",
            "Oil prices climbed to a six-month high on supply worries.",
        ),
        (
            "markets",
            "The retailer's quarterly profit beat forecasts and its stock jumped 8%.",
        ),
        (
            "sport",
            "The striker scored twice as the home side won the cup final 3-1.",
        ),
        (
            "sport",
            "The champion retained her title after a five-set match at Wimbledon.",
        ),
        (
            "sport",
            "The coach was sacked after the team's fifth straight league defeat.",
        ),
        (
            "sport",
            "He finished the marathon in a course record of two hours and four minutes.",
        ),
    ]
    .iter()
    .map(|(l, t)| line(l, t))
    .collect();
    let unlabelled: String = [
        "European stocks closed lower, dragged down by banks and miners.",
        "The euro slipped against the dollar after weak factory data.",
        "Gold rose as investors sought safety from volatile equity markets.",
        "Treasury yields hit their highest level since 2007.",
        "The goalkeeper saved a late penalty to keep a clean sheet.",
        "The sprinter won gold in the 100 metres final.",
        "The quarterback threw three touchdowns in the second half.",
        "The cyclist took the yellow jersey on the mountain stage.",
    ]
    .iter()
    .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
    .collect();
    let data = write("labelled.jsonl", labelled);
    let pool = write("unlabelled.jsonl", unlabelled);
    let prior = write(
        "prior.json",
        r#"{"labels": [{"name": "markets"}, {"name": "sport"}]}"#.to_string(),
    );
    let head = dir.path().join("head.json");
    process::run_ok([
        "train",
        "topics",
        "--data",
        &data,
        "--prior",
        &prior,
        "--unlabelled",
        &pool,
        "--folds",
        "2",
        "--out",
        head.to_str().unwrap(),
    ]);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&head).unwrap()).unwrap();
    assert_eq!(
        written["memory"]["vectors"].as_array().map(Vec::len),
        Some(16),
        "8 unlabelled + 8 labelled articles remembered"
    );
    // Served twice over: as the default topics, and by name next to the default taxonomy.
    let port = process::free_port();
    let child = process::serve(port, &["--topic-head", head.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let check = |port: u16, topic_head: &'static str| {
        rt.block_on(async move {
            let mut c = process::connect(port).await;
            for (text, want) in [
                (
                    "The midfielder was sent off as the derby ended 2-2.",
                    "sport",
                ),
                (
                    "Stock futures slid as traders priced in another rate hike.",
                    "markets",
                ),
            ] {
                let r = c
                    .analyze(proto::AnalyzeRequest {
                        topic_head: topic_head.into(),
                        ..request("q", text)
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.topics.len(), 2, "{:?}", r.topics);
                assert_eq!(r.topics[0].label, want, "{text}: {:?}", r.topics);
                let sum: f32 = r.topics.iter().map(|t| t.score).sum();
                assert!((sum - 1.0).abs() < 1e-4, "{:?}", r.topics);
            }
        })
    };
    check(port, "");
    process::stop(child);

    let port = process::free_port();
    let http = process::free_port();
    let spec = format!("desk={}", head.display());
    let child = process::serve(
        port,
        &[
            "--topic-head",
            &spec,
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ],
    );
    check(port, "desk");
    rt.block_on(async {
        let mut c =
            process::connect(port).await;
        let info = c
            .get_info(proto::GetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.topic_heads.len(), 1, "{info:?}");
        assert_eq!(info.topic_heads[0].name, "desk");
        assert_eq!(info.topic_heads[0].labels, ["markets", "sport"]);
        assert!(info.default_topics.len() > 2, "the news taxonomy stays the default");
        let plain = c
            .analyze(request("d", "The striker scored twice in the final."))
            .await
            .unwrap()
            .into_inner();
        assert!(plain.topics.len() > 2, "{:?}", plain.topics);
        for (req, says) in [
            (
                proto::AnalyzeRequest {
                    topic_head: "nope".into(),
                    ..request("u", "Shares fell.")
                },
                "unknown topic head \"nope\"; loaded: desk",
            ),
            (
                proto::AnalyzeRequest {
                    topic_head: "nope".into(),
                    tasks: vec![proto::Task::Entities as i32],
                    ..request("e", "Shares fell.")
                },
                "unknown topic head",
            ),
            (
                proto::AnalyzeRequest {
                    topic_head: "desk".into(),
                    labels: vec![label("World", "", "")],
                    ..request("b", "Shares fell.")
                },
                "not both",
            ),
        ] {
            let e = c.analyze(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("topic_head"), "{e:?}");
            assert!(e.message().contains(says), "{e:?}");
        }
        // The same over HTTP/JSON, where the field is `topicHead`.
        let r: serde_json::Value = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{http}/v1/analyze"))
            .json(&serde_json::json!({"text": "The sprinter won gold in the 100 metres.", "topicHead": "desk"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["topics"][0]["label"], "sport", "{r}");
    });
    process::stop(child);
}
