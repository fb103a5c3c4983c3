//! Shared harness of the integration tests: a real Tidings server with the real models on an
//! ephemeral loopback port, and a real tonic client.
#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tidings::engine::{Engine, EngineConfig};
use tidings::pipeline::analysis::{Article, Models, Options};
use tidings::pipeline::assembly::{ModelPlan, TopicSource};
use tidings::proto::tidings_client::TidingsClient;
use tidings::server::{self as serving, ServerConfig};
use tonic::transport::Channel;

/// The repository root (tests run from it, but say so explicitly).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of `tests/fixtures/`. The fixtures are texts written for these tests, so that a
/// clone of the repository alone runs the whole suite (nothing is read from `../shared`).
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The golden article (`tests/fixtures/summit-article.txt`): a news report, written for these
/// tests, of Kim Jong Un and Vladimir Putin meeting at the Vostochny Cosmodrome; about 450
/// words, a few model windows. Tests that need a long text repeat it.
pub fn summit_article() -> String {
    let p = fixture("summit-article.txt");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Loads the shipped models (models/ner, models/minilm, the news taxonomy), once per test
/// binary. Panics with the fix when `models/fetch` has not been run.
pub fn models() -> Arc<Models> {
    static MODELS: OnceLock<Arc<Models>> = OnceLock::new();
    MODELS
        .get_or_init(|| {
            let minilm = root().join("models/minilm");
            assert!(
                minilm.join("model.safetensors").is_file(),
                "{} is missing: run models/fetch first (the README's test command does)",
                minilm.display()
            );
            load("models/ner", TopicSource::Dir(minilm))
        })
        .clone()
}

/// The shipped multi-task model (`models/multitask`) loaded for both tasks, as `serve
/// --ner-model models/multitask` loads it (`--topic-model auto`): one encoder, one forward
/// pass per window.
pub fn shared_models() -> Arc<Models> {
    static MODELS: OnceLock<Arc<Models>> = OnceLock::new();
    MODELS
        .get_or_init(|| load("models/multitask", TopicSource::Auto))
        .clone()
}

/// The NER model in `ner` (relative to the root) and the topic encoder from `topics`, with
/// the news taxonomy, assembled as `serve` assembles them ([`ModelPlan`]) in its default
/// precision.
fn load(ner: &str, topics: TopicSource) -> Arc<Models> {
    let r = root();
    let plan = ModelPlan {
        ner: Some(r.join(ner)),
        topics,
        taxonomy: Some(r.join("models/topics/news.json")),
        ..ModelPlan::default()
    };
    Arc::new(
        plan.load()
            .unwrap_or_else(|e| panic!("loading {plan:?}: {e:#}")),
    )
}

/// Tokens of model work that `text` costs the engine's queue (all tasks, no title).
pub fn cost(text: &str) -> usize {
    models()
        .prepare(Article {
            id: String::new(),
            text: text.into(),
            title: String::new(),
            options: Options::default(),
        })
        .expect("tokenizing")
        .cost()
}

/// A server running on its own thread and runtime, so it outlives each test's runtime.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its HTTP/JSON API listens.
    pub http: SocketAddr,
}

/// Starts a server over the shared models with the given engine and server settings.
pub fn start(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> TestServer {
    start_with(models(), engine_cfg, server_cfg)
}

/// [`start`] over `models`.
pub fn start_with(
    models: Arc<Models>,
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
) -> TestServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let any = "127.0.0.1:0".parse().unwrap();
            let listener = serving::bind(any).await.expect("bind");
            let http = serving::bind(any).await.expect("bind HTTP");
            tx.send((listener.local_addr().unwrap(), http.local_addr().unwrap()))
                .unwrap();
            let engine = Engine::start(models, engine_cfg);
            serving::serve_with_http(
                listener,
                Some(http),
                engine,
                server_cfg,
                std::future::pending(),
            )
            .await
            .expect("serve");
        });
    });
    let (addr, http) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server address");
    TestServer { addr, http }
}

/// The default server, shared by the tests of one binary.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(EngineConfig::default(), ServerConfig::default()))
}

/// A channel connected to `server`, for any client (health, reflection, raw gRPC).
pub async fn channel(server: &TestServer) -> Channel {
    let url = format!("http://{}", server.addr);
    for _ in 0..100 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {url}");
}

/// A connected client.
pub async fn client(server: &TestServer) -> TidingsClient<Channel> {
    TidingsClient::new(channel(server).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A client whose HTTP/2 receive windows are small, so that answers it does not read stop
/// the server's sending after a few dozen of them rather than megabytes.
pub async fn small_window_client(server: &TestServer) -> TidingsClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    TidingsClient::new(channel)
}

/// A topic label with only a name.
pub fn label(name: impl Into<String>) -> tidings::proto::TopicLabel {
    tidings::proto::TopicLabel {
        name: name.into(),
        ..Default::default()
    }
}

/// A request for `text` with everything else default.
pub fn request(id: &str, text: &str) -> tidings::proto::AnalyzeRequest {
    tidings::proto::AnalyzeRequest {
        id: id.into(),
        text: text.into(),
        ..Default::default()
    }
}

/// Names in the summit fixture that every shipped tagger reads, with their labels.
pub const SUMMIT_ENTITIES: &[(&str, &str)] = &[
    ("Kim Jong Un", "PER"),
    ("Vladimir Putin", "PER"),
    ("Donald Trump", "PER"),
    ("Sergei Lavrov", "PER"),
    ("Dmitry Peskov", "PER"),
    ("Russia", "LOC"),
    ("North Korea", "LOC"),
    ("Pyongyang", "LOC"),
    ("Vladivostok", "LOC"),
    ("Korean Central News Agency", "ORG"),
    ("United Nations Security Council", "ORG"),
];

/// Checks that `resp` has an entity group for each `(text, label)` of `expected`.
pub fn assert_groups_contain(resp: &tidings::proto::AnalyzeResponse, expected: &[(&str, &str)]) {
    let groups: std::collections::HashSet<(&str, &str)> = resp
        .entity_groups
        .iter()
        .map(|g| (g.text.as_str(), g.label.as_str()))
        .collect();
    for &(t, l) in expected {
        assert!(groups.contains(&(t, l)), "missing {l} {t}: {groups:?}");
    }
}

/// Checks that every entity's offsets slice back to its text, in chars and in bytes.
pub fn assert_offsets_slice(text: &str, resp: &tidings::proto::AnalyzeResponse) {
    let chars: Vec<char> = text.chars().collect();
    for e in &resp.entities {
        let by_chars: String = chars[e.start as usize..e.end as usize].iter().collect();
        assert_eq!(by_chars, e.text, "char offsets of {e:?}");
        assert_eq!(
            &text[e.byte_start as usize..e.byte_end as usize],
            e.text,
            "byte offsets of {e:?}"
        );
        assert!(e.start < e.end);
        assert!((0.0..=1.0).contains(&e.score));
    }
    for w in resp.entities.windows(2) {
        assert!(
            w[0].end <= w[1].start,
            "entities overlap or are out of order: {w:?}"
        );
    }
}

/// Checks that `server` still answers a normal request correctly (after a bad one).
pub async fn assert_still_serving(server: &TestServer) {
    let mut c = client(server).await;
    let r = c
        .analyze(request("alive", "Angela Merkel visited Paris."))
        .await
        .expect("server still answers");
    assert!(r.into_inner().entities.iter().any(|e| e.text == "Paris"));
}

/// The base URL of `server`'s HTTP/JSON API.
pub fn http_url(server: &TestServer) -> String {
    format!("http://{}", server.http)
}

/// GETs `path` of `server`'s HTTP API as JSON.
pub async fn get_json(server: &TestServer, path: &str) -> serde_json::Value {
    reqwest::get(format!("{}{path}", http_url(server)))
        .await
        .expect("HTTP call")
        .json()
        .await
        .expect("a JSON answer")
}

/// POSTs `body` as JSON to `path` of `server`'s HTTP API: (HTTP status, JSON answer).
pub async fn post_json(
    server: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", http_url(server)))
        .json(body)
        .send()
        .await
        .expect("HTTP call");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON answer"))
}

/// A server whose queue holds one `text` and not two (1.5 times its cost), so that
/// concurrent calls with it overflow the queue.
pub fn one_article_queue_server(text: &str) -> TestServer {
    start(
        EngineConfig {
            max_queue_tokens: cost(text) * 3 / 2,
            max_wait: Duration::from_millis(20),
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    )
}
