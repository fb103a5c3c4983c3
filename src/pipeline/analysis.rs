//! One article end to end, split into the three steps the engine schedules: `prepare`
//! (tokenize once, cut windows), the model runs on rows (batched across articles by the
//! engine), and `finish` (merge windows, decode entities, score topics).

use super::entities::{self, Group, Mention, TagSet};
use super::tokens::{self, Tokens};
use super::topics::{self, Label};
use super::windows::{self, Window};
use super::{batch::Row, Specials, WindowSpec};
use crate::model::{ModelDir, Precision, SentenceEmbedder, TokenClassifier};
use candle_core::Device;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// What to compute for an article.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Run topic classification.
    pub topics: bool,
    /// Run entity recognition.
    pub entities: bool,
    /// Topics to return, best first; 0 = all.
    pub top_k: usize,
    /// Drop entities scoring below this.
    pub min_entity_score: f32,
    /// Entity types to keep; empty = all.
    pub entity_types: HashSet<String>,
    /// Score topics independently (multi-label) instead of a softmax over the labels.
    pub multi_label: bool,
    /// Score topics with this named trained head instead of the default labels.
    pub topic_head: Option<String>,
    /// Tag entities with the NER model of this name instead of the default one
    /// ([`NerModel::name`]).
    pub ner_model: Option<String>,
    /// Drop topics scoring below this.
    pub min_topic_score: f32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            topics: true,
            entities: true,
            top_k: 0,
            min_entity_score: 0.0,
            entity_types: HashSet::new(),
            multi_label: false,
            topic_head: None,
            ner_model: None,
            min_topic_score: 0.0,
        }
    }
}

/// Topic labels and how an article embedding is scored against them:
/// `softmax(scale * (weights . article) + bias)`, or, when the set has a [`topics::Memory`],
/// the vote of the article's nearest remembered articles.
///
/// Zero-shot labels have unit-length prototypes as weights, no bias and the calibrated
/// scale; a regression head (`tidings train topics`) has its own weights and bias and scale
/// 1; a memory head (`train topics --unlabelled`) has refined prototypes, no bias, the
/// zero-shot scale and a memory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelSet {
    /// Label names, in the caller's order.
    pub names: Vec<String>,
    /// One weight vector per label (for zero-shot labels: the unit-length prototype).
    pub weights: Vec<Vec<f32>>,
    /// One bias per label (zeros for zero-shot labels).
    pub bias: Vec<f32>,
    /// Multiplier of the dot products.
    pub scale: f32,
    /// Each label's stable id (e.g. an IPTC qcode); empty strings when none.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Each label's parent (an index into the labels); in multi-label mode no label
    /// scores above its parent.
    #[serde(default)]
    pub parents: Vec<Option<usize>>,
    /// Multi-label calibration of zero-shot prototypes, `(slope, offset)` of
    /// `sigmoid(slope * cosine + offset)`. `None` (trained heads): multi-label scores are the
    /// head's probabilities.
    #[serde(default)]
    pub multi_label: Option<(f32, f32)>,
    /// Remembered articles that give single-label scores by their nearest neighbours' votes
    /// in place of `weights` (see [`topics::Memory`]): set by `serve --refine-topics` from
    /// the articles the server has seen, or stored in a few-shot head by `tidings train
    /// topics --unlabelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Arc<topics::Memory>>,
    /// For a trained head: the embedding of [`ENCODER_PROBE`] by the topic encoder it was
    /// fitted on (`tidings train topics` writes it). A head only fits the encoder whose
    /// embeddings it learnt, so `serve` compares this with its own encoder's and warns when
    /// they differ. Empty: not known (heads written before it existed, request labels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encoder_probe: Vec<f32>,
}

/// A fixed sentence whose embedding tells topic encoders apart
/// ([`LabelSet::encoder_probe`]).
pub const ENCODER_PROBE: &str =
    "The central bank raised interest rates on Tuesday as shares in Asia fell for a third day.";

impl LabelSet {
    /// Labels scored by their prototypes alone: `softmax(scale * cosine)`, no bias, ids,
    /// parents, multi-label calibration or memory.
    pub fn prototypes(names: Vec<String>, weights: Vec<Vec<f32>>, scale: f32) -> Self {
        Self {
            bias: vec![0.0; weights.len()],
            names,
            weights,
            scale,
            ids: Vec::new(),
            parents: Vec::new(),
            multi_label: None,
            memory: None,
            encoder_probe: Vec::new(),
        }
    }

    /// Probabilities of each label for a unit-length article embedding: the memory's vote
    /// when there is one that fits, else the softmax of the weights.
    pub fn score(&self, article: &[f32]) -> Vec<f32> {
        if let Some(p) = self.memory.as_ref().and_then(|m| m.vote(article)) {
            if p.len() == self.names.len() {
                return p;
            }
        }
        let w: Vec<&[f32]> = self.weights.iter().map(|v| v.as_slice()).collect();
        topics::score(article, &w, &self.bias, self.scale)
    }

    /// Independent probabilities that the article is about each label, each capped by its
    /// parent's.
    pub fn score_independent(&self, article: &[f32]) -> Vec<f32> {
        // Parents that do not match the labels (a hand-edited head file) are ignored.
        let parents: &[Option<usize>] = if self.parents.len() == self.names.len() {
            &self.parents
        } else {
            &[]
        };
        match self.multi_label {
            Some((slope, offset)) => {
                let w: Vec<&[f32]> = self.weights.iter().map(|v| v.as_slice()).collect();
                topics::score_independent(article, &w, parents, slope, offset)
            }
            None => {
                let mut p = self.score(article);
                topics::cap_by_parents(&mut p, parents);
                p
            }
        }
    }

    /// The id of label `i` (empty when none).
    pub fn id(&self, i: usize) -> &str {
        self.ids.get(i).map_or("", String::as_str)
    }
}

/// A validated article.
#[derive(Debug, Clone)]
pub struct Article {
    /// Caller's id.
    pub id: String,
    /// Body.
    pub text: String,
    /// Optional headline (topics only).
    pub title: String,
    /// What to compute.
    pub options: Options,
}

/// How the text was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reading {
    /// Pieces in the body.
    pub tokens: u32,
    /// Windows the body was read in.
    pub windows: u32,
    /// Whether anything was left unread (never, today).
    pub truncated: bool,
}

/// A topic and its probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopicScore {
    /// Label name.
    pub label: String,
    /// The label's stable id; empty when it has none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Probability among the labels considered.
    pub score: f32,
}

/// The result for one article.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Analysis {
    /// Caller's id.
    pub id: String,
    /// Topics, best first.
    pub topics: Vec<TopicScore>,
    /// Entity mentions in text order.
    pub entities: Vec<Mention>,
    /// One group per distinct entity.
    pub entity_groups: Vec<Group>,
    /// How the text was read.
    pub reading: Reading,
    /// The article's unit-length embedding (when topics ran); not part of the API.
    #[serde(skip)]
    pub embedding: Vec<f32>,
}

/// An article cut into model rows, waiting for its forward passes.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The article.
    pub article: Article,
    /// Which NER model tags it: an index into [`Models::ner_models`] (0: the default).
    pub ner_model: usize,
    /// Tokens of work each of its NER rows' tokens is (that model's [`token_weight`]).
    pub ner_weight: usize,
    /// Body pieces for that NER model.
    pub ner_tokens: Option<Arc<Tokens>>,
    /// Its windows.
    pub ner_windows: Vec<Window>,
    /// Body pieces for the topic model (the same `Arc` when the tokenizers are shared).
    pub topic_tokens: Option<Arc<Tokens>>,
    /// Its windows.
    pub topic_windows: Vec<Window>,
    /// Title pieces for the topic model (cut to one window).
    pub title_tokens: Option<Tokens>,
    /// The body's topic embeddings come from the NER rows' forward pass (one encoder serves
    /// both, [`Models::shared_encoder`], and the article is tagged by the default NER model):
    /// the topic rows are then the title only.
    pub topics_from_ner: bool,
}

impl Prepared {
    /// NER rows, one per window.
    pub fn ner_rows(&self) -> Vec<Row<'_>> {
        match &self.ner_tokens {
            Some(t) => super::window_rows(t, &self.ner_windows),
            None => Vec::new(),
        }
    }

    /// Topic rows that need a pass of their own: the body's windows (unless the NER rows
    /// give their embeddings, see [`Prepared::topics_from_ner`]), then the title if any.
    pub fn topic_rows(&self) -> Vec<Row<'_>> {
        let mut rows = match &self.topic_tokens {
            Some(t) if !self.topics_from_ner => super::window_rows(t, &self.topic_windows),
            _ => Vec::new(),
        };
        if let Some(t) = &self.title_tokens {
            rows.push(Row::from(t));
        }
        rows
    }

    /// Padded tokens the rows will cost (a queue-budget measure).
    pub fn cost(&self) -> usize {
        self.ner_rows()
            .iter()
            .chain(self.topic_rows().iter())
            .map(|r| r.ids.len() + 2)
            .sum()
    }

    /// Its work in scheduled tokens: [`Prepared::cost`] with each NER row's tokens weighed by
    /// its model's [`token_weight`] (what the batcher's slices and deadlines count).
    pub fn work(&self) -> usize {
        let ner: usize = self.ner_rows().iter().map(|r| r.ids.len() + 2).sum();
        let topics: usize = self.topic_rows().iter().map(|r| r.ids.len() + 2).sum();
        ner * self.ner_weight + topics
    }
}

/// Model outputs for one prepared article.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// Tag probabilities per NER window.
    pub ner: Vec<Vec<f32>>,
    /// Embedding per body window, then the title's: from the topic rows, or (body windows,
    /// when [`Prepared::topics_from_ner`]) from the NER rows' pass.
    pub topics: Vec<Vec<f32>>,
}

/// A NER model and what decoding it needs.
#[derive(Debug)]
pub struct NerModel {
    /// The name requests choose it by (`ner_model`): the default's is its directory's name
    /// ([`model_name`]), an extra's the one it was loaded under.
    pub name: String,
    /// Its directory.
    pub dir: ModelDir,
    /// The network.
    pub model: TokenClassifier,
    /// Its tag set.
    pub tags: TagSet,
    /// Its special tokens.
    pub specials: Specials,
    /// Its windows.
    pub window: WindowSpec,
    /// Whether it reads texts as the topic model does (same tokenizer and windows): an
    /// article's body is then tokenized once for both.
    pub shares_topic_tokenizer: bool,
    /// Tokens of work one of its tokens costs ([`token_weight`]): 1 for MiniLM-L6, 8 for a
    /// base-size tagger such as MPNet.
    pub token_weight: usize,
}

/// Multiply-adds of the dense layers for one token of the default topic encoder
/// (MiniLM-L6: six layers of width 384 and 1536): one token of scheduled work.
pub const MACS_PER_WORK_TOKEN: usize = 10_616_832;

/// How many tokens of work one token through `cfg`'s encoder is: its dense layers'
/// multiply-adds per token over [`MACS_PER_WORK_TOKEN`], rounded, at least 1 (MiniLM-L6: 1;
/// a base-size encoder such as MPNet or BERT-base: 8). The batcher weighs a tagger's rows by
/// it, so a slice of heavy rows takes about as long as a slice of light ones.
pub fn token_weight(cfg: &crate::model::ModelConfig) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let macs = cfg.num_hidden_layers * (4 * h * h + 2 * h * i);
    ((macs + MACS_PER_WORK_TOKEN / 2) / MACS_PER_WORK_TOKEN).max(1)
}

/// Why a request's `ner_model` cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown entity model {name:?}; loaded: {known}")]
pub struct UnknownNerModel {
    /// The name asked for.
    pub name: String,
    /// The loaded NER models' names, comma-separated (or "none").
    pub known: String,
}

/// Why an article could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Its text could not be tokenized.
    #[error(transparent)]
    Tokenize(#[from] tokens::TokenizeError),
    /// It asks for a NER model that is not loaded.
    #[error(transparent)]
    UnknownNerModel(#[from] UnknownNerModel),
}

/// The name a model loaded from `dir` goes by (the default NER model's, which requests
/// choose it by): the directory's own name (`ner` for `models/ner`), read from its canonical
/// path when the path has none (`.`), else `model`.
pub fn model_name(dir: &Path) -> String {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
    };
    name(dir)
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(name))
        .unwrap_or_else(|| "model".into())
}

/// The topic encoder, its default taxonomy and the softmax scale.
#[derive(Debug)]
pub struct TopicModel {
    /// Its directory.
    pub dir: ModelDir,
    /// The network.
    pub model: SentenceEmbedder,
    /// Its special tokens.
    pub specials: Specials,
    /// Its windows.
    pub window: WindowSpec,
    /// Default labels (used when a request brings none).
    pub default_labels: Vec<Label>,
    /// Multiplier of cosine similarities before the softmax.
    pub scale: f32,
    /// A trained classification head, used instead of the taxonomy when a request brings no
    /// labels.
    pub head: Option<LabelSet>,
    /// Named trained heads that a request selects by name (`serve --topic-head NAME=PATH`).
    pub heads: Vec<(String, LabelSet)>,
}

/// The models, loaded once at start-up.
#[derive(Debug)]
pub struct Models {
    /// The default entity model, if loaded.
    pub ner: Option<NerModel>,
    /// More entity models that requests choose by name (`ner_model`), in the order given;
    /// only beside a default one. [`Models::ner_models`] lists them all.
    pub extra_ner: Vec<NerModel>,
    /// Topic model, if loaded.
    pub topics: Option<TopicModel>,
    /// Where they run.
    pub device: Device,
    /// Whether the default NER model and the topic model share one tokenizer (the text is
    /// then tokenized once).
    pub shared_tokenizer: bool,
    /// Whether topics run on the default NER model's own encoder (a model trained for both,
    /// flagged `tidings_shared_encoder` in its config, loaded as both models): one forward
    /// pass per window then gives an article's tags and its topic embedding, when it is
    /// tagged by the default model.
    pub shared_encoder: bool,
}

impl NerModel {
    /// Loads the token classifier in `dir` under `name`, its windows cut from `window` to
    /// what it reads.
    fn load(
        dir: &Path,
        name: String,
        window: WindowSpec,
        precision: Precision,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let dir = ModelDir::open(dir)?;
        let model = TokenClassifier::load_with(&dir, device, precision)?;
        let tags = TagSet::new(model.labels());
        let specials = Specials::of(&dir)?;
        let window = window.fit(dir.config.max_tokens());
        let token_weight = token_weight(&dir.config);
        Ok(Self {
            name,
            dir,
            model,
            tags,
            specials,
            window,
            shares_topic_tokenizer: false,
            token_weight,
        })
    }
}

/// Whether `ner` reads texts as the topic model `topics` does: the same tokenizer and the
/// same windows.
fn reads_alike(ner: &NerModel, topics: &TopicModel) -> bool {
    ner.dir.tokenizer_json == topics.dir.tokenizer_json && ner.window == topics.window
}

impl TopicModel {
    /// Loads the topic encoder in `dir` with the taxonomy in `taxonomy`, or takes the
    /// encoder of `shared` (a NER model trained to serve topics too, loaded from `dir`).
    fn load(
        dir: &Path,
        shared: Option<&NerModel>,
        taxonomy: Option<&Path>,
        window: WindowSpec,
        precision: Precision,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let (dir, model) = match shared {
            Some(n) => (n.dir.clone(), n.model.topic_embedder()),
            None => {
                let dir = ModelDir::open(dir)?;
                let model = SentenceEmbedder::load_with(&dir, device, precision)?;
                (dir, model)
            }
        };
        let specials = Specials::of(&dir)?;
        let default_labels = match taxonomy {
            Some(t) => topics::Taxonomy::read(t)?.labels,
            None => Vec::new(),
        };
        let window = window.fit(dir.config.max_tokens());
        Ok(Self {
            dir,
            model,
            specials,
            window,
            default_labels,
            scale: topics::DEFAULT_SCALE,
            head: None,
            heads: Vec::new(),
        })
    }

    /// Names of the labels used when a request brings none.
    pub fn default_names(&self) -> Vec<String> {
        match &self.head {
            Some(h) => h.names.clone(),
            None => self.default_labels.iter().map(|l| l.name.clone()).collect(),
        }
    }
}

/// Whether two paths name the same directory (compared canonically where they exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Models {
    /// Loads the default NER model from `ner_dir` (named after it, [`model_name`]) and
    /// the topic encoder from `topic_dir` with the taxonomy in `taxonomy` (JSON, see
    /// [`topics::Taxonomy`]), their products in `precision` (where it applies: see
    /// [`crate::model::Encoder::load_with`]). Either model may be absent; more NER models
    /// are added with [`Models::add_ner`].
    ///
    /// When both name the same directory and its config says the model was trained to serve
    /// both tasks (`tidings_shared_encoder`), the encoder is loaded once and topics run on it
    /// ([`Models::shared_encoder`]).
    pub fn load(
        ner_dir: Option<&Path>,
        topic_dir: Option<&Path>,
        taxonomy: Option<&Path>,
        window: WindowSpec,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        Self::load_on(ner_dir, topic_dir, taxonomy, window, precision, Device::Cpu)
    }

    /// [`Models::load`] onto `device`. On a GPU every layer runs as candle ops in f32
    /// (`precision` applies to the fused CPU path only).
    pub fn load_on(
        ner_dir: Option<&Path>,
        topic_dir: Option<&Path>,
        taxonomy: Option<&Path>,
        window: WindowSpec,
        precision: Precision,
        device: Device,
    ) -> anyhow::Result<Self> {
        let mut ner = match ner_dir {
            Some(p) => Some(NerModel::load(
                p,
                model_name(p),
                window,
                precision,
                &device,
            )?),
            None => None,
        };
        let shared_encoder = match (&ner, topic_dir) {
            (Some(n), Some(t)) => n.dir.config.tidings_shared_encoder && same_dir(&n.dir.dir, t),
            _ => false,
        };
        let topics = match topic_dir {
            Some(p) => Some(TopicModel::load(
                p,
                ner.as_ref().filter(|_| shared_encoder),
                taxonomy,
                window,
                precision,
                &device,
            )?),
            None => None,
        };
        if let (Some(n), Some(t)) = (ner.as_mut(), &topics) {
            n.shares_topic_tokenizer = reads_alike(n, t);
        }
        Ok(Self {
            shared_tokenizer: ner.as_ref().is_some_and(|n| n.shares_topic_tokenizer),
            ner,
            extra_ner: Vec::new(),
            topics,
            device,
            shared_encoder,
        })
    }

    /// Loads one more NER model from `dir` under `name` ([`Models::extra_ner`]), its windows
    /// cut from `window` and its products in `precision`, on the device of the others. It may
    /// have another tokenizer and architecture than the default one, which must be loaded.
    pub fn add_ner(
        &mut self,
        name: &str,
        dir: &Path,
        window: WindowSpec,
        precision: Precision,
    ) -> anyhow::Result<()> {
        if self.ner.is_none() {
            anyhow::bail!("extra NER models need a default one");
        }
        if self.ner_models().any(|n| n.name == name) {
            anyhow::bail!("two NER models are named {name:?}");
        }
        let mut n = NerModel::load(dir, name.to_string(), window, precision, &self.device)?;
        if let Some(t) = &self.topics {
            n.shares_topic_tokenizer = reads_alike(&n, t);
        }
        self.extra_ner.push(n);
        Ok(())
    }

    /// Every NER model, the default first, then the extras in order: an index into this
    /// list is what [`Prepared::ner_model`] holds.
    pub fn ner_models(&self) -> impl Iterator<Item = &NerModel> {
        self.ner.iter().chain(&self.extra_ner)
    }

    /// The NER model at `index` of [`Models::ner_models`].
    pub fn ner_model(&self, index: usize) -> Option<&NerModel> {
        match index {
            0 => self.ner.as_ref(),
            i => self.extra_ner.get(i - 1),
        }
    }

    /// The index in [`Models::ner_models`] of the model named `name`; `None` (no name) is the
    /// default one, index 0.
    pub fn ner_index(&self, name: Option<&str>) -> Result<usize, UnknownNerModel> {
        let Some(name) = name else {
            return Ok(0);
        };
        self.ner_models()
            .position(|n| n.name == name)
            .ok_or_else(|| UnknownNerModel {
                name: name.to_string(),
                known: self.ner_names(),
            })
    }

    /// The NER models' names, comma-separated, the default first ("none" without one).
    pub fn ner_names(&self) -> String {
        let names: Vec<&str> = self.ner_models().map(|n| n.name.as_str()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// Entity types the default NER model produces (empty without one).
    pub fn entity_types(&self) -> Vec<String> {
        self.ner
            .as_ref()
            .map(|n| n.tags.entity_types())
            .unwrap_or_default()
    }

    /// Tokenizes and windows an article for the NER model its options choose (the text once
    /// when that model and the topic model read texts alike).
    pub fn prepare(&self, article: Article) -> Result<Prepared, PrepareError> {
        let ner_model = self.ner_index(article.options.ner_model.as_deref())?;
        let mut p = Prepared {
            ner_model,
            ner_weight: self.ner_model(ner_model).map_or(1, |n| n.token_weight),
            ner_tokens: None,
            ner_windows: Vec::new(),
            topic_tokens: None,
            topic_windows: Vec::new(),
            title_tokens: None,
            topics_from_ner: false,
            article,
        };
        let opts = &p.article.options;
        let ner = self.ner_model(ner_model);
        if let (true, Some(ner)) = (opts.entities, ner) {
            let t = Arc::new(tokens::tokenize(&ner.dir.tokenizer, &p.article.text)?);
            p.ner_windows = windows::plan(t.len(), ner.window.size, ner.window.overlap);
            p.ner_tokens = Some(t);
        }
        if let (true, Some(tm)) = (opts.topics, &self.topics) {
            let shares = ner.is_some_and(|n| n.shares_topic_tokenizer);
            let t = match (&p.ner_tokens, shares) {
                (Some(t), true) => t.clone(),
                _ => Arc::new(tokens::tokenize(&tm.dir.tokenizer, &p.article.text)?),
            };
            // Only the default NER model's pass is the topic encoder's.
            p.topics_from_ner = self.shared_encoder && ner_model == 0 && p.ner_tokens.is_some();
            // From the NER pass, the body's embeddings are those of the NER windows.
            p.topic_windows = if p.topics_from_ner {
                p.ner_windows.clone()
            } else {
                windows::plan(t.len(), tm.window.size, tm.window.overlap)
            };
            p.topic_tokens = Some(t);
            if !p.article.title.trim().is_empty() {
                let mut title = tokens::tokenize(&tm.dir.tokenizer, &p.article.title)?;
                title.truncate(tm.window.size);
                if !title.is_empty() {
                    p.title_tokens = Some(title);
                }
            }
        }
        Ok(p)
    }

    /// The topic encoder's embedding of [`ENCODER_PROBE`] (`None` without a topic model).
    pub fn encoder_probe(&self) -> anyhow::Result<Option<Vec<f32>>> {
        let Some(tm) = &self.topics else {
            return Ok(None);
        };
        let toks = self.tokenize_texts(&[ENCODER_PROBE.to_string()])?;
        let rows: Vec<Row> = toks.iter().map(Row::from).collect();
        Ok(
            super::embeddings(&tm.model, &rows, tm.specials, &self.device)?
                .into_iter()
                .next(),
        )
    }

    /// Tokenizes label texts for embedding: one row each, cut to one window.
    pub fn tokenize_texts(&self, texts: &[String]) -> Result<Vec<Tokens>, tokens::TokenizeError> {
        let Some(tm) = &self.topics else {
            return Ok(Vec::new());
        };
        texts
            .iter()
            .map(|t| {
                let mut toks = tokens::tokenize(&tm.dir.tokenizer, t)?;
                toks.truncate(tm.window.size);
                Ok(toks)
            })
            .collect()
    }

    /// Turns model outputs into the article's analysis, using `labels` for topics.
    pub fn finish(&self, p: &Prepared, out: &Outputs, labels: Option<&LabelSet>) -> Analysis {
        let opts = &p.article.options;
        let mut analysis = Analysis {
            id: p.article.id.clone(),
            ..Analysis::default()
        };
        let body = p.ner_tokens.as_ref().or(p.topic_tokens.as_ref());
        if let Some(t) = body {
            analysis.reading.tokens = t.len() as u32;
            analysis.reading.windows = p.ner_windows.len().max(p.topic_windows.len()) as u32;
        }
        if let (Some(ner), Some(toks)) = (self.ner_model(p.ner_model), &p.ner_tokens) {
            let n = ner.tags.tags().len();
            let probs = super::merge_windows(toks.len(), &p.ner_windows, &out.ner, n);
            let mentions = entities::decode(&p.article.text, toks, &probs, &ner.tags);
            analysis.entities = mentions
                .into_iter()
                .filter(|m| m.score >= opts.min_entity_score)
                .filter(|m| opts.entity_types.is_empty() || opts.entity_types.contains(&m.label))
                .collect();
            analysis.entity_groups = entities::group(&analysis.entities);
        }
        if let (Some(_), Some(labels)) = (&self.topics, labels) {
            if !out.topics.is_empty() && !labels.names.is_empty() {
                let article = article_embedding(p, &out.topics);
                let probs = if opts.multi_label {
                    labels.score_independent(&article)
                } else {
                    labels.score(&article)
                };
                let mut scored: Vec<TopicScore> = labels
                    .names
                    .iter()
                    .cloned()
                    .zip(probs)
                    .enumerate()
                    .map(|(i, (label, score))| TopicScore {
                        label,
                        id: labels.id(i).to_string(),
                        score,
                    })
                    .filter(|t| t.score >= opts.min_topic_score)
                    .collect();
                scored.sort_by(|a, b| b.score.total_cmp(&a.score));
                if opts.top_k > 0 {
                    scored.truncate(opts.top_k);
                }
                analysis.topics = scored;
                analysis.embedding = article;
            }
        }
        analysis
    }
}

/// The article's embedding: body windows weighted by their length, and the title (if any)
/// weighted as much as the whole body, since a headline states the topic most densely.
pub fn article_embedding(p: &Prepared, rows: &[Vec<f32>]) -> Vec<f32> {
    let mut vecs: Vec<&[f32]> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let body: f32 = p.topic_windows.iter().map(|w| w.len() as f32).sum();
    for (w, v) in p.topic_windows.iter().zip(rows) {
        vecs.push(v);
        weights.push(w.len() as f32 / body.max(1.0));
    }
    if p.title_tokens.is_some() {
        if let Some(v) = rows.get(p.topic_windows.len()) {
            vecs.push(v);
            weights.push(1.0);
        }
    }
    topics::mean_unit(&vecs, &weights)
}
