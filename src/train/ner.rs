//! Fine-tuning an encoder plus a linear token-classification head for NER, in candle.
//!
//! Data: CoNLL documents, tokenized as the server tokenizes text (words joined by spaces), so
//! training sees exactly the pieces serving sees. Every piece is labelled: the first piece of
//! a word carries the word's tag, later pieces `I-` of the same type (or `O`). Serving reads
//! raw text whose pre-tokenizer words need not match CoNLL's tokens ("U.S." is four pieces in
//! both, but one CoNLL word), so a tag on every piece is what lets decoding work on pieces.
//!
//! Consecutive sentences of a document are packed into chunks of a random length up to the
//! window size each epoch, so the model learns to use document context, as it will see it in
//! an article.

use super::conll::{self, Document};
use super::score::Scorer;
use crate::model::encoder::seed_dropout;
use crate::model::heads::mean_pool;
use crate::model::{
    EncoderInput, Mode, ModelConfig, ModelDir, Precision, SentenceEmbedder, TokenClassifier,
};
use crate::pipeline::batch::{encode_rows, Row};
use crate::pipeline::{self, entities::TagSet, tokens, Specials};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Settings of one training run (the `tidings train ner` flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NerTrainConfig {
    /// Base encoder directory (HF format), e.g. `models/minilm`.
    pub base: PathBuf,
    /// CoNLL training file.
    pub train: PathBuf,
    /// CoNLL dev file, scored after every epoch; the best epoch is kept.
    pub dev: Option<PathBuf>,
    /// Output model directory.
    pub out: PathBuf,
    /// Passes over the training data.
    pub epochs: usize,
    /// Chunks per optimizer step.
    pub batch: usize,
    /// Peak learning rate of the encoder.
    pub lr: f64,
    /// Peak learning rate of the head and the casing embedding (new, randomly initialised).
    pub head_lr: f64,
    /// Fraction of steps of linear warm-up (then linear decay to 0).
    pub warmup: f64,
    /// Dropout on hidden states.
    pub dropout: f32,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of shuffling, chunking, dropout and head initialisation.
    pub seed: u64,
    /// Longest chunk in pieces (special tokens excluded).
    pub max_pieces: usize,
    /// Stop after this many optimizer steps (for smoke tests); 0 = no limit.
    pub max_steps: usize,
    /// Use only the first N training documents; 0 = all.
    pub limit_docs: usize,
    /// Add a word-shape embedding so the uncased encoder sees capitals.
    pub casing: bool,
    /// Continue from `out/checkpoints` if present, mid-epoch included.
    pub resume: bool,
    /// Minutes between checkpoints within an epoch (one is always written at each epoch's
    /// end); 0 = at epoch ends only.
    #[serde(default = "default_checkpoint_minutes")]
    pub checkpoint_minutes: f64,
    /// Save the shipped weights in f16 (half the size) instead of f32.
    pub f16: bool,
    /// Weight of the distillation loss that keeps the encoder's mean-pooled states close to
    /// the base encoder's sentence embeddings (`1 - cosine`, averaged over chunks), so the
    /// model also serves topics; 0 = a NER-only model.
    #[serde(default)]
    pub distill: f64,
    /// Fraction of chunks shown with their word shapes changed as if the text were all upper
    /// case (half of them) or all lower case (the other half), so the model does not lean on
    /// capitals alone. Labels are unchanged.
    #[serde(default)]
    pub case_augment: f64,
    /// Probability that each entity mention of a chunk is swapped for another mention of the
    /// same type drawn from the training set (its pieces, word shapes and tags), so the model
    /// learns entities from their context rather than by heart. 0 = off.
    #[serde(default)]
    pub entity_replace: f64,
    /// Decay of an exponential moving average of the weights, updated after every step; at
    /// each epoch's end the average is scored on dev too and kept when it scores better.
    /// 0 = off.
    #[serde(default)]
    pub ema: f64,
    /// Rank of low-rank adapters (LoRA) trained on every dense layer of a frozen base, saved
    /// alone as an adapter over `base` (see [`super::adapter`]); 0 = every weight trains and
    /// the whole model is saved.
    #[serde(default)]
    pub adapter_rank: usize,
    /// LoRA's alpha (the adapters' products are scaled by alpha / rank); 0 = twice the rank.
    #[serde(default)]
    pub adapter_alpha: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NerTrainReport {
    /// Settings used.
    pub config: NerTrainConfig,
    /// Loss and dev F1 after each epoch.
    pub epochs: Vec<EpochReport>,
    /// The epoch kept (1-based).
    pub best_epoch: usize,
    /// Its dev F1.
    pub best_f1: f64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Dev entity F1 (strict), if a dev file was given.
    pub dev_f1: Option<f64>,
    /// Training pieces per second.
    pub tokens_per_s: f64,
    /// Seconds the epoch took (training and evaluation).
    pub seconds: f64,
    /// Mean cosine between the model's pooled chunk embeddings and the base encoder's, when
    /// distilling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_cosine: Option<f64>,
    /// Dev entity F1 of the moving average of the weights, when `ema` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_dev_f1: Option<f64>,
    /// Whether the weights saved for this epoch (if it was the best) were the average.
    #[serde(default)]
    pub kept_ema: bool,
}

fn default_checkpoint_minutes() -> f64 {
    10.0
}

/// Checkpoint bookkeeping, saved beside the checkpoint weights.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CheckpointState {
    epochs_done: usize,
    step: usize,
    /// Batches of epoch `epochs_done + 1` already trained (a checkpoint within an epoch).
    #[serde(default)]
    batches_done: usize,
    /// That partial epoch's running figures: loss sum, steps, pieces, distillation cosine
    /// sum, and seconds of training.
    #[serde(default)]
    partial: (f64, usize, usize, f64, f64),
    best_f1: f64,
    best_epoch: usize,
    history: Vec<EpochReport>,
    /// The `--ema` decay the run's saved average (`ema.safetensors`) was kept with; 0 = none.
    #[serde(default)]
    ema: f64,
}

/// A document ready for training: pieces, their labels and sentence boundaries.
struct Prepared {
    ids: Vec<u32>,
    casing: Vec<u32>,
    labels: Vec<u32>,
    /// Piece index where each sentence starts, plus the total at the end.
    sentence_starts: Vec<usize>,
}

/// The tag set for entity types `types`: `O`, then `B-T`, `I-T` for each type.
pub fn tag_names(types: &[String]) -> Vec<String> {
    let mut out = vec!["O".to_string()];
    for t in types {
        out.push(format!("B-{t}"));
        out.push(format!("I-{t}"));
    }
    out
}

/// Piece labels of a document, given the tag names (`O`, `B-X`, `I-X`...).
fn prepare(doc: &Document, dir: &ModelDir, names: &[String]) -> Result<Prepared> {
    let (text, words, _) = doc.text();
    let toks = tokens::tokenize(&dir.tokenizer, &text)?;
    // IOB2 tag per word, from the spans (so IOB1 input is read right).
    let mut word_tags = vec!["O".to_string(); words.len()];
    let mut first_word = 0;
    let mut sentence_first_word = Vec::new();
    for s in &doc.sentences {
        sentence_first_word.push(first_word);
        for (a, b, ty) in conll::tag_spans(&s.tags) {
            word_tags[first_word + a] = format!("B-{ty}");
            for t in &mut word_tags[first_word + a + 1..first_word + b] {
                *t = format!("I-{ty}");
            }
        }
        first_word += s.words.len();
    }
    let index = |name: &str| -> Result<u32> {
        names
            .iter()
            .position(|n| n == name)
            .map(|i| i as u32)
            .with_context(|| format!("tag {name} is not in the tag set"))
    };
    let mut labels = Vec::with_capacity(toks.len());
    let mut piece_word = Vec::with_capacity(toks.len());
    let mut prev_word = usize::MAX;
    for &(s, _) in &toks.offsets {
        let w = words.partition_point(|&(ws, _)| ws <= s).saturating_sub(1);
        let tag = &word_tags[w];
        let label = if w != prev_word {
            tag.clone()
        } else {
            match tag.split_once('-') {
                Some((_, ty)) => format!("I-{ty}"),
                None => "O".to_string(),
            }
        };
        labels.push(index(&label)?);
        piece_word.push(w);
        prev_word = w;
    }
    let mut sentence_starts: Vec<usize> = sentence_first_word
        .iter()
        .map(|&fw| piece_word.partition_point(|&w| w < fw))
        .collect();
    sentence_starts.push(toks.len());
    Ok(Prepared {
        ids: toks.ids,
        casing: toks.casing,
        labels,
        sentence_starts,
    })
}

/// Packs a document's sentences into chunks `(start, end)` of at most `max` pieces, each
/// about as long as the next value `target` gives; a sentence longer than `max` is cut.
fn chunks(p: &Prepared, max: usize, mut target: impl FnMut() -> usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut goal = target();
    for w in p.sentence_starts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if e - start > goal && s > start {
            out.push((start, s));
            start = s;
            goal = target();
        }
        while e - start > max {
            out.push((start, start + max));
            start += max;
        }
    }
    let end = *p.sentence_starts.last().unwrap_or(&0);
    if end > start {
        out.push((start, end));
    }
    out
}

/// The word shapes of `casing` as they would be if the text were all upper case (`upper`) or
/// all lower case. A one-letter piece upper-cased is `TITLE`, which this cannot tell from
/// the shape alone; it becomes `UPPER` like the rest.
fn recase(casing: &[u32], upper: bool) -> Vec<u32> {
    use crate::pipeline::casing::{LOWER, MIXED, TITLE, UPPER};
    casing
        .iter()
        .map(|&c| match c {
            LOWER | TITLE | UPPER | MIXED => {
                if upper {
                    UPPER
                } else {
                    LOWER
                }
            }
            other => other,
        })
        .collect()
}

/// Every distinct entity mention of the training set, by tag index of its `B-` tag: pieces,
/// word shapes, and tags (B- then I-), as they occur in text.
#[derive(Default)]
struct Mentions {
    by_type: std::collections::HashMap<u32, Vec<Pieces>>,
}

/// Pieces, their word shapes and their tags: a mention, or a training chunk.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
struct Pieces {
    ids: Vec<u32>,
    casing: Vec<u32>,
    labels: Vec<u32>,
}

impl Pieces {
    /// Appends pieces `range` of document `p`.
    fn extend_from(&mut self, p: &Prepared, range: std::ops::Range<usize>) {
        self.ids.extend_from_slice(&p.ids[range.clone()]);
        self.casing.extend_from_slice(&p.casing[range.clone()]);
        self.labels.extend_from_slice(&p.labels[range]);
    }

    /// Appends `other`.
    fn extend(&mut self, other: &Pieces) {
        self.ids.extend_from_slice(&other.ids);
        self.casing.extend_from_slice(&other.casing);
        self.labels.extend_from_slice(&other.labels);
    }

    /// Keeps the first `n` pieces.
    fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.casing.truncate(n);
        self.labels.truncate(n);
    }
}

/// The mentions of a document as `(start, end, b_tag)` piece ranges: a `B-X` piece and the
/// `I-X` pieces after it. `is_begin(l)` says whether tag `l` is a `B-` tag (its `I-` tag is
/// `l + 1`).
fn mention_spans(labels: &[u32], is_begin: impl Fn(u32) -> bool) -> Vec<(usize, usize, u32)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        let l = labels[i];
        if is_begin(l) {
            let mut j = i + 1;
            while j < labels.len() && labels[j] == l + 1 {
                j += 1;
            }
            out.push((i, j, l));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

impl Mentions {
    fn collect(docs: &[Prepared], is_begin: impl Fn(u32) -> bool + Copy) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut m = Mentions::default();
        for p in docs {
            for (a, b, ty) in mention_spans(&p.labels, is_begin) {
                let mut mention = Pieces::default();
                mention.extend_from(p, a..b);
                if seen.insert(mention.clone()) {
                    m.by_type.entry(ty).or_default().push(mention);
                }
            }
        }
        m
    }
}

/// Chunk `s..e` of `p`, each mention swapped with probability `prob` for a random mention of
/// the same type, and cut to `max` pieces.
fn replace_entities(
    p: &Prepared,
    (s, e): (usize, usize),
    mentions: &Mentions,
    prob: f64,
    max: usize,
    is_begin: impl Fn(u32) -> bool,
    rng: &mut impl Rng,
) -> Pieces {
    let mut c = Pieces::default();
    let mut at = s;
    let spans = if prob > 0.0 {
        mention_spans(&p.labels[s..e], is_begin)
    } else {
        Vec::new()
    };
    for (a, b, ty) in spans {
        let pool = match mentions.by_type.get(&ty) {
            Some(pool) if rng.random::<f64>() < prob => pool,
            _ => continue,
        };
        // Another mention than the one there (it is in the pool too), when the type has one.
        let here = &p.ids[s + a..s + b];
        let mut m = &pool[rng.random_range(0..pool.len())];
        for _ in 0..3 {
            if m.ids != here {
                break;
            }
            m = &pool[rng.random_range(0..pool.len())];
        }
        c.extend_from(p, at..s + a);
        c.extend(m);
        at = s + b;
    }
    c.extend_from(p, at..e);
    c.truncate(max);
    c
}

/// An exponential moving average of the trainable weights.
struct Ema {
    decay: f64,
    updates: usize,
    avg: Vec<Tensor>,
}

impl Ema {
    fn new(decay: f64, vars: &[Var]) -> Result<Self> {
        Ok(Ema {
            decay,
            updates: 0,
            avg: vars
                .iter()
                .map(|v| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Folds the current weights in. The decay ramps up over the first steps
    /// (`min(decay, (1 + n) / (10 + n))`), so the start's random head fades fast. Vars without
    /// a gradient in `grads` (the frozen word-piece table, half the weights) were not updated
    /// and equal their average already: they are skipped.
    fn update(&mut self, vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.updates += 1;
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        for (a, v) in self.avg.iter_mut().zip(vars) {
            if grads.get(v).is_none() {
                continue;
            }
            // Detached: an op recorded for backprop would keep every earlier average alive.
            *a = (a.affine(d, 0.0)? + v.as_tensor().detach().affine(1.0 - d, 0.0)?)?.detach();
        }
        Ok(())
    }

    /// Runs `f` with the average in `vars` (and so in every model built on them), then puts
    /// the weights back, whether `f` succeeded or not.
    fn with_average<T>(&self, vars: &[Var], f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut raw = Vec::with_capacity(vars.len());
        for (a, v) in self.avg.iter().zip(vars) {
            raw.push(v.as_tensor().copy()?);
            v.set(a)?;
        }
        let out = f();
        for (v, w) in vars.iter().zip(&raw) {
            v.set(w)?;
        }
        out
    }
}

/// Scores a token-classification model on CoNLL documents through the serving pipeline:
/// document text -> pieces -> windows -> tag probabilities -> BIO decoding -> char spans,
/// compared with the gold spans strictly.
pub fn evaluate(
    model: &TokenClassifier,
    dir: &ModelDir,
    docs: &[Document],
    window: pipeline::WindowSpec,
    device: &Device,
) -> Result<Scorer> {
    let sp = Specials::of(dir)?;
    let tags = TagSet::new(model.labels());
    let mut scorer = Scorer::default();
    for doc in docs {
        let (text, _, gold) = doc.text();
        let mentions =
            pipeline::entities_of_text(model, &dir.tokenizer, &text, &tags, sp, window, device)?;
        let pred: Vec<conll::Span> = mentions
            .into_iter()
            .map(|m| (m.byte_start as usize, m.byte_end as usize, m.label))
            .collect();
        scorer.add(&gold, &pred);
    }
    Ok(scorer)
}

/// Where a token-classification checkpoint of this architecture keeps its encoder, and the
/// class transformers loads it with: a model Tidings trains is read by transformers too.
fn hf_layout(model_type: &str) -> (&'static str, &'static str) {
    match model_type {
        "mpnet" => ("mpnet", "MPNetForTokenClassification"),
        // The BERT-named layout, which every other family Tidings reads shares.
        _ => ("bert", "BertForTokenClassification"),
    }
}

/// Writes an HF-format model directory: config.json, tokenizer.json, model.safetensors.
fn save_model(
    varmap: &VarMap,
    base: &ModelDir,
    cfg: &ModelConfig,
    out: &Path,
    f16: bool,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let dtype = if f16 { DType::F16 } else { DType::F32 };
    let tensors = data
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let tmp = out.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let mut json = serde_json::to_value(cfg)?;
    json["architectures"] = serde_json::json!([hf_layout(&cfg.model_type).1]);
    json["torch_dtype"] = serde_json::json!(if f16 { "float16" } else { "float32" });
    let label2id: serde_json::Map<String, serde_json::Value> = cfg
        .labels()
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), serde_json::json!(i)))
        .collect();
    json["label2id"] = serde_json::Value::Object(label2id);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("tokenizer.json"), &base.tokenizer_json)?;
    Ok(())
}

fn global_norm(grads: &candle_core::backprop::GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(sum.sqrt())
}

/// Where a checkpoint lives: `OUT/checkpoints/current/` holds the weights
/// (`model.safetensors`), the weight average (`ema.safetensors`) and `state.json` together.
/// A new checkpoint is written whole into `next.tmp/` and then renamed into place, so a crash
/// at any moment leaves a complete checkpoint (`current/`, or `old/` between the two
/// renames).
struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    /// The newest complete checkpoint, if any (checkpoints of earlier Tidings versions, with
    /// the files directly in `dir`, included).
    fn latest(&self) -> Option<PathBuf> {
        [
            self.dir.join("current"),
            self.dir.join("old"),
            self.dir.clone(),
        ]
        .into_iter()
        .find(|d| d.join("state.json").is_file() && d.join("model.safetensors").is_file())
    }

    /// Writes a checkpoint atomically (see the type's doc).
    fn write(
        &self,
        varmap: &VarMap,
        ema: Option<(&Ema, &[String])>,
        state: &CheckpointState,
    ) -> Result<()> {
        let next = self.dir.join("next.tmp");
        let (current, old) = (self.dir.join("current"), self.dir.join("old"));
        if next.exists() {
            std::fs::remove_dir_all(&next)
                .with_context(|| format!("removing {}", next.display()))?;
        }
        std::fs::create_dir_all(&next).with_context(|| format!("creating {}", next.display()))?;
        varmap.save(next.join("model.safetensors"))?;
        if let Some((ema, names)) = ema {
            let avg: std::collections::HashMap<String, Tensor> =
                names.iter().cloned().zip(ema.avg.iter().cloned()).collect();
            candle_core::safetensors::save(&avg, next.join("ema.safetensors"))?;
        }
        std::fs::write(next.join("state.json"), serde_json::to_vec_pretty(state)?)?;
        // On disk before the renames make them the checkpoint (a power loss must not leave a
        // `current/` of truncated files).
        for entry in std::fs::read_dir(&next)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        // `old/` goes only while `current/` is there: after a crash between the two renames
        // below, `old/` is the only complete checkpoint until `next.tmp/` takes its place.
        if current.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&current, &old)?;
        }
        std::fs::rename(&next, &current)
            .with_context(|| format!("renaming {} into place", next.display()))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        // Files of the layout before `current/`, now stale.
        for f in ["model.safetensors", "ema.safetensors", "state.json"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        Ok(())
    }
}

/// Runs a training job; returns its report. Prints a progress bar to stderr (a line a
/// minute when stderr is not a terminal, e.g. a run in the background).
pub fn train(cfg: &NerTrainConfig) -> Result<NerTrainReport> {
    let started = Instant::now();
    let mut t = Trainer::new(cfg)?;
    for epoch in t.state.epochs_done..cfg.epochs {
        if t.steps_spent() {
            break;
        }
        let totals = t.epoch(epoch)?;
        t.evaluate_and_checkpoint(epoch, totals)?;
    }
    let report = NerTrainReport {
        config: cfg.clone(),
        epochs: t.state.history.clone(),
        best_epoch: t.state.best_epoch,
        best_f1: t.state.best_f1,
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::write(
        cfg.out.join("train_report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}

/// Refuses settings out of their range before any work.
fn check_flags(cfg: &NerTrainConfig) -> Result<()> {
    if !(0.0..1.0).contains(&cfg.ema) {
        bail!("--ema must be in [0, 1), got {}", cfg.ema);
    }
    for (flag, p) in [
        ("--entity-replace", cfg.entity_replace),
        ("--case-augment", cfg.case_augment),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{flag} is a probability, got {p}");
        }
    }
    Ok(())
}

/// The run's tag names (BIO over the entity types of `train_docs`) and the model's config:
/// `base`'s with those labels and the run's casing and shared-encoder settings.
fn tagged_config(
    base: &ModelDir,
    train_docs: &[Document],
    cfg: &NerTrainConfig,
) -> Result<(Vec<String>, ModelConfig)> {
    let mut types: Vec<String> = train_docs
        .iter()
        .flat_map(|d| d.tags())
        .filter_map(|t| t.split_once('-').map(|(_, ty)| ty.to_string()))
        .collect();
    types.sort();
    types.dedup();
    if types.is_empty() {
        bail!("{}: no entity tags found", cfg.train.display());
    }
    let names = tag_names(&types);
    let mut model_cfg = base.config.clone();
    model_cfg.id2label = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), n.clone()))
        .collect();
    model_cfg.tidings_casing = cfg.casing;
    model_cfg.tidings_shared_encoder = cfg.distill > 0.0;
    // A projection belongs to the weights it was fitted on: a model trained from a base that
    // has one gets none until `tidings train projection` fits its own.
    model_cfg.tidings_topic_projection = false;
    model_cfg.extra.remove("label2id");
    model_cfg.tidings_adapter = if cfg.adapter_rank > 0 {
        let (prefix, _) = hf_layout(&model_cfg.model_type);
        Some(super::adapter::config_for(
            base,
            &cfg.out,
            prefix,
            cfg.adapter_rank,
            cfg.adapter_alpha,
        )?)
    } else {
        None
    };
    Ok((names, model_cfg))
}

/// Fills `varmap` for a fresh run: the encoder's tensors from `base` (under `enc_prefix`), a
/// zero casing embedding when the model has one, and a small random head, drawn from a
/// generator seeded with `seed`.
fn init_from_base(
    varmap: &mut VarMap,
    base: &ModelDir,
    enc_prefix: &str,
    model_cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let device = device.clone();
    let mut loaded = 0;
    for (bare, t) in base.encoder_tensors(&device)? {
        let target = format!("{enc_prefix}.{bare}");
        if varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&target)
        {
            varmap.set_one(&target, t.to_dtype(DType::F32)?)?;
            loaded += 1;
        }
    }
    if model_cfg.tidings_casing {
        let name = format!("{enc_prefix}.embeddings.casing_embeddings.weight");
        let shape = varmap.data().lock().unwrap_or_else(|e| e.into_inner())[&name]
            .shape()
            .clone();
        varmap.set_one(&name, Tensor::zeros(shape, DType::F32, &device)?)?;
    }
    // Small random head, seeded.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = model_cfg.id2label.len();
    let h = model_cfg.hidden_size;
    let w: Vec<f32> = (0..n * h)
        .map(|_| (rng.random::<f32>() - 0.5) * 0.04)
        .collect();
    varmap.set_one("classifier.weight", Tensor::from_vec(w, (n, h), &device)?)?;
    varmap.set_one("classifier.bias", Tensor::zeros(n, DType::F32, &device)?)?;
    let adapters = varmap
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .filter(|k| super::adapter::is_adapter(k))
        .count();
    let expected = varmap.all_vars().len() - 2 - usize::from(model_cfg.tidings_casing) - adapters;
    if loaded != expected {
        bail!(
            "loaded {loaded} of {expected} encoder tensors from {}",
            base.dir.display()
        );
    }
    Ok(())
}

/// The run's vars in two groups (encoder; head and casing embedding, which get their own
/// learning rate) and the names of both, in that order.
fn split_vars(varmap: &VarMap) -> (Vec<Var>, Vec<Var>, Vec<String>) {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut enc = Vec::new();
    let mut head = Vec::new();
    for (name, var) in data.iter() {
        if name.starts_with("classifier") || name.contains("casing_embeddings") {
            head.push((name.clone(), var.clone()));
        } else {
            enc.push((name.clone(), var.clone()));
        }
    }
    let names = enc.iter().chain(&head).map(|(n, _)| n.clone()).collect();
    (
        enc.into_iter().map(|(_, v)| v).collect(),
        head.into_iter().map(|(_, v)| v).collect(),
        names,
    )
}

/// What a run trains on and for, as [`read_data`] reads it.
struct RunData {
    /// BIO tag names, by label id.
    names: Vec<String>,
    /// The model's config (see [`tagged_config`]).
    model_cfg: ModelConfig,
    /// The training documents, prepared.
    prepared: Vec<Prepared>,
    /// The dev documents (none without `--dev`).
    dev_docs: Vec<Document>,
}

/// Reads the training file (its first `--limit-docs` documents) and the dev file, and
/// derives the tag names and model config from the training documents.
fn read_data(cfg: &NerTrainConfig, base: &ModelDir) -> Result<RunData> {
    let mut train_docs = conll::read(&cfg.train)?;
    if cfg.limit_docs > 0 {
        train_docs.truncate(cfg.limit_docs);
    }
    let dev_docs = match &cfg.dev {
        Some(p) => conll::read(p)?,
        None => Vec::new(),
    };
    let (names, model_cfg) = tagged_config(base, &train_docs, cfg)?;
    let prepared = train_docs
        .iter()
        .map(|d| prepare(d, base, &names))
        .collect::<Result<Vec<_>>>()?;
    Ok(RunData {
        names,
        model_cfg,
        prepared,
        dev_docs,
    })
}

/// A token classifier on `varmap`'s vars (creating those it lacks) and the `frozen` tensors
/// (an adapter run's base; none otherwise), laid out as `enc_prefix`.
fn classifier(
    varmap: &VarMap,
    frozen: &Arc<HashMap<String, Tensor>>,
    enc_prefix: &str,
    model_cfg: &ModelConfig,
    device: &Device,
) -> Result<TokenClassifier> {
    let vb = super::adapter::var_builder(varmap, frozen, device);
    let model = TokenClassifier::from_var_builder(vb, enc_prefix, model_cfg)?;
    Ok(model)
}

/// The frozen base encoder, on the fused inference path: the distillation targets (none
/// without `--distill`).
fn load_teacher(
    cfg: &NerTrainConfig,
    base: &ModelDir,
    device: &Device,
) -> Result<Option<SentenceEmbedder>> {
    Ok(if cfg.distill > 0.0 {
        Some(SentenceEmbedder::load_with(base, device, Precision::F32)?)
    } else {
        None
    })
}

/// Fills `varmap` (the model's vars) as the run starts and returns the run's bookkeeping so
/// far: the weights of checkpoint `resume_from` when there is one (saying so on stderr),
/// else those of `base` and a fresh head seeded with `--seed` (see [`init_from_base`]).
fn start_weights(
    varmap: &mut VarMap,
    resume_from: Option<&Path>,
    base: &ModelDir,
    model_cfg: &ModelConfig,
    cfg: &NerTrainConfig,
    device: &Device,
) -> Result<CheckpointState> {
    let Some(dir) = resume_from else {
        let (enc_prefix, _) = hf_layout(&model_cfg.model_type);
        init_from_base(varmap, base, enc_prefix, model_cfg, cfg.seed, device)?;
        return Ok(CheckpointState::default());
    };
    varmap.load(dir.join("model.safetensors"))?;
    let state: CheckpointState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    eprintln!(
        "resuming from {} after epoch {} and {} batches of the next (step {}, best dev F1 \
         {:.4})",
        dir.display(),
        state.epochs_done,
        state.batches_done,
        state.step,
        state.best_f1
    );
    Ok(state)
}

/// The moving average of the weights with `--ema`, else none: the one saved with the
/// checkpoint `resume_from` when the run resumes after a step (refused if it was kept with
/// another decay), else the weights as they stand.
fn weight_average(
    cfg: &NerTrainConfig,
    all_vars: &[Var],
    var_names: &[String],
    resume_from: Option<&Path>,
    state: &CheckpointState,
    device: &Device,
) -> Result<Option<Ema>> {
    // `check_flags` keeps `--ema` in [0, 1).
    if cfg.ema <= 0.0 {
        return Ok(None);
    }
    let mut ema = Ema::new(cfg.ema, all_vars)?;
    let Some(ckpt_dir) = resume_from.filter(|_| state.step > 0) else {
        return Ok(Some(ema));
    };
    let path = ckpt_dir.join("ema.safetensors");
    if state.ema != cfg.ema || !path.is_file() {
        bail!(
            "{}: the checkpoint kept a weight average with decay {} (0 = none), this run asks \
             for {}; resume with the same --ema",
            ckpt_dir.display(),
            state.ema,
            cfg.ema
        );
    }
    let mut saved = candle_core::safetensors::load(&path, device)?;
    for (a, name) in ema.avg.iter_mut().zip(var_names) {
        *a = saved
            .remove(name)
            .with_context(|| format!("{}: no {name}", path.display()))?
            .detach();
    }
    ema.updates = state.step;
    Ok(Some(ema))
}

/// AdamW for the encoder's vars and for the head's, each at its peak learning rate (the
/// schedule sets the rate of every step), with `--weight-decay`.
fn optimizers(
    cfg: &NerTrainConfig,
    enc_vars: Vec<Var>,
    head_vars: Vec<Var>,
) -> Result<(AdamW, AdamW)> {
    let params = |lr| ParamsAdamW {
        lr,
        weight_decay: cfg.weight_decay,
        ..ParamsAdamW::default()
    };
    let opt_enc = AdamW::new(enc_vars, params(cfg.lr))?;
    let opt_head = AdamW::new(head_vars, params(cfg.head_lr))?;
    Ok((opt_enc, opt_head))
}

/// The run's optimizer steps: an epoch's (estimated with chunks of two thirds of
/// `max_pieces`, as no chunk lengths are drawn yet), the whole run's (capped by
/// `--max-steps`), and the warm-up's.
fn step_counts(
    cfg: &NerTrainConfig,
    prepared: &[Prepared],
    max_pieces: usize,
) -> (usize, usize, usize) {
    let est_chunks: usize = prepared
        .iter()
        .map(|p| chunks(p, max_pieces, || (max_pieces * 2 / 3).max(1)).len())
        .sum();
    let steps_per_epoch = est_chunks.div_ceil(cfg.batch.max(1));
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps.min(steps_per_epoch * cfg.epochs)
    } else {
        steps_per_epoch * cfg.epochs
    };
    let warmup_steps = ((total_steps as f64) * cfg.warmup).ceil().max(1.0) as usize;
    (steps_per_epoch, total_steps, warmup_steps)
}

/// Scales the gradients of `vars` in `grads` down so that their global norm is at most
/// `clip`.
fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    clip: f64,
) -> Result<()> {
    let norm = global_norm(grads, vars)?;
    if norm > clip {
        let scale = clip / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(())
}

/// The progress bar of epoch `epoch` (0-based) of `epochs`, `len` batches long.
fn progress_bar(len: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

/// One training run's model, optimizers, data and bookkeeping: built (or resumed) by
/// [`Trainer::new`], then an [`Trainer::epoch`] of [`Trainer::step`]s and an
/// [`Trainer::evaluate_and_checkpoint`] at a time.
struct Trainer<'a> {
    cfg: &'a NerTrainConfig,
    device: Device,
    base: ModelDir,
    dev_docs: Vec<Document>,
    /// BIO tag names, by label id.
    names: Vec<String>,
    model_cfg: ModelConfig,
    max_pieces: usize,
    prepared: Vec<Prepared>,
    varmap: VarMap,
    model: TokenClassifier,
    /// The same vars, for scoring dev.
    eval_model: TokenClassifier,
    /// The frozen base encoder, on the fused inference path: the distillation targets.
    teacher: Option<SentenceEmbedder>,
    checkpoints: Checkpoints,
    state: CheckpointState,
    all_vars: Vec<Var>,
    var_names: Vec<String>,
    ema: Option<Ema>,
    mentions: Mentions,
    opt_enc: AdamW,
    opt_head: AdamW,
    /// `[CLS]`, `[SEP]` and padding ids.
    specials: (u32, u32, u32),
    total_steps: usize,
    warmup_steps: usize,
    window: pipeline::WindowSpec,
    step: usize,
    /// `--profile` (TIDINGS_PROFILE=1): print the time of each step's forward, backward and
    /// update.
    profile: bool,
}

/// One optimizer step's figures.
struct StepOutcome {
    /// NER loss.
    loss: f64,
    /// Tagged pieces.
    pieces: usize,
    /// Cosine to the teacher, when distilling.
    cosine: f64,
}

/// An epoch's running totals (carried across a mid-epoch checkpoint).
struct EpochTotals {
    loss_sum: f64,
    loss_n: usize,
    pieces_seen: usize,
    cos_sum: f64,
    /// Seconds of training so far, before this process's share.
    earlier_seconds: f64,
    /// When this process started on the epoch.
    started: Instant,
}

impl EpochTotals {
    /// Totals carried over from a checkpoint's [`EpochTotals::partial`] figures, this process
    /// starting on the epoch now.
    fn resumed(partial: (f64, usize, usize, f64, f64)) -> Self {
        EpochTotals {
            loss_sum: partial.0,
            loss_n: partial.1,
            pieces_seen: partial.2,
            cos_sum: partial.3,
            earlier_seconds: partial.4,
            started: Instant::now(),
        }
    }

    /// Adds one optimizer step's figures.
    fn add(&mut self, o: &StepOutcome) {
        self.loss_sum += o.loss;
        self.loss_n += 1;
        self.pieces_seen += o.pieces;
        self.cos_sum += o.cosine;
    }

    /// Training pieces per second so far.
    fn tokens_per_s(&self) -> f64 {
        self.pieces_seen as f64 / self.trained_for().max(1e-9)
    }

    fn trained_for(&self) -> f64 {
        self.earlier_seconds + self.started.elapsed().as_secs_f64()
    }

    fn partial(&self) -> (f64, usize, usize, f64, f64) {
        (
            self.loss_sum,
            self.loss_n,
            self.pieces_seen,
            self.cos_sum,
            self.trained_for(),
        )
    }
}

impl<'a> Trainer<'a> {
    /// Reads the data, builds the model from `cfg.base` (or the last checkpoint with
    /// `cfg.resume`), its optimizers and the weight average.
    fn new(cfg: &'a NerTrainConfig) -> Result<Self> {
        check_flags(cfg)?;
        let device = Device::Cpu;
        let base = ModelDir::open(&cfg.base)?;
        let RunData {
            names,
            model_cfg,
            prepared,
            dev_docs,
        } = read_data(cfg, &base)?;
        let max_pieces = cfg.max_pieces.min(model_cfg.max_tokens() - 2);

        // Model with all weights as trainable vars.
        let mut varmap = VarMap::new();
        seed_dropout(cfg.seed);
        let (enc_prefix, _) = hf_layout(&model_cfg.model_type);
        let frozen = match &model_cfg.tidings_adapter {
            Some(a) => {
                let added = super::adapter::add_adapters(
                    &mut varmap,
                    &model_cfg,
                    enc_prefix,
                    a.rank,
                    cfg.seed,
                    &device,
                )?;
                eprintln!(
                    "training {added} adapter tensors of rank {} (alpha {}) on a frozen {}",
                    a.rank,
                    a.alpha,
                    cfg.base.display()
                );
                super::adapter::frozen_base(&base, enc_prefix, &device)?
            }
            None => Arc::default(),
        };
        let model = classifier(&varmap, &frozen, enc_prefix, &model_cfg, &device)?;
        let teacher = load_teacher(cfg, &base, &device)?;
        let checkpoints = Checkpoints {
            dir: cfg.out.join("checkpoints"),
        };
        let resume_from = cfg.resume.then(|| checkpoints.latest()).flatten();
        let resume_from = resume_from.as_deref();
        let state = start_weights(&mut varmap, resume_from, &base, &model_cfg, cfg, &device)?;

        let (enc_vars, head_vars, var_names) = split_vars(&varmap);
        let all_vars: Vec<Var> = enc_vars.iter().chain(head_vars.iter()).cloned().collect();
        let ema = weight_average(cfg, &all_vars, &var_names, resume_from, &state, &device)?;
        let mentions = if cfg.entity_replace > 0.0 {
            Mentions::collect(&prepared, Self::is_begin(&names))
        } else {
            Mentions::default()
        };
        let (opt_enc, opt_head) = optimizers(cfg, enc_vars, head_vars)?;
        let (cls, sep) = base.special_ids()?;
        let pad = model_cfg.pad_token_id as u32;
        let (steps_per_epoch, total_steps, warmup_steps) = step_counts(cfg, &prepared, max_pieces);
        let window = pipeline::WindowSpec::default().fit(model_cfg.max_tokens());
        let eval_model = classifier(&varmap, &frozen, enc_prefix, &model_cfg, &device)?;
        eprintln!(
            "training on {} documents ({} pieces, ~{} steps/epoch), {} dev documents, tags {:?}",
            prepared.len(),
            prepared.iter().map(|p| p.ids.len()).sum::<usize>(),
            steps_per_epoch,
            dev_docs.len(),
            names
        );

        Ok(Trainer {
            cfg,
            device,
            base,
            dev_docs,
            names,
            model_cfg,
            max_pieces,
            prepared,
            varmap,
            model,
            eval_model,
            teacher,
            checkpoints,
            step: state.step,
            state,
            all_vars,
            var_names,
            ema,
            mentions,
            opt_enc,
            opt_head,
            specials: (cls, sep, pad),
            total_steps,
            warmup_steps,
            window,
            profile: crate::model::choices::profile(),
        })
    }

    /// Whether `--max-steps` is spent.
    fn steps_spent(&self) -> bool {
        self.cfg.max_steps > 0 && self.step >= self.cfg.max_steps
    }

    /// The learning-rate factor at `step`: linear warm-up, then linear decay to 0.
    fn schedule(&self, step: usize) -> f64 {
        let (total, warmup) = (self.total_steps, self.warmup_steps);
        if step < warmup {
            (step + 1) as f64 / warmup as f64
        } else {
            ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
        }
    }

    /// Whether label `l` begins a mention.
    fn is_begin(names: &[String]) -> impl Fn(u32) -> bool + Copy + '_ {
        move |l: u32| names[l as usize].starts_with("B-")
    }

    /// One epoch's passes over the training chunks (from a mid-epoch checkpoint on, when
    /// resuming), with progress on stderr and a checkpoint every `checkpoint_minutes`.
    fn epoch(&mut self, epoch: usize) -> Result<EpochTotals> {
        let cfg = self.cfg;
        // Re-seed per epoch so a resumed run draws the same chunks and masks.
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64 + 1));
        seed_dropout(cfg.seed.wrapping_add(1000 + epoch as u64));
        let all = self.epoch_chunks(&mut rng);
        let bar = progress_bar(all.len().div_ceil(cfg.batch) as u64, epoch, cfg.epochs);
        let (skip, mut t) = self.resume_point(epoch);
        bar.set_position(skip as u64);
        let (mut last_checkpoint, mut last_log) = (Instant::now(), Instant::now());
        let n_batches = all.len().div_ceil(cfg.batch.max(1));
        for (b, batch) in all.chunks(cfg.batch.max(1)).enumerate() {
            if b < skip {
                continue;
            }
            if self.steps_spent() {
                break;
            }
            let chunks = self.draw_chunks(batch, &mut rng);
            let o = self.step(&chunks)?;
            t.add(&o);
            let (loss, tps) = (t.loss_sum / t.loss_n as f64, t.tokens_per_s());
            let cos = if self.teacher.is_some() {
                format!(" cos {:.4}", t.cos_sum / t.loss_n as f64)
            } else {
                String::new()
            };
            bar.set_message(format!("loss {loss:.4}{cos} {tps:.0} tok/s"));
            bar.inc(1);
            if bar.is_hidden() && last_log.elapsed().as_secs() >= 60 {
                last_log = Instant::now();
                let per_batch = t.started.elapsed().as_secs_f64() / (b + 1 - skip) as f64;
                let figures = format!("loss {loss:.4}{cos}, {tps:.0} tok/s");
                self.log_progress(epoch, (b + 1, n_batches), per_batch, &figures);
            }
            let due = cfg.checkpoint_minutes > 0.0
                && last_checkpoint.elapsed().as_secs_f64() >= cfg.checkpoint_minutes * 60.0;
            if due && b + 1 < n_batches {
                last_checkpoint = Instant::now();
                self.checkpoint_within(epoch, (b + 1, n_batches), &t, &bar)?;
            }
        }
        bar.finish();
        Ok(t)
    }

    /// The epoch's training chunks as `(document, start, end)` spans: each document packed
    /// into chunks of lengths drawn from `rng` (a third of `max_pieces` to all of it), then
    /// all of them shuffled by `rng`.
    fn epoch_chunks(&self, rng: &mut rand::rngs::StdRng) -> Vec<(usize, usize, usize)> {
        let max_pieces = self.max_pieces;
        let lo = (max_pieces / 3).max(1);
        let mut all = Vec::new();
        for (d, p) in self.prepared.iter().enumerate() {
            let spans = chunks(p, max_pieces, || rng.random_range(lo..=max_pieces));
            all.extend(spans.into_iter().map(|(s, e)| (d, s, e)));
        }
        all.shuffle(rng);
        all
    }

    /// Where epoch `epoch` starts: the batches a checkpoint within it already trained, to
    /// skip, and its totals so far (none and zeros for an epoch not begun). The order of the
    /// batches is drawn from the epoch's seed, so it is the same; the random draws after the
    /// skip are not.
    fn resume_point(&self, epoch: usize) -> (usize, EpochTotals) {
        let (skip, partial) = if epoch == self.state.epochs_done && self.state.batches_done > 0 {
            (self.state.batches_done, self.state.partial)
        } else {
            (0, (0.0, 0, 0, 0.0, 0.0))
        };
        (skip, EpochTotals::resumed(partial))
    }

    /// Prints the line a minute that stands in for a hidden progress bar (no terminal): batch
    /// `done` of `n_batches` of epoch `epoch`, the running `figures`, and when the epoch and
    /// the run end at `per_batch` seconds a batch.
    fn log_progress(
        &self,
        epoch: usize,
        (done, n_batches): (usize, usize),
        per_batch: f64,
        figures: &str,
    ) {
        let cfg = self.cfg;
        let left = (n_batches - done) as f64 * per_batch;
        let later_epochs = (cfg.epochs - epoch - 1) as f64 * n_batches as f64 * per_batch;
        eprintln!(
            "epoch {}/{} batch {done}/{n_batches} step {}: {figures}; epoch ends in {:.0} min, \
             the run in {:.0} min (dev scoring not counted)",
            epoch + 1,
            cfg.epochs,
            self.step,
            left / 60.0,
            (left + later_epochs) / 60.0
        );
    }

    /// Writes a checkpoint within epoch `epoch`, after batch `done` of `n_batches`, with the
    /// epoch's totals `t` so far, and says so above the progress `bar` (or on stderr when the
    /// bar is hidden).
    fn checkpoint_within(
        &mut self,
        epoch: usize,
        (done, n_batches): (usize, usize),
        t: &EpochTotals,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        self.state.batches_done = done;
        self.state.partial = t.partial();
        self.checkpoint()?;
        let line = format!(
            "checkpoint: epoch {} batch {done}/{n_batches}, step {}",
            epoch + 1,
            self.step
        );
        // A hidden bar (no terminal) prints nothing of its own.
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        Ok(())
    }

    /// The training chunks of one batch of `(document, start, end)` spans, with entity
    /// replacement and case augmentation drawn from `rng`.
    fn draw_chunks(
        &self,
        batch: &[(usize, usize, usize)],
        rng: &mut rand::rngs::StdRng,
    ) -> Vec<Pieces> {
        let cfg = self.cfg;
        let is_begin = Self::is_begin(&self.names);
        batch
            .iter()
            .map(|&(d, s, e)| {
                let mut c = replace_entities(
                    &self.prepared[d],
                    (s, e),
                    &self.mentions,
                    cfg.entity_replace,
                    self.max_pieces,
                    is_begin,
                    rng,
                );
                if cfg.case_augment > 0.0 && rng.random::<f64>() < cfg.case_augment {
                    c.casing = recase(&c.casing, rng.random::<bool>());
                }
                c
            })
            .collect()
    }

    /// One optimizer step on `chunks`: forward, loss (plus distillation), backward, clip,
    /// AdamW on the encoder and on the head, the weight average.
    fn step(&mut self, chunks: &[Pieces]) -> Result<StepOutcome> {
        let (input, positions, targets) = self.batch_input(chunks)?;
        let n_pos = positions.len();
        let t0 = Instant::now();
        let (ner_loss, loss, cos) = self.losses(&input, positions, targets)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let mut grads = loss.backward()?;
        let t2 = Instant::now();
        clip_gradients(&mut grads, &self.all_vars, self.cfg.clip)?;
        self.update(&grads)?;
        self.step += 1;
        if self.profile {
            eprintln!(
                "fwd {:?} bwd {:?} opt {:?} n {}",
                t1 - t0,
                t2 - t1,
                t2.elapsed(),
                n_pos
            );
        }
        Ok(StepOutcome {
            loss: ner_loss.to_scalar::<f32>()? as f64,
            pieces: n_pos,
            cosine: cos,
        })
    }

    /// The encoder input of `chunks` (one row each, between `[CLS]` and `[SEP]`), and the
    /// tagged pieces: their positions in the flattened `[rows × sequence]` output, and their
    /// labels.
    fn batch_input(&self, chunks: &[Pieces]) -> Result<(EncoderInput, Vec<u32>, Vec<u32>)> {
        let (cls, sep, pad) = self.specials;
        let rows: Vec<Row> = chunks
            .iter()
            .map(|c| Row {
                ids: &c.ids,
                casing: &c.casing,
            })
            .collect();
        let input = encode_rows(&rows, cls, sep, pad, &self.device)?;
        let seq = input.input_ids.dim(1)?;
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (r, c) in chunks.iter().enumerate() {
            for (k, &l) in c.labels.iter().enumerate() {
                positions.push((r * seq + 1 + k) as u32);
                targets.push(l);
            }
        }
        Ok((input, positions, targets))
    }

    /// The training forward pass on `input` and its losses: the NER loss (cross-entropy of
    /// the outputs at `positions` against `targets`), the loss to minimise (the NER loss plus
    /// `--distill` times `1 - cosine` to the teacher, when distilling) and that cosine (0 when
    /// not distilling).
    fn losses(
        &self,
        input: &EncoderInput,
        positions: Vec<u32>,
        targets: Vec<u32>,
    ) -> Result<(Tensor, Tensor, f64)> {
        let cfg = self.cfg;
        let device = &self.device;
        let (rows, seq) = input.input_ids.dims2()?;
        let n_pos = positions.len();
        let (logits, hidden) = self.model.forward_with_hidden(
            input,
            Mode {
                train: true,
                dropout: cfg.dropout,
            },
        )?;
        let n_labels = self.names.len();
        let flat = logits.reshape((rows * seq, n_labels))?;
        let picked = flat.index_select(&Tensor::from_vec(positions, n_pos, device)?, 0)?;
        let targets = Tensor::from_vec(targets, n_pos, device)?;
        let ner_loss = candle_nn::loss::cross_entropy(&picked, &targets)?;
        let mut cos = 0.0;
        let loss = match &self.teacher {
            Some(teacher) => {
                let target = teacher.forward(input)?.detach();
                let pooled = mean_pool(&hidden, &input.attention_mask)?;
                let cosine = (pooled * target)?.sum(1)?.mean_all()?;
                cos = cosine.to_scalar::<f32>()? as f64;
                (&ner_loss + ((1.0 - cosine)? * cfg.distill)?)?
            }
            None => ner_loss.clone(),
        };
        Ok((ner_loss, loss, cos))
    }

    /// The optimizers' step on `grads` at this step's learning rates, then the weight
    /// average's.
    fn update(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let cfg = self.cfg;
        let f = self.schedule(self.step);
        self.opt_enc.set_learning_rate(cfg.lr * f);
        self.opt_head.set_learning_rate(cfg.head_lr * f);
        self.opt_enc.step(grads)?;
        self.opt_head.step(grads)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.all_vars, grads)?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the run as it stands.
    fn checkpoint(&mut self) -> Result<()> {
        self.state.step = self.step;
        self.state.ema = self.cfg.ema;
        let names = self.var_names.as_slice();
        self.checkpoints.write(
            &self.varmap,
            self.ema.as_ref().map(|e| (e, names)),
            &self.state,
        )
    }

    /// The end of an epoch: scores dev (the weights and their average), saves the model
    /// when the epoch is the best so far, and writes a checkpoint.
    fn evaluate_and_checkpoint(&mut self, epoch: usize, t: EpochTotals) -> Result<()> {
        let cfg = self.cfg;
        let tokens_per_s = t.tokens_per_s();
        let score_dev = || -> Result<Option<f64>> {
            if self.dev_docs.is_empty() {
                return Ok(None);
            }
            let scorer = evaluate(
                &self.eval_model,
                &self.base,
                &self.dev_docs,
                self.window,
                &self.device,
            )?;
            eprint!("{}", scorer.table());
            Ok(Some(scorer.overall().f1()))
        };
        let dev_f1 = score_dev()?;
        // The average's turn: swapped into the vars (which the eval model shares), scored, and
        // kept there only while saving it as the best epoch.
        let ema_dev_f1 = match &self.ema {
            Some(ema) => ema.with_average(&self.all_vars, score_dev)?,
            None => None,
        };
        let mut report = EpochReport {
            epoch: epoch + 1,
            loss: t.loss_sum / t.loss_n.max(1) as f64,
            dev_f1,
            tokens_per_s,
            seconds: t.started.elapsed().as_secs_f64(),
            distill_cosine: self
                .teacher
                .as_ref()
                .map(|_| t.cos_sum / t.loss_n.max(1) as f64),
            ema_dev_f1,
            kept_ema: false,
        };
        eprintln!(
            "epoch {}: loss {:.4}, dev F1 {} (average {}), distillation cosine {}, {:.0} tok/s, {:.0}s",
            report.epoch,
            report.loss,
            dev_f1.map_or("-".into(), |f| format!("{f:.4}")),
            ema_dev_f1.map_or("-".into(), |f| format!("{f:.4}")),
            report
                .distill_cosine
                .map_or("-".into(), |c| format!("{c:.4}")),
            report.tokens_per_s,
            report.seconds
        );
        let raw_score = dev_f1.unwrap_or(-report.loss);
        let (score, use_ema) = match ema_dev_f1 {
            Some(f) if f > raw_score => (f, true),
            _ => (raw_score, false),
        };
        if self.state.best_epoch == 0 || score > self.state.best_f1 {
            self.state.best_f1 = score;
            self.state.best_epoch = epoch + 1;
            report.kept_ema = use_ema;
            let save = || save_model(&self.varmap, &self.base, &self.model_cfg, &cfg.out, cfg.f16);
            match (&self.ema, use_ema) {
                (Some(ema), true) => ema.with_average(&self.all_vars, save)?,
                _ => save()?,
            }
        }
        self.state.history.push(report);
        self.state.epochs_done = epoch + 1;
        self.state.batches_done = 0;
        self.state.partial = Default::default();
        self.checkpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_pack_sentences_and_cut_long_ones() {
        let p = Prepared {
            ids: vec![0; 30],
            casing: vec![0; 30],
            labels: vec![0; 30],
            sentence_starts: vec![0, 5, 10, 28, 30],
        };
        assert_eq!(chunks(&p, 12, || 10), vec![(0, 10), (10, 22), (22, 30)]);
        assert_eq!(chunks(&p, 100, || 100), vec![(0, 30)]);
    }

    #[test]
    fn entity_replacement_swaps_whole_mentions_for_ones_of_the_same_type() {
        // Tags: O=0, B-LOC=1, I-LOC=2, B-PER=3, I-PER=4.
        let begin = |l: u32| l == 1 || l == 3;
        let p = Prepared {
            ids: vec![10, 11, 12, 13, 14, 15, 16],
            casing: vec![0, 1, 1, 0, 1, 0, 0],
            labels: vec![0, 1, 2, 0, 3, 0, 1],
            sentence_starts: vec![0, 7],
        };
        assert_eq!(
            mention_spans(&p.labels, begin),
            vec![(1, 3, 1), (4, 5, 3), (6, 7, 1)]
        );
        let mentions = Mentions::collect(std::slice::from_ref(&p), begin);
        assert_eq!(mentions.by_type[&1].len(), 2);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // Probability 0 keeps the chunk as it is.
        let same = replace_entities(&p, (0, 7), &mentions, 0.0, 100, begin, &mut rng);
        assert_eq!((same.ids, same.labels), (p.ids.clone(), p.labels.clone()));
        // Probability 1 swaps every mention for one of its type: text outside mentions and
        // the tag sequence's shape are kept.
        for _ in 0..20 {
            let c = replace_entities(&p, (0, 7), &mentions, 1.0, 100, begin, &mut rng);
            assert_eq!(c.ids.len(), c.labels.len());
            assert_eq!(c.ids.len(), c.casing.len());
            assert_eq!((c.ids[0], c.labels[0]), (10, 0));
            let spans = mention_spans(&c.labels, begin);
            assert_eq!(spans.iter().map(|s| s.2).collect::<Vec<_>>(), vec![1, 3, 1]);
            for (a, b, _) in spans {
                assert!([vec![11, 12], vec![16], vec![14]].contains(&c.ids[a..b].to_vec()));
            }
        }
        let cut = replace_entities(&p, (0, 7), &mentions, 1.0, 3, begin, &mut rng);
        assert_eq!(cut.ids.len(), 3);
    }

    #[test]
    fn checkpoints_are_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = Checkpoints {
            dir: tmp.path().join("checkpoints"),
        };
        assert!(ck.latest().is_none());
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints(3, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let mut state = CheckpointState {
            step: 1,
            ..Default::default()
        };
        ck.write(&varmap, None, &state).unwrap();
        state.step = 2;
        state.batches_done = 7;
        ck.write(&varmap, None, &state).unwrap();
        let read = |d: &std::path::Path| -> CheckpointState {
            serde_json::from_slice(&std::fs::read(d.join("state.json")).unwrap()).unwrap()
        };
        let latest = ck.latest().unwrap();
        assert_eq!(latest, ck.dir.join("current"));
        assert_eq!((read(&latest).step, read(&latest).batches_done), (2, 7));
        assert!(!ck.dir.join("next.tmp").exists() && !ck.dir.join("old").exists());
        // A crash while the next one is written leaves a partial next.tmp: ignored.
        std::fs::create_dir_all(ck.dir.join("next.tmp")).unwrap();
        std::fs::write(ck.dir.join("next.tmp/state.json"), b"{").unwrap();
        assert_eq!(ck.latest().unwrap(), ck.dir.join("current"));
        // A crash between the two renames: the previous one, in old/, is found.
        std::fs::rename(ck.dir.join("current"), ck.dir.join("old")).unwrap();
        assert_eq!(read(&ck.latest().unwrap()).step, 2);
        // And the next write cleans up after both.
        ck.write(&varmap, None, &state).unwrap();
        assert_eq!(ck.latest().unwrap(), ck.dir.join("current"));
        assert!(!ck.dir.join("next.tmp").exists() && !ck.dir.join("old").exists());
    }

    #[test]
    fn tag_names_are_bio() {
        assert_eq!(
            tag_names(&["LOC".into(), "PER".into()]),
            vec!["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
        );
    }
}
