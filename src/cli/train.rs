//! `tidings train ner`: fine-tune the NER model.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use tidings::train::ner::{self, NerTrainConfig};

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

fn train_topics(a: TrainTopicsArgs) -> Result<()> {
    use anyhow::Context;
    use tidings::train::topics::{self, HeadConfig};
    let started = std::time::Instant::now();
    let examples = topics::read_examples(&a.data)?;
    if let Some(i) = examples.iter().position(|e| e.label.trim().is_empty()) {
        anyhow::bail!("{}: row {} has no label", a.data.display(), i + 1);
    }
    if a.unlabelled.is_some() && a.prior.is_none() && a.shots.is_empty() {
        anyhow::bail!(
            "--unlabelled builds a memory head from the --prior prototypes: give --prior too"
        );
    }
    let rename: std::collections::HashMap<String, String> = a
        .label_names
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut values: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    values.sort();
    values.dedup();
    if values.len() < 2 {
        anyhow::bail!("{}: need at least two labels", a.data.display());
    }
    let names: Vec<String> = values
        .iter()
        .map(|v| rename.get(v).cloned().unwrap_or_else(|| v.clone()))
        .collect();
    let y: Vec<usize> = examples
        .iter()
        .map(|e| values.binary_search(&e.label).unwrap_or(0))
        .collect();
    let topic_model = a.models.topic_dir().unwrap_or_else(|| "none".into());
    let topic_dir = topic_model.display().to_string();
    let (device, window, overlap) = (a.models.device, a.models.window, a.models.window_overlap);
    let models = super::ModelArgs {
        topic_model,
        ner_model: "none".into(),
        topic_head: Vec::new(),
        ..a.models
    }
    .load()?;
    // The arithmetic the encoder runs in, not the one asked for (int8 falls back to f32 off
    // the CPU's fused path), and the device when it is not the CPU.
    let precision = models
        .topics
        .as_ref()
        .map_or("-".into(), |t| t.model.precision().to_string());
    let precision = match device {
        tidings::model::DeviceSpec::Cpu => precision,
        other => format!("{precision}@{other}"),
    };
    let cache_key = format!(
        "{topic_dir}|{precision}|{window}|{overlap}|{}",
        a.limits.max_text_chars
    );
    let engine = a.limits.engine(models);
    let rt = super::runtime()?;
    let embed = |examples: &[topics::Example]| -> Result<Vec<Vec<f32>>> {
        embed_cached(
            &rt,
            &engine,
            examples,
            &cache_key,
            a.embeddings_cache.as_deref(),
        )
    };
    let x = embed(&examples)?;
    let unlabelled: Vec<Vec<f32>> = match (&a.unlabelled, a.shots.is_empty()) {
        (Some(p), true) => {
            let rows = topics::read_examples(p)?;
            if rows.is_empty() {
                anyhow::bail!("{}: no articles", p.display());
            }
            embed(&rows)?
        }
        _ => Vec::new(),
    };
    let unlabelled = std::sync::Arc::new(unlabelled);
    let embedded = started.elapsed();
    let prior: Option<Vec<Vec<f32>>> = match &a.prior {
        Some(p) => {
            let tax = tidings::pipeline::topics::Taxonomy::read(p)?;
            if tax.labels.len() != names.len() {
                anyhow::bail!(
                    "{} has {} labels; the data has {} classes",
                    p.display(),
                    tax.labels.len(),
                    names.len()
                );
            }
            let set = rt
                .block_on(
                    engine.label_set(&tax.labels, engine.caller(tidings::engine::Class::Batch)),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(set.weights)
        }
        None => None,
    };
    let cfg = HeadConfig {
        steps: a.steps.unwrap_or(if prior.is_some() {
            topics::PRIOR_STEPS
        } else {
            300
        }),
        lr: if prior.is_some() {
            topics::PRIOR_LR
        } else {
            HeadConfig::default().lr
        },
        ..HeadConfig::default()
    };
    if !a.shots.is_empty() {
        return few_shot_report(&x, &y, &names, cfg, prior.as_deref(), &a.shots, a.draws);
    }
    // The same kind of head is cross-validated and written.
    let make = |tx: &[Vec<f32>], ty: &[usize]| match &prior {
        Some(p) if !unlabelled.is_empty() => {
            topics::memory_head(&names, p, unlabelled.clone(), tx, ty)
        }
        p => topics::fit_from(tx, ty, &names, cfg, p.as_deref()),
    };
    let cv = topics::cross_validate_with(&x, &y, a.folds, cfg.seed, make)?;
    let mean = cv.iter().sum::<f64>() / cv.len() as f64;
    let mut head = make(&x, &y)?;
    head.encoder_probe = engine.models().encoder_probe()?.unwrap_or_default();
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_vec(&head)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("{} rows, {} labels {:?}", x.len(), names.len(), names);
    println!(
        "{}-fold cross-validated accuracy {:.4} (folds {:?})",
        a.folds,
        mean,
        cv.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>()
    );
    println!(
        "head written to {} ({:.0}s embedding, {:.0}s total)",
        a.out.display(),
        embedded.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Embeddings of `examples` as serving computes them, through files named after `cache`
/// when given: reused when the file was written for the same rows (a hash of every title
/// and text, in order) under the same `model` key (topic model, window settings) and has one
/// vector per row, else recomputed and written there (a failed write only warns).
fn embed_cached(
    rt: &tokio::runtime::Runtime,
    engine: &tidings::engine::Engine,
    examples: &[tidings::train::topics::Example],
    model: &str,
    cache: Option<&std::path::Path>,
) -> Result<Vec<Vec<f32>>> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Cached {
        key: String,
        embeddings: Vec<Vec<f32>>,
    }
    let mut h = Fnv1a::default();
    h.add(model);
    for e in examples {
        h.add(&e.title);
        h.add(&e.text);
    }
    let key = format!("{:016x}-{}", h.0, examples.len());
    let file = cache.map(|c| {
        let mut name = c.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{key}.json"));
        c.with_file_name(name)
    });
    let dim = engine.models().topics.as_ref().map(|t| t.model.dim());
    if let Some(f) = &file {
        if let Ok(raw) = std::fs::read(f) {
            if let Ok(hit) = serde_json::from_slice::<Cached>(&raw) {
                if hit.key == key
                    && hit.embeddings.len() == examples.len()
                    && hit.embeddings.iter().all(|v| Some(v.len()) == dim)
                {
                    eprintln!("{} embeddings from {}", examples.len(), f.display());
                    return Ok(hit.embeddings);
                }
            }
        }
    }
    eprintln!("embedding {} articles...", examples.len());
    let articles: Vec<(String, String)> = examples
        .iter()
        .map(|e| (e.title.clone(), e.text.clone()))
        .collect();
    let embeddings: Vec<Vec<f32>> = super::analyze_topics(rt, engine, &articles, None)?
        .into_iter()
        .map(|a| a.embedding)
        .collect();
    if let Some(f) = &file {
        let out = Cached { key, embeddings };
        let written = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(f, serde_json::to_vec(&out).unwrap_or_default()));
        if let Err(e) = written {
            eprintln!(
                "warning: could not keep the embeddings in {}: {e}",
                f.display()
            );
        }
        return Ok(out.embeddings);
    }
    Ok(embeddings)
}

/// FNV-1a over strings, each followed by a 0xff separator: a cache key of rows.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn add(&mut self, s: &str) {
        for b in s.bytes().chain([0xff]) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Few-shot accuracy: for each count in `shots`, `draws` random draws of that many rows per
/// class from the even rows to fit on, scored on the odd rows; next to zero-shot (the prior
/// alone) and, with a prior, the semi-supervised route: the prior refined with the drawn rows
/// and the even rows' text (labels unread), then the head fitted from the refined prototypes.
fn few_shot_report(
    x: &[Vec<f32>],
    y: &[usize],
    names: &[String],
    cfg: tidings::train::topics::HeadConfig,
    prior: Option<&[Vec<f32>]>,
    shots: &[usize],
    draws: usize,
) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use tidings::pipeline::topics as zs;
    use tidings::train::topics;
    let started = std::time::Instant::now();
    let k = names.len();
    let prototypes = |p: &[Vec<f32>]| {
        tidings::pipeline::analysis::LabelSet::prototypes(
            names.to_vec(),
            p.to_vec(),
            zs::DEFAULT_SCALE,
        )
    };
    let (vx, vy): (Vec<Vec<f32>>, Vec<usize>) = (1..x.len())
        .step_by(2)
        .map(|i| (x[i].clone(), y[i]))
        .unzip();
    let even: Vec<usize> = (0..x.len()).step_by(2).collect();
    println!(
        "few-shot heads ({} steps, lr {}, {}), {} draws per count from the {} even rows, scored on the {} odd rows",
        cfg.steps,
        cfg.lr,
        if prior.is_some() {
            "from the zero-shot prototypes"
        } else {
            "from zeros"
        },
        draws,
        even.len(),
        vx.len()
    );
    if let Some(p) = prior {
        let pool: Vec<&[f32]> = even.iter().map(|&i| x[i].as_slice()).collect();
        let pooled = std::sync::Arc::new(even.iter().map(|&i| x[i].clone()).collect::<Vec<_>>());
        let refined = zs::refine(p, &pool, zs::REFINE_ROUNDS);
        println!(
            "  0 per class: zero-shot {:.4}; with the even rows' text: refined prototypes {:.4}, memory {:.4}",
            topics::accuracy(&prototypes(p), &vx, &vy),
            topics::accuracy(&prototypes(&refined), &vx, &vy),
            topics::accuracy(
                &topics::memory_head_refined(names, refined, pooled, &[]),
                &vx,
                &vy
            )
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let sd = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len().max(1) as f64).sqrt()
    };
    let show = |v: &[f64]| format!("{:.4} (sd {:.4})", mean(v), sd(v));
    for &n in shots {
        let (mut heads, mut refined, mut semi, mut memory) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for draw in 0..draws {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 * n as u64 + draw as u64);
            let mut picked = vec![false; x.len()];
            for c in 0..k {
                let mut rows: Vec<usize> = even.iter().copied().filter(|&i| y[i] == c).collect();
                rows.shuffle(&mut rng);
                rows.iter().take(n).for_each(|&i| picked[i] = true);
            }
            let (tx, ty): (Vec<Vec<f32>>, Vec<usize>) = (0..x.len())
                .filter(|&i| picked[i])
                .map(|i| (x[i].clone(), y[i]))
                .unzip();
            heads.push(topics::accuracy(
                &topics::fit_from(&tx, &ty, names, cfg, prior)?,
                &vx,
                &vy,
            ));
            if let Some(p) = prior {
                let pool: Vec<&[f32]> = even
                    .iter()
                    .filter(|&&i| !picked[i])
                    .map(|&i| x[i].as_slice())
                    .collect();
                let labelled: Vec<(&[f32], usize)> = tx
                    .iter()
                    .map(Vec::as_slice)
                    .zip(ty.iter().copied())
                    .collect();
                let r = zs::refine_with_examples(p, &pool, &labelled, zs::REFINE_ROUNDS);
                refined.push(topics::accuracy(&prototypes(&r), &vx, &vy));
                semi.push(topics::accuracy(
                    &topics::fit_from(&tx, &ty, names, cfg, Some(&r))?,
                    &vx,
                    &vy,
                ));
                let pooled =
                    std::sync::Arc::new(pool.iter().map(|v| v.to_vec()).collect::<Vec<_>>());
                memory.push(topics::accuracy(
                    &topics::memory_head_refined(names, r, pooled, &labelled),
                    &vx,
                    &vy,
                ));
            }
        }
        println!("{n:>3} per class: head {}", show(&heads));
        if prior.is_some() {
            println!(
                "               semi-supervised: refined prototypes {}, head from them {}, memory {}",
                show(&refined),
                show(&semi),
                show(&memory)
            );
        }
    }
    println!("({:.1}s fitting)", started.elapsed().as_secs_f64());
    Ok(())
}
