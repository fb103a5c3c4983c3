//! Command-line interface: flags (each with an environment variable where a deployment
//! would set it) and the subcommands' bodies.

mod analyze;
mod batch;
mod bench;
mod eval;
mod memory;
mod serve;
mod train;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use tidings::api::convert::Limits;
use tidings::engine::{Engine, EngineConfig};
use tidings::pipeline::analysis::Models;
use tidings::pipeline::assembly::{HeadSpec, ModelPlan, NerSpec, TopicSource};
use tidings::pipeline::WindowSpec;

/// Tidings: topics and named entities of news articles, over gRPC.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "TIDINGS_LOG_JSON")]
    pub log_json: bool,
    /// Export the spans (a call's, its articles' and their stages') as OpenTelemetry traces
    /// to this OTLP/gRPC endpoint, e.g. `http://localhost:4317`. A caller's W3C
    /// `traceparent` is continued.
    #[arg(long, global = true, env = "TIDINGS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The f32 kernel of the fused path: `avx2`, `avx512`, or `gemm` (gemm's own); the CPU's
    /// fastest by default (gemm's on Intel CPUs with AVX-512). A kernel the CPU does not run
    /// is warned about and the default used.
    #[arg(long, global = true, env = "TIDINGS_SGEMM")]
    pub sgemm: Option<String>,
    /// The int8 kernel: `avx2`, `avxvnni`, `avx512vnni-ymm`, `avx512vnni` or `amx`; the CPU's
    /// fastest by default.
    #[arg(long, global = true, env = "TIDINGS_QGEMM")]
    pub qgemm: Option<String>,
    /// Time the phases of each fused layer (`tidings bench` prints where a pass went).
    #[arg(long, global = true, env = "TIDINGS_PROFILE", value_parser = clap::builder::FalseyValueParser::new())]
    pub profile: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(serve::ServeArgs),
    /// Analyze one file (or stdin, `-`) locally, without a server; prints JSON.
    Analyze(analyze::AnalyzeArgs),
    /// Run a JSONL file of articles through a server (resumable).
    Batch(batch::BatchArgs),
    /// Measure the model path in-process: matmul peak, forward throughput, FLOP efficiency.
    Bench(bench::BenchArgs),
    /// Fine-tune models.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Score models on labelled data.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> Result<()> {
        tidings::model::choices::set(tidings::model::choices::Choices {
            sgemm: self.sgemm.clone(),
            qgemm: self.qgemm.clone(),
            profile: Some(self.profile),
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        match self.command {
            Command::Serve(a) => serve::run(a),
            Command::Analyze(a) => analyze::run(a),
            Command::Batch(a) => batch::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Train(c) => train::run(c),
            Command::Eval(c) => eval::run(c),
        }
    }
}

/// Which models to load, shared by `serve`, `analyze` and `eval`.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// NER model directory (HF format, token classification). "none" to disable entities.
    /// The default entity model; requests name it (`ner_model`) by its directory's name.
    #[arg(long, env = "TIDINGS_NER_MODEL", default_value = "models/ner")]
    pub ner_model: PathBuf,
    /// More NER models, repeated or comma-separated: `NAME=DIR`, NAME made of letters,
    /// digits, `_`, `-` and `.` and not the default's name. A request chooses one with
    /// `ner_model: NAME`; others are tagged by the default. Loaded with the same precision,
    /// device and windows as the default; any tokenizer and architecture.
    #[arg(long, env = "TIDINGS_EXTRA_NER_MODEL", value_delimiter = ',')]
    pub extra_ner_model: Vec<String>,
    /// Topic encoder directory (HF format; mean-pooled embeddings). "none" to disable topics.
    /// "auto": the NER model itself when its config says its encoder was trained to serve
    /// topics too (`tidings_shared_encoder`: one forward pass per window for both tasks),
    /// otherwise `models/minilm`. Naming a directory (e.g. `models/minilm`) runs that encoder
    /// as a second model.
    #[arg(long, env = "TIDINGS_TOPIC_MODEL", default_value = "auto")]
    pub topic_model: PathBuf,
    /// Default topic taxonomy (JSON).
    #[arg(
        long,
        env = "TIDINGS_TAXONOMY",
        default_value = "models/topics/news.json"
    )]
    pub taxonomy: PathBuf,
    /// Trained topic heads (`tidings train topics`), repeated or comma-separated. `PATH`: the
    /// default topics, used when a request brings no labels (at most one). `NAME=PATH`, NAME
    /// made of letters, digits, `_`, `-` and `.`: a head requests choose with
    /// `topic_head: NAME`.
    #[arg(long, env = "TIDINGS_TOPIC_HEAD", value_delimiter = ',')]
    pub topic_head: Vec<String>,
    /// Multiplier of cosine similarities before the topic softmax (the calibration
    /// temperature's inverse).
    #[arg(long, env = "TIDINGS_TOPIC_SCALE", default_value_t = tidings::pipeline::topics::DEFAULT_SCALE)]
    pub topic_scale: f32,
    /// A topic memory built by `tidings train memory`: zero-shot label sets (the default
    /// taxonomy and request labels) are refined against its articles, which then vote on
    /// each article's topics. Deterministic: the same file gives the same scores on every
    /// replica and after a restart.
    #[arg(long, env = "TIDINGS_TOPIC_MEMORY")]
    pub topic_memory: Option<PathBuf>,
    /// Arithmetic of the encoders' matrix products: `int8` (weights quantized per column at
    /// load, activations per row at each product; x86-64 with AVX2, f32 elsewhere) or `f32`.
    /// int8 is the default because it keeps accuracy (CoNLL dev F1 -0.04 points, AG dev
    /// zero-shot -0.03; models/*/REPORT.md) and is about 1.5x faster.
    #[arg(long, env = "TIDINGS_PRECISION", default_value = "int8")]
    pub precision: tidings::model::Precision,
    /// Where the models run: `cpu` (the fused kernels, `--precision` applies) or `cuda` /
    /// `cuda:N` (candle's CUDA ops in f32; a binary built with `--features cuda`).
    #[arg(long, env = "TIDINGS_DEVICE", default_value = "cpu")]
    pub device: tidings::model::DeviceSpec,
    /// Pieces per model window (special tokens excluded).
    #[arg(long, env = "TIDINGS_WINDOW", default_value_t = tidings::pipeline::WindowSpec::default().size)]
    pub window: usize,
    /// Pieces shared by consecutive windows.
    #[arg(long, env = "TIDINGS_WINDOW_OVERLAP", default_value_t = tidings::pipeline::WindowSpec::default().overlap)]
    pub window_overlap: usize,
}

/// `None` for the word `none`, which disables a model.
fn some_path(p: &std::path::Path) -> Option<&std::path::Path> {
    (p.as_os_str() != "none").then_some(p)
}

impl ModelArgs {
    /// The `--topic-memory` file, read and checked against the loaded topic encoder.
    pub fn topic_memory(
        &self,
        models: &Models,
    ) -> Result<Option<tidings::pipeline::topic_memory::TopicMemory>> {
        let Some(path) = &self.topic_memory else {
            return Ok(None);
        };
        let Some(topics) = &models.topics else {
            anyhow::bail!("--topic-memory needs a topic model");
        };
        let probe = models.encoder_probe()?.unwrap_or_default();
        let memory = tidings::pipeline::topic_memory::load(path, topics.model.dim(), &probe)?;
        tracing::info!(
            path = %path.display(),
            name = memory.name,
            articles = memory.vectors.len(),
            sha256 = memory.sha256,
            "topic memory loaded"
        );
        Ok(Some(memory))
    }

    /// What the flags ask to load. The `--topic-head` specs are read only with a topic model
    /// (without one they were never attached, nor checked); the `--extra-ner-model` specs
    /// always (extras without a default NER model are refused when loaded).
    pub fn plan(&self) -> Result<ModelPlan> {
        let topics = TopicSource::from_arg(&self.topic_model);
        let heads = match topics {
            TopicSource::None => Vec::new(),
            _ => self
                .topic_head
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| HeadSpec::parse(s))
                .collect::<Result<_, _>>()?,
        };
        let extra_ner = self
            .extra_ner_model
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| NerSpec::parse(s))
            .collect::<Result<_, _>>()?;
        Ok(ModelPlan {
            ner: some_path(&self.ner_model).map(PathBuf::from),
            extra_ner,
            topics,
            taxonomy: some_path(&self.taxonomy).map(PathBuf::from),
            heads,
            topic_scale: self.topic_scale,
            window: WindowSpec {
                size: self.window,
                overlap: self.window_overlap,
            },
            precision: self.precision,
            device: self.device,
        })
    }

    /// The topic encoder's directory, `auto` resolved (see `--topic-model`); `None` for none.
    pub fn topic_dir(&self) -> Option<PathBuf> {
        TopicSource::from_arg(&self.topic_model).resolve(some_path(&self.ner_model))
    }

    /// Loads the models named by the flags.
    pub fn load(&self) -> Result<Models> {
        self.plan()?.load_then(|| {
            // Loading freed about as much memory as the models keep (f32 tensors, the copies
            // packed or quantized from them); mimalloc would hold it until this thread
            // allocates again, which a server's main thread never does. Measured: 200 -> 83
            // MB resident with one model loaded.
            // SAFETY: mi_collect only walks and trims mimalloc's own heaps (the global
            // allocator, see main.rs).
            unsafe { libmimalloc_sys::mi_collect(true) };
        })
    }
}

/// Engine and request limits, shared by `serve` and `analyze`.
#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Most characters in an article's text.
    #[arg(long, env = "TIDINGS_MAX_TEXT_CHARS", default_value_t = Limits::default().max_text_chars)]
    pub max_text_chars: usize,
    /// Most request-time topic labels.
    #[arg(long, env = "TIDINGS_MAX_LABELS", default_value_t = Limits::default().max_labels)]
    pub max_labels: usize,
    /// Most items in one AnalyzeBatch call.
    #[arg(long, env = "TIDINGS_MAX_BATCH_ITEMS", default_value_t = Limits::default().max_batch_items)]
    pub max_batch_items: usize,
    /// Most padded tokens in one forward pass.
    #[arg(long, env = "TIDINGS_MAX_BATCH_TOKENS", default_value_t = EngineConfig::default().max_batch_tokens)]
    pub max_batch_tokens: usize,
    /// Most padded tokens of work admitted at once (beyond: RESOURCE_EXHAUSTED / back-pressure).
    #[arg(long, env = "TIDINGS_MAX_QUEUE_TOKENS", default_value_t = EngineConfig::default().max_queue_tokens)]
    pub max_queue_tokens: usize,
    /// Milliseconds the batcher waits to fill a batch.
    #[arg(long, env = "TIDINGS_MAX_WAIT_MS", default_value_t = EngineConfig::default().max_wait.as_millis() as u64)]
    pub max_wait_ms: u64,
    /// Share of model work that batch streams keep while unary calls also wait (0 to 1);
    /// unary calls get the rest first. Higher favours batch throughput, lower unary latency.
    #[arg(long, env = "TIDINGS_BATCH_SHARE", default_value_t = EngineConfig::default().batch_share)]
    pub batch_share: f32,
    /// Adapt zero-shot topics to the last N articles analyzed (unlabelled): prototypes are
    /// refined with them, and single-label scores become the votes of each article's nearest
    /// remembered articles: markedly better topics from bare label names, at the cost of
    /// scores that drift with the news the server sees. 0 = off.
    #[arg(long, env = "TIDINGS_REFINE_TOPICS", default_value_t = EngineConfig::default().refine_pool)]
    pub refine_topics: usize,
}

impl LimitArgs {
    /// The request limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_text_chars: self.max_text_chars,
            max_labels: self.max_labels,
            max_batch_items: self.max_batch_items,
            ..Limits::default()
        }
    }

    /// Starts an engine over `models` with these limits.
    pub fn engine(&self, models: Models) -> Engine {
        Engine::start(
            std::sync::Arc::new(models),
            EngineConfig {
                max_batch_tokens: self.max_batch_tokens,
                max_queue_tokens: self.max_queue_tokens,
                max_wait: std::time::Duration::from_millis(self.max_wait_ms),
                batch_share: self.batch_share.clamp(0.0, 1.0),
                refine_pool: self.refine_topics,
                ..EngineConfig::default()
            },
        )
    }
}

/// A multi-threaded tokio runtime for the async subcommands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Topics of many `(title, text)` articles through the engine, all queued at once (streams'
/// back-pressure keeps memory bounded); `labels` = `None` uses the server's defaults.
pub fn analyze_topics(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    articles: &[(String, String)],
    labels: Option<&[tidings::pipeline::topics::Label]>,
) -> Result<Vec<tidings::pipeline::analysis::Analysis>> {
    use tidings::pipeline::analysis::{Article, Options};
    rt.block_on(async {
        let caller = engine.caller(tidings::engine::Class::Batch);
        let futs = articles.iter().enumerate().map(|(i, (title, text))| {
            let article = Article {
                id: i.to_string(),
                text: text.clone(),
                title: title.clone(),
                options: Options {
                    entities: false,
                    ..Options::default()
                },
            };
            async move {
                engine
                    .analyze(article, labels, caller)
                    .await
                    .map(|(a, _)| a)
            }
        });
        futures::future::join_all(futs)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
}
