//! Several NER models in one server, chosen per request (`ner_model`): `tidings serve
//! --ner-model models/ner --extra-ner-model multi=models/multitask` as a process, its
//! answers compared with those of servers loaded with one of the two models alone.

mod common;

use common::{client, process, request, summit_article, TestServer};
use futures::StreamExt;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidings::engine::EngineConfig;
use tidings::proto::{self, analyze_batch_item::Outcome};
use tidings::server::ServerConfig;
use tonic::Code;

/// Short texts with names of every type, beside the golden article.
const SHORT: [&str; 3] = [
    "Angela Merkel met Emmanuel Macron in Paris before flying to Washington.",
    "Shares of Toyota and Volkswagen fell in Tokyo after the European Commission spoke.",
    "The Boston Celtics beat the Los Angeles Lakers as Jayson Tatum scored 40 points.",
];

/// The texts every check reads: the golden article, then [`SHORT`].
fn texts() -> Vec<String> {
    std::iter::once(summit_article())
        .chain(SHORT.iter().map(|t| t.to_string()))
        .collect()
}

/// A request for `text` tagged by the model named `ner_model` ("" for the default).
fn with_model(id: &str, text: &str, ner_model: &str) -> proto::AnalyzeRequest {
    proto::AnalyzeRequest {
        ner_model: ner_model.into(),
        ..request(id, text)
    }
}

/// Asserts that `got` has exactly the entities of `want`: texts, labels and offsets equal,
/// scores within 1e-4.
fn assert_same_entities(got: &proto::AnalyzeResponse, want: &proto::AnalyzeResponse, what: &str) {
    let spans = |r: &proto::AnalyzeResponse| -> Vec<(String, String, [u32; 4])> {
        r.entities
            .iter()
            .map(|e| {
                let offsets = [e.start, e.end, e.byte_start, e.byte_end];
                (e.text.clone(), e.label.clone(), offsets)
            })
            .collect()
    };
    assert_eq!(spans(got), spans(want), "{what}");
    for (g, w) in got.entities.iter().zip(&want.entities) {
        assert!(
            (g.score - w.score).abs() < 1e-4,
            "{what}: {g:?} against {w:?}"
        );
    }
}

/// Whether two answers' entities differ anywhere: a mention, a label, an offset or a score
/// (by more than 1e-4).
fn entities_differ(a: &proto::AnalyzeResponse, b: &proto::AnalyzeResponse) -> bool {
    a.entities.len() != b.entities.len()
        || a.entities.iter().zip(&b.entities).any(|(x, y)| {
            (&x.text, &x.label, x.start, x.end) != (&y.text, &y.label, y.start, y.end)
                || (x.score - y.score).abs() > 1e-4
        })
}

/// What servers loaded with one model alone answer for [`texts`]: `[ner, multitask]`, one
/// answer per text each.
async fn references() -> [Vec<proto::AnalyzeResponse>; 2] {
    let alone = [common::models(), common::shared_models()];
    let mut out: [Vec<proto::AnalyzeResponse>; 2] = Default::default();
    for (models, answers) in alone.into_iter().zip(&mut out) {
        let srv = common::start_with(models, EngineConfig::default(), ServerConfig::default());
        let mut c = client(&srv).await;
        for (i, text) in texts().iter().enumerate() {
            let r = c.analyze(request(&i.to_string(), text)).await.unwrap();
            answers.push(r.into_inner());
        }
    }
    out
}

/// The server under test, `serve` with both models and its HTTP API, as a [`TestServer`].
struct TwoModels {
    child: std::process::Child,
    srv: TestServer,
}

impl TwoModels {
    fn start() -> Self {
        let (port, http) = (process::free_port(), process::free_port());
        let child = process::serve(
            port,
            &[
                "--ner-model",
                "models/ner",
                "--extra-ner-model",
                "multi=models/multitask",
                "--http-addr",
                &format!("127.0.0.1:{http}"),
            ],
        );
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let srv = TestServer {
            addr: addr(port),
            http: addr(http),
        };
        Self { child, srv }
    }
}

impl Drop for TwoModels {
    fn drop(&mut self) {
        process::sigterm(&self.child);
        let _ = self.child.wait();
    }
}

/// One server process for every check (loading it is the slow part): GetInfo, each model's
/// answers alone and mixed in batches and streams, and unknown names on gRPC and HTTP.
#[test]
fn requests_choose_their_entity_model() {
    let two = TwoModels::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let refs = references().await;
        info_lists_both_models(&two.srv).await;
        each_model_answers_as_alone(&two.srv, &refs).await;
        mixed_batches_and_streams_get_their_models(&two.srv, &refs).await;
        unknown_names_are_invalid(&two.srv).await;
    });
}

/// GetInfo (and `/v1/info`) lists both entity models by name, the default first and named.
async fn info_lists_both_models(srv: &TestServer) {
    let info = client(srv)
        .await
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.default_ner_model, "ner", "{info:?}");
    let entities: Vec<(&str, &str)> = info
        .models
        .iter()
        .filter(|m| m.task == "entities")
        .map(|m| (m.name.as_str(), m.path.as_str()))
        .collect();
    assert_eq!(
        entities,
        [("ner", "models/ner"), ("multi", "models/multitask")],
        "{info:?}"
    );
    for m in info.models.iter().filter(|m| m.task == "entities") {
        assert!(m.labels.contains(&"B-PER".to_string()), "{m:?}");
        assert!(!m.shared_encoder, "{m:?}");
    }
    let topics = info.models.iter().find(|m| m.task == "topics").unwrap();
    assert_eq!(topics.name, "minilm", "{info:?}");
    let json = common::get_json(srv, "/v1/info").await;
    assert_eq!(json["defaultNerModel"], "ner", "{json}");
    assert_eq!(json["models"][1]["name"], "multi", "{json}");
    // The OpenAPI document describes the new field from the proto's comment.
    let doc = common::get_json(srv, "/openapi.json").await;
    let field = &doc["components"]["schemas"]["AnalyzeRequest"]["properties"]["nerModel"];
    assert_eq!(field["type"], "string", "{field}");
    assert!(
        field["description"]
            .as_str()
            .unwrap()
            .contains("entity model"),
        "{field}"
    );
}

/// Without `ner_model` (or naming the default) a request gets the entities of a server with
/// only models/ner; with `multi`, those of a server with only models/multitask, which differ.
async fn each_model_answers_as_alone(srv: &TestServer, refs: &[Vec<proto::AnalyzeResponse>; 2]) {
    let mut c = client(srv).await;
    let mut differ = false;
    for (i, text) in texts().iter().enumerate() {
        for (name, want) in [
            ("", &refs[0][i]),
            ("ner", &refs[0][i]),
            ("multi", &refs[1][i]),
        ] {
            let got = c.analyze(with_model("x", text, name)).await.unwrap();
            let got = got.into_inner();
            assert_same_entities(&got, want, &format!("text {i}, ner_model {name:?}"));
            common::assert_offsets_slice(text, &got);
            // Topics come from the topic model whichever entity model tags the text.
            assert_eq!(got.topics[0].label, refs[0][i].topics[0].label, "text {i}");
        }
        differ |= entities_differ(&refs[0][i], &refs[1][i]);
    }
    assert!(
        differ,
        "the two models read every text alike: the test cannot tell them apart"
    );
    // Entity types are the chosen model's.
    let r = c
        .analyze(proto::AnalyzeRequest {
            entity_types: vec!["PER".into()],
            ..with_model("t", SHORT[0], "multi")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.entities.is_empty() && r.entities.iter().all(|e| e.label == "PER"));
}

/// The model each request of a batch or a stream chose, by the request's id: `id` ends in
/// the text's index and the model's (0: the default, 1: multi).
fn model_of(id: &str) -> (usize, usize) {
    let (text, model) = id.split_once('/').unwrap();
    (text.parse().unwrap(), model.parse().unwrap())
}

/// Requests choosing either model, in one batch and in one stream, each answered by its
/// model; in a batch, an unknown name fails its item alone.
async fn mixed_batches_and_streams_get_their_models(
    srv: &TestServer,
    refs: &[Vec<proto::AnalyzeResponse>; 2],
) {
    let names = ["", "multi"];
    let mut requests: Vec<proto::AnalyzeRequest> = Vec::new();
    for (i, text) in texts().iter().enumerate() {
        for (m, name) in names.iter().enumerate() {
            requests.push(with_model(&format!("{i}/{m}"), text, name));
        }
    }
    requests.rotate_left(3);
    let check = |item: proto::AnalyzeBatchItem| match item.outcome.unwrap() {
        Outcome::Response(r) => {
            let (text, model) = model_of(&r.id);
            assert_same_entities(&r, &refs[model][text], &format!("item {}", r.id));
        }
        Outcome::Error(e) => panic!("{e:?}"),
    };
    let mut c = client(srv).await;
    let mut batch = requests.clone();
    batch.push(with_model("bad", SHORT[0], "nope"));
    let items = c
        .analyze_batch(proto::AnalyzeBatchRequest { requests: batch })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), requests.len() + 1);
    let mut items = items.into_iter();
    for item in items.by_ref().take(requests.len()) {
        check(item);
    }
    match items.next().unwrap().outcome.unwrap() {
        Outcome::Error(e) => {
            assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
            assert!(e.message.contains("loaded: ner, multi"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    let n = requests.len();
    let mut answers = c
        .analyze_stream_items(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while let Some(item) = answers.next().await {
        check(item.unwrap());
        seen += 1;
    }
    assert_eq!(seen, n, "every stream request answered");
}

/// An unknown `ner_model` is INVALID_ARGUMENT naming the loaded models, whatever the tasks,
/// on gRPC (unary and stream) and on HTTP.
async fn unknown_names_are_invalid(srv: &TestServer) {
    let mut c = client(srv).await;
    for tasks in [vec![], vec![proto::Task::Topics as i32]] {
        let e = c
            .analyze(proto::AnalyzeRequest {
                tasks,
                ..with_model("u", SHORT[0], "nope")
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(
            e.message(),
            "ner_model: unknown entity model \"nope\"; loaded: ner, multi"
        );
    }
    // AnalyzeStream ends with the bad item's status, naming it.
    let mut out = c
        .analyze_stream(futures::stream::iter([with_model("s", SHORT[0], "nope")]))
        .await
        .unwrap()
        .into_inner();
    let e = out.message().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("loaded: ner, multi"), "{e:?}");
    let body = serde_json::json!({"text": SHORT[0], "nerModel": "nope"});
    let (status, json) = common::post_json(srv, "/v1/analyze", &body).await;
    assert_eq!(status, 400, "{json}");
    let message = json["message"].as_str().unwrap_or_default();
    assert!(message.contains("loaded: ner, multi"), "{json}");
    let body = serde_json::json!({"text": SHORT[0], "nerModel": "multi"});
    let (status, json) = common::post_json(srv, "/v1/analyze", &body).await;
    assert_eq!(status, 200, "{json}");
}

/// `serve` with a bad `--extra-ner-model` exits at once with an error naming the flag and
/// what is wrong, before any model is loaded.
#[test]
fn bad_extra_ner_models_stop_serve() {
    for (value, says) in [
        ("=models/multitask", "the name before '=' is empty"),
        ("models/multitask", "give NAME=DIR"),
        ("multi=models/no-such-model", "is not a directory"),
        ("ner=models/multitask", "is the default NER model's"),
        ("a=models/multitask,a=models/multitask", "given twice"),
    ] {
        let mut child = Command::new(process::BIN)
            .current_dir(common::root())
            .args([
                "serve",
                "--addr",
                &format!("127.0.0.1:{}", process::free_port()),
            ])
            .args(["--ner-model", "models/ner", "--extra-ner-model", value])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("serve --extra-ner-model {value} did not stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{value}: {status}");
        assert!(stderr.contains("--extra-ner-model"), "{value}: {stderr}");
        assert!(stderr.contains(says), "{value}: {stderr}");
    }
}

/// An extra NER model of another architecture and tokenizer (the tiny MPNet tagger of the
/// architecture tests, which knows only PER) beside the MiniLM one: its requests are
/// tokenized with its own tokenizer, and their `entity_types` are checked against its labels.
#[tokio::test]
async fn an_extra_model_reads_with_its_own_tokenizer_and_labels() {
    use tidings::pipeline::assembly::{ModelPlan, NerSpec};
    let plan = ModelPlan {
        ner: Some(common::root().join("models/ner")),
        extra_ner: vec![NerSpec {
            name: "tiny".into(),
            dir: common::fixture("tiny-mpnet"),
        }],
        ..ModelPlan::default()
    };
    let models = std::sync::Arc::new(plan.load().unwrap());
    let text = SHORT[0];
    let pieces = |i: usize| {
        let n = models.ner_models().nth(i).unwrap();
        tidings::pipeline::tokens::tokenize(&n.dir.tokenizer, text)
            .unwrap()
            .len() as u32
    };
    let (minilm_pieces, mpnet_pieces) = (pieces(0), pieces(1));
    assert_ne!(
        minilm_pieces, mpnet_pieces,
        "the tokenizers cut the text alike"
    );
    let srv = common::start_with(models, EngineConfig::default(), ServerConfig::default());
    let mut c = client(&srv).await;
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let tiny = info.models.iter().find(|m| m.name == "tiny").unwrap();
    assert_eq!(
        (tiny.task.as_str(), tiny.architecture.as_str()),
        ("entities", "mpnet")
    );
    assert_eq!(tiny.labels, ["O", "B-PER", "I-PER"]);
    let entities = |name: &str, types: &[&str]| proto::AnalyzeRequest {
        tasks: vec![proto::Task::Entities as i32],
        entity_types: types.iter().map(|t| t.to_string()).collect(),
        ..with_model("t", text, name)
    };
    for (name, tokens) in [("", minilm_pieces), ("tiny", mpnet_pieces)] {
        let r = c
            .analyze(entities(name, &["PER"]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.reading.unwrap().tokens, tokens, "ner_model {name:?}");
        assert!(r.entities.iter().all(|e| e.label == "PER"), "{r:?}");
        common::assert_offsets_slice(text, &r);
    }
    assert!(c.analyze(entities("", &["ORG"])).await.is_ok());
    let e = c.analyze(entities("tiny", &["ORG"])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("entity_types[0]"), "{e:?}");
}

/// With a model trained for both tasks as the default (`models/multitask`, topics from its
/// own encoder) and models/ner beside it: a request tagged by the default gets its topic
/// embedding from the tagging pass, one tagged by the extra from a topic pass of its own, and
/// both the same topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_default_model_shares_its_pass_with_topics() {
    use std::sync::atomic::Ordering;
    use tidings::engine::{Class, Engine};
    use tidings::pipeline::analysis::{Article, Options};
    use tidings::pipeline::assembly::{ModelPlan, NerSpec, TopicSource};
    let plan = ModelPlan {
        ner: Some(common::root().join("models/multitask")),
        extra_ner: vec![NerSpec {
            name: "plain".into(),
            dir: common::root().join("models/ner"),
        }],
        topics: TopicSource::Auto,
        taxonomy: Some(common::root().join("models/topics/news.json")),
        ..ModelPlan::default()
    };
    let models = std::sync::Arc::new(plan.load().unwrap());
    assert!(models.shared_encoder);
    let engine = Engine::start(models.clone(), EngineConfig::default());
    engine.default_label_set().await.unwrap();
    let article = |ner_model: Option<&str>| Article {
        id: String::new(),
        text: summit_article(),
        title: String::new(),
        options: Options {
            ner_model: ner_model.map(str::to_string),
            ..Options::default()
        },
    };
    let windows = models.prepare(article(None)).unwrap().ner_windows.len() as u64;
    let rows = || engine.stats().rows_run.load(Ordering::Relaxed);
    let caller = engine.caller(Class::Interactive);
    let mut read = Vec::new();
    for (name, passes) in [(None, 1), (Some("plain"), 2)] {
        let before = rows();
        let (a, _) = engine.analyze(article(name), None, caller).await.unwrap();
        assert_eq!(rows() - before, passes * windows, "ner_model {name:?}");
        assert!(a.entities.iter().any(|e| e.text == "Vladimir Putin"));
        read.push(a);
    }
    let labels = |i: usize| {
        read[i]
            .topics
            .iter()
            .map(|t| t.label.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(labels(0), labels(1));
    let cosine: f32 = read[0]
        .embedding
        .iter()
        .zip(&read[1].embedding)
        .map(|(a, b)| a * b)
        .sum();
    assert!(cosine > 0.9999, "topic embeddings differ: cosine {cosine}");
}
