//! `tidings train ner`, `tidings train projection` and `tidings train topics`: flags, and the
//! calls into [`tidings::train`] that do the work.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use tidings::pipeline::analysis::LabelSet;
use tidings::train::embedding_cache;
use tidings::train::few_shot::{self, FewShot};
use tidings::train::ner::{self, NerTrainConfig};
use tidings::train::topics::{self, HeadConfig};

/// What to train.
#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Fine-tune an encoder + token-classification head on CoNLL data.
    Ner(TrainNerArgs),
    /// Fit the linear map that takes a multi-task model's pooled states (`train ner
    /// --distill`) onto its base sentence encoder's embeddings, on unlabelled text, and store
    /// it in the model directory.
    Projection(TrainProjectionArgs),
    /// Fit a topic classification head on labelled articles (CSV label,title,description or
    /// JSONL {label,text,title}); reports k-fold cross-validated accuracy.
    Topics(TrainTopicsArgs),
    /// Build a topic memory from unlabelled articles (their embeddings, no text) for
    /// `serve --topic-memory`: deterministic memory-backed topics.
    Memory(super::memory::TrainMemoryArgs),
}

/// Flags of `tidings train projection`.
#[derive(clap::Args, Debug)]
pub struct TrainProjectionArgs {
    /// The model trained for both tasks; updated in place.
    #[arg(long, default_value = "models/ner")]
    model: PathBuf,
    /// The sentence encoder whose embeddings the map aims at (the model's base).
    #[arg(long, default_value = "models/minilm")]
    base: PathBuf,
    /// Unlabelled text: a CoNLL file, read as its sentences and runs of three.
    #[arg(long, default_value = "../shared/data/conll2003/train.txt")]
    data: PathBuf,
    /// Ridge penalty on the map's weights.
    #[arg(long, default_value_t = 1.0)]
    ridge: f64,
}

/// Flags of `tidings train topics`.
#[derive(clap::Args, Debug)]
pub struct TrainTopicsArgs {
    /// Labelled data.
    #[arg(long, default_value = "../shared/data/ag_news/dev.csv")]
    data: PathBuf,
    /// Output head (JSON), for `tidings serve --topic-head`.
    #[arg(long, default_value = "models/topics/ag_news_head.json")]
    out: PathBuf,
    /// Names for the label values in data order of first appearance sorted, comma-separated
    /// as value=name (e.g. `1=World,2=Sports`); default: the values themselves.
    #[arg(long)]
    label_names: Option<String>,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Optimizer steps (default 300; 100 with --prior).
    #[arg(long)]
    steps: Option<usize>,
    /// Start from the zero-shot prototypes of this taxonomy (its labels, in the order of the
    /// sorted label values: class 1, 2, ... for AG), so that a handful of examples per class
    /// refines them: few-shot heads.
    #[arg(long)]
    prior: Option<PathBuf>,
    /// Few-shot evaluation instead of a head: for each count (comma-separated, e.g. 8,16,32),
    /// `--draws` times, fit on that many random rows per class drawn from the even rows of
    /// --data, with the even rows' text as the unlabelled pool, and score on the odd rows;
    /// next to zero-shot on the same rows. Writes no head; --unlabelled is not used.
    #[arg(long, value_delimiter = ',')]
    shots: Vec<usize>,
    /// Random draws per shot count.
    #[arg(long, default_value_t = 5)]
    draws: usize,
    /// Unlabelled articles (JSONL of {"text", "title"?}, or CSV with the label,title,
    /// description header; labels are ignored) of the kind the head will see: with --prior,
    /// writes a memory head instead of fitting a regression. The prototypes are refined with
    /// these articles and the labelled rows, and the head remembers both (about 4.7 KB of
    /// JSON per article) and scores by nearest neighbours (see models/topics/REPORT.md).
    #[arg(long)]
    unlabelled: Option<PathBuf>,
    /// Keep the article embeddings of --data (and --unlabelled) in files named after this
    /// path (PATH.<key>.json), and reuse them when the rows' text, the topic model and its
    /// window are the same, to iterate on recipes without re-embedding.
    #[arg(long)]
    embeddings_cache: Option<PathBuf>,
    #[command(flatten)]
    models: super::ModelArgs,
    #[command(flatten)]
    limits: super::LimitArgs,
}

/// Flags of `tidings train ner` (defaults: the shipped model's recipe).
#[derive(clap::Args, Debug)]
pub struct TrainNerArgs {
    /// Base encoder (HF model directory).
    #[arg(long, default_value = "models/minilm")]
    base: PathBuf,
    /// CoNLL training file.
    #[arg(long, default_value = "../shared/data/conll2003/train.txt")]
    train: PathBuf,
    /// CoNLL dev file (scored each epoch; the best epoch is kept). "none" to skip.
    #[arg(long, default_value = "../shared/data/conll2003/valid.txt")]
    dev: PathBuf,
    /// Output model directory.
    #[arg(long, default_value = "models/ner")]
    out: PathBuf,
    /// Passes over the training data.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Chunks (of up to --max-pieces pieces) per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Peak learning rate of the encoder.
    #[arg(long, default_value_t = 1.5e-4)]
    lr: f64,
    /// Peak learning rate of the new head and casing embedding.
    #[arg(long, default_value_t = 1e-3)]
    head_lr: f64,
    /// Fraction of steps spent warming up.
    #[arg(long, default_value_t = 0.06)]
    warmup: f64,
    /// Dropout on hidden states.
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Seed of everything random.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// Longest training chunk, in pieces.
    #[arg(long, default_value_t = 254)]
    max_pieces: usize,
    /// Stop after N steps (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Train on the first N documents only (0 = all).
    #[arg(long, default_value_t = 0)]
    limit_docs: usize,
    /// Do not add the word-shape (casing) embedding.
    #[arg(long)]
    no_casing: bool,
    /// Continue from OUT/checkpoints (mid-epoch too).
    #[arg(long)]
    resume: bool,
    /// Minutes between checkpoints within an epoch (0 = at epoch ends only).
    #[arg(long, default_value_t = 10.0)]
    checkpoint_minutes: f64,
    /// Save weights in f32 instead of f16.
    #[arg(long)]
    f32: bool,
    /// Weight of the distillation loss that keeps the mean-pooled states close to --base's
    /// sentence embeddings, so the model serves topics too (one encoder for both tasks);
    /// 0 trains a NER-only model.
    #[arg(long, default_value_t = 1.0)]
    distill: f64,
    /// Fraction of chunks shown as if upper- or lower-cased (word shapes only).
    #[arg(long, default_value_t = 0.1)]
    case_augment: f64,
    /// Probability that each entity mention of a chunk is swapped for another training-set
    /// mention of the same type (0 = off).
    #[arg(long, default_value_t = 0.2)]
    entity_replace: f64,
    /// Decay of a moving average of the weights, scored on dev each epoch and kept when
    /// better (0 = off).
    #[arg(long, default_value_t = 0.998)]
    ema: f64,
    /// Train low-rank adapters (LoRA) of this rank on every dense layer of a frozen --base,
    /// with the biases, layer norms and head, and save only those (a few MB, loaded over the
    /// base); 0 = train and save every weight.
    #[arg(long, default_value_t = 0)]
    adapter_rank: usize,
    /// LoRA's alpha (adapter products scaled by alpha / rank); 0 = twice the rank.
    #[arg(long, default_value_t = 0.0)]
    adapter_alpha: f64,
}

/// mimalloc's `purge_delay` option (its position in `mi_option_e`; libmimalloc-sys names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to hand freed memory back to the OS (unless `MIMALLOC_PURGE_DELAY`
/// is set, which then rules). Every training step allocates and frees the same large
/// activation and gradient tensors; a purge between two uses brings them back as fresh pages
/// the kernel has to zero. A training run keeps its peak memory instead, which it needs again
/// at the next step anyway.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table (the global
    // allocator, see main.rs); the purge logic reads it on each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Runs a training command.
pub fn run(c: TrainCommand) -> Result<()> {
    match c {
        TrainCommand::Memory(a) => super::memory::run(a),
        TrainCommand::Ner(a) => {
            keep_freed_memory();
            let cfg = NerTrainConfig {
                base: a.base,
                train: a.train,
                dev: (a.dev.as_os_str() != "none").then_some(a.dev),
                out: a.out,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                head_lr: a.head_lr,
                warmup: a.warmup,
                dropout: a.dropout,
                clip: a.clip,
                weight_decay: a.weight_decay,
                seed: a.seed,
                max_pieces: a.max_pieces,
                max_steps: a.max_steps,
                limit_docs: a.limit_docs,
                casing: !a.no_casing,
                resume: a.resume,
                checkpoint_minutes: a.checkpoint_minutes,
                f16: !a.f32,
                distill: a.distill,
                case_augment: a.case_augment,
                entity_replace: a.entity_replace,
                ema: a.ema,
                adapter_rank: a.adapter_rank,
                adapter_alpha: a.adapter_alpha,
            };
            // On a worker of the model pool, as the server's batcher and `tidings bench` run
            // the encoder: the training ops' parallel loops then run on that pool instead of
            // being injected into rayon's global pool from outside and waited for on a futex.
            let report = tidings::engine::model_pool().install(|| ner::train(&cfg))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        TrainCommand::Topics(a) => train_topics(a),
        TrainCommand::Projection(a) => {
            let started = std::time::Instant::now();
            let report = tidings::engine::model_pool().install(|| {
                tidings::train::projection::train(&a.model, &a.base, &a.data, a.ridge)
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!(
                "projection written to {} ({:.0}s)",
                a.model.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// `tidings train topics`: embeds the labelled (and unlabelled) articles, then either prints
/// the few-shot report (`--shots`) or cross-validates and writes a head.
fn train_topics(a: TrainTopicsArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let examples = topics::read_examples(&a.data)?;
    topics::check_labelled(&examples, &a.data)?;
    if a.unlabelled.is_some() && a.prior.is_none() && a.shots.is_empty() {
        anyhow::bail!(
            "--unlabelled builds a memory head from the --prior prototypes: give --prior too"
        );
    }
    let classes = topics::Classes::new(&examples, a.label_names.as_deref(), &a.data)?;
    let names = &classes.names;
    let encoder = TopicEncoder::load(&a.models, &a.limits)?;
    let cache = a.embeddings_cache.as_deref();
    let x = encoder.embed(&examples, cache)?;
    let unlabelled = match (&a.unlabelled, a.shots.is_empty()) {
        (Some(p), true) => encoder.embed_file(p, cache)?,
        _ => Vec::new(),
    };
    let unlabelled = std::sync::Arc::new(unlabelled);
    let embedded = started.elapsed();
    let prior = match &a.prior {
        Some(p) => Some(encoder.prior(p, names.len())?),
        None => None,
    };
    let cfg = topics::head_config(a.steps, prior.is_some());
    if !a.shots.is_empty() {
        let run = FewShot::new(&x, &classes.y, names, cfg, prior.as_deref());
        return few_shot_report(&run, cfg, &a.shots, a.draws);
    }
    // The same kind of head is cross-validated and written.
    let mut trained = topics::train_head(
        &x,
        &classes.y,
        names,
        cfg,
        prior.as_deref(),
        &unlabelled,
        a.folds,
    )?;
    trained.head.encoder_probe = encoder.engine.models().encoder_probe()?.unwrap_or_default();
    write_head(&a.out, &trained.head)?;
    println!("{} rows, {} labels {:?}", x.len(), names.len(), names);
    println!(
        "{}-fold cross-validated accuracy {:.4} (folds {:?})",
        a.folds,
        trained.mean_accuracy(),
        trained
            .folds
            .iter()
            .map(|v| format!("{v:.4}"))
            .collect::<Vec<_>>()
    );
    println!(
        "head written to {} ({:.0}s embedding, {:.0}s total)",
        a.out.display(),
        embedded.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `head` as JSON to `out`, creating its folder.
fn write_head(out: &std::path::Path, head: &LabelSet) -> Result<()> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_vec(head)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The topic encoder `tidings train topics` embeds articles with, as serving would: the
/// engine over the flags' topic model alone, and what names its embeddings in a cache key.
struct TopicEncoder {
    rt: tokio::runtime::Runtime,
    engine: tidings::engine::Engine,
    /// [`embedding_cache::model_key`] of the encoder.
    key: String,
}

impl TopicEncoder {
    /// Loads the topic model the flags name (no NER model, no heads) and starts an engine.
    fn load(models: &super::ModelArgs, limits: &super::LimitArgs) -> Result<Self> {
        let topic_model = models.topic_dir().unwrap_or_else(|| "none".into());
        let topic_dir = topic_model.display().to_string();
        let (device, window, overlap) = (models.device, models.window, models.window_overlap);
        let models = super::ModelArgs {
            topic_model,
            ner_model: "none".into(),
            extra_ner_model: Vec::new(),
            topic_head: Vec::new(),
            ..models.clone()
        }
        .load()?;
        // The arithmetic the encoder runs in, not the one asked for (int8 falls back to f32
        // off the CPU's fused path), and the device when it is not the CPU.
        let precision = models
            .topics
            .as_ref()
            .map_or("-".into(), |t| t.model.precision().to_string());
        let precision = match device {
            tidings::model::DeviceSpec::Cpu => precision,
            other => format!("{precision}@{other}"),
        };
        let key = embedding_cache::model_key(
            &topic_dir,
            &precision,
            window,
            overlap,
            limits.max_text_chars,
        );
        let engine = limits.engine(models);
        let rt = super::runtime()?;
        Ok(Self { rt, engine, key })
    }

    /// Embeddings of `examples`, through the cache files named after `cache` when given
    /// ([`embedding_cache::embed_cached`]).
    fn embed(
        &self,
        examples: &[topics::Example],
        cache: Option<&std::path::Path>,
    ) -> Result<Vec<Vec<f32>>> {
        let dim = self.engine.models().topics.as_ref().map(|t| t.model.dim());
        embedding_cache::embed_cached(examples, &self.key, cache, dim, |articles| {
            Ok(
                super::analyze_topics(&self.rt, &self.engine, articles, None)?
                    .into_iter()
                    .map(|a| a.embedding)
                    .collect(),
            )
        })
    }

    /// Embeddings of the articles of the file `path` (labels ignored), which must hold some.
    fn embed_file(
        &self,
        path: &std::path::Path,
        cache: Option<&std::path::Path>,
    ) -> Result<Vec<Vec<f32>>> {
        let rows = topics::read_examples(path)?;
        if rows.is_empty() {
            anyhow::bail!("{}: no articles", path.display());
        }
        self.embed(&rows, cache)
    }

    /// The zero-shot prototypes of the taxonomy file `path`, which must have `classes`
    /// labels.
    fn prior(&self, path: &std::path::Path, classes: usize) -> Result<Vec<Vec<f32>>> {
        let tax = tidings::pipeline::topics::Taxonomy::read(path)?;
        if tax.labels.len() != classes {
            anyhow::bail!(
                "{} has {} labels; the data has {} classes",
                path.display(),
                tax.labels.len(),
                classes
            );
        }
        label_weights(&self.rt, &self.engine, &tax.labels)
    }
}

/// The prototypes of `labels` as `engine` computes them for a request.
pub(super) fn label_weights(
    rt: &tokio::runtime::Runtime,
    engine: &tidings::engine::Engine,
    labels: &[tidings::pipeline::topics::Label],
) -> Result<Vec<Vec<f32>>> {
    let caller = engine.caller(tidings::engine::Class::Batch);
    let set = rt
        .block_on(engine.label_set(labels, caller))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(set.weights)
}

/// Prints the few-shot accuracies of `run` for each count in `shots`, `draws` random draws
/// each ([`FewShot`]), after its zero-shot scores when it has a prior.
fn few_shot_report(run: &FewShot, cfg: HeadConfig, shots: &[usize], draws: usize) -> Result<()> {
    let started = std::time::Instant::now();
    println!(
        "few-shot heads ({} steps, lr {}, {}), {} draws per count from the {} even rows, scored on the {} odd rows",
        cfg.steps,
        cfg.lr,
        if run.has_prior() {
            "from the zero-shot prototypes"
        } else {
            "from zeros"
        },
        draws,
        run.even_rows(),
        run.odd_rows()
    );
    if let Some(z) = run.zero_shot() {
        println!(
            "  0 per class: zero-shot {:.4}; with the even rows' text: refined prototypes {:.4}, memory {:.4}",
            z.zero_shot, z.refined, z.memory
        );
    }
    let show = |v: &[f64]| {
        let (mean, sd) = few_shot::mean_sd(v);
        format!("{mean:.4} (sd {sd:.4})")
    };
    for &n in shots {
        let s = run.shots(n, draws)?;
        println!("{n:>3} per class: head {}", show(&s.head));
        if run.has_prior() {
            println!(
                "               semi-supervised: refined prototypes {}, head from them {}, memory {}",
                show(&s.refined),
                show(&s.semi),
                show(&s.memory)
            );
        }
    }
    println!("({:.1}s fitting)", started.elapsed().as_secs_f64());
    Ok(())
}
