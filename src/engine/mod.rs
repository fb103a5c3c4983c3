//! The engine: bounded queues in front of one batcher thread that runs the models.
//!
//! Callers (the gRPC handlers, `tidings analyze`) hand over a prepared article with a
//! `oneshot` sender for the answer, as in text-embeddings-inference's `queue.rs`. Each request
//! is admitted on an estimate of its cost before any work is done for it, from the pool of
//! its [`Class`]: unary calls (interactive) are refused at once with
//! [`EngineError::QueueFull`] when theirs is exhausted, streams (batch) wait (back-pressure).
//! The two pools are separate, so a batch backlog never refuses an interactive call. The
//! batcher thread runs interactive rows first, up to their share of each slice while batch
//! work waits, shares slices between callers in turn, and skips work whose caller has gone
//! away. Label prototypes are cached in a bounded cache with one computation per text.
//!
//! - [`admission`] — the pools, budgets and reservations of queue room.
//! - [`batcher`] — the thread and its slices.

pub mod admission;
pub mod batcher;

pub use admission::{Caller, Class};

use crate::pipeline::analysis::{Analysis, Article, LabelSet, Models, Outputs, Prepared};
use crate::pipeline::topics::{self, Label};
use admission::{Budget, Pools, Reservation};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Instrument;

/// Limits and batching knobs of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most padded tokens in one forward pass.
    pub max_batch_tokens: usize,
    /// Most tokens of work answered together: the jobs of a batch run in slices of this
    /// size, each job answered as soon as its slice is done.
    pub slice_tokens: usize,
    /// Share of the tokens run that batch work gets while both classes wait; interactive
    /// rows take the rest first (and all of it when no batch work waits). See
    /// [`batcher::plan_shared`].
    pub batch_share: f32,
    /// How long the batcher waits for more work after the first job of a batch arrives.
    pub max_wait: Duration,
    /// Most padded tokens admitted (queued or running) at once in each class's pool; more
    /// is refused (interactive) or waits (batch).
    pub max_queue_tokens: usize,
    /// Most label texts whose embeddings are cached.
    pub label_cache: usize,
    /// Adapt zero-shot label sets to the embeddings of up to this many recently analyzed
    /// articles (unlabelled text): prototypes refined with them ([`topics::refine`]) label a
    /// [`topics::Memory`] of them that gives single-label scores; 0 = off.
    pub refine_pool: usize,
}

/// Articles the refinement pool must hold before label sets are adapted to it.
pub const REFINE_MIN_POOL: usize = 256;
/// Memories of the pool are recomputed after this many new articles.
pub const REFINE_EVERY: u64 = 256;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            // Past ~500 tokens the fused kernels are within a few percent of their best
            // throughput (`tidings bench`: 8 x 64 and 32 x 64 both ~67% of peak).
            slice_tokens: 1024,
            // bench/isolation.py: unary p99 under a saturating batch job vs alone, and the
            // job's throughput kept (see the README's "Sharing one server").
            batch_share: 0.7,
            max_wait: Duration::from_millis(2),
            max_queue_tokens: 262_144,
            label_cache: 8192,
            refine_pool: 0,
        }
    }
}

/// Why the engine could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The queue is full (interactive admission).
    #[error("server busy: the queue holds its limit of {limit} tokens; retry later")]
    QueueFull {
        /// The configured limit.
        limit: usize,
    },
    /// A request's label texts alone could need more than the whole queue.
    #[error(
        "the request's label texts may need up to {cost} tokens of model work, more than the \
         queue's {limit}: send fewer or shorter labels, descriptions or examples"
    )]
    LabelsTooLarge {
        /// Upper bound of the label work, in padded tokens.
        cost: usize,
        /// The configured limit.
        limit: usize,
    },
    /// One article alone needs more than the whole queue.
    #[error("article needs {cost} tokens of model work, more than the queue's {limit}")]
    TooLarge {
        /// Tokens the article needs.
        cost: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The engine is shutting down.
    #[error("engine stopped")]
    Stopped,
    /// Tokenization failed.
    #[error("{0}")]
    Tokenize(String),
    /// A forward pass failed.
    #[error("model failure: {0}")]
    Model(String),
    /// The task needs a model that is not loaded.
    #[error("no {0} model is loaded")]
    NoModel(&'static str),
    /// The request names a topic head the server has not loaded.
    #[error("unknown topic head {name:?}; loaded: {known}")]
    UnknownHead {
        /// The name asked for.
        name: String,
        /// The loaded heads' names, comma-separated (or "none").
        known: String,
    },
    /// The request names a NER model the server has not loaded.
    #[error("unknown entity model {name:?}; loaded: {known}")]
    UnknownNerModel {
        /// The name asked for.
        name: String,
        /// The loaded NER models' names, comma-separated (or "none").
        known: String,
    },
}

impl From<crate::pipeline::analysis::UnknownNerModel> for EngineError {
    fn from(e: crate::pipeline::analysis::UnknownNerModel) -> Self {
        Self::UnknownNerModel {
            name: e.name,
            known: e.known,
        }
    }
}

impl From<crate::pipeline::analysis::PrepareError> for EngineError {
    fn from(e: crate::pipeline::analysis::PrepareError) -> Self {
        use crate::pipeline::analysis::PrepareError;
        match e {
            PrepareError::Tokenize(e) => Self::Tokenize(e.to_string()),
            PrepareError::UnknownNerModel(e) => e.into(),
        }
    }
}

/// Where the time of one article went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// From admission to the start of its batch.
    pub queue: Duration,
    /// Forward passes of its batch.
    pub inference: Duration,
}

/// Work for the batcher.
#[derive(Debug)]
pub(crate) enum Work {
    /// An article's windows.
    Article(Arc<Prepared>),
    /// Texts to embed with the topic model (label prototypes).
    Texts(Vec<crate::pipeline::tokens::Tokens>),
}

/// One queued unit of work and where its answer goes.
#[derive(Debug)]
pub(crate) struct Job {
    /// The work.
    pub(crate) work: Work,
    /// Padded tokens it costs.
    pub(crate) cost: usize,
    /// Whose it is: its class and caller decide its place in the slices.
    pub(crate) caller: Caller,
    /// When it was admitted.
    pub(crate) enqueued: Instant,
    /// The caller's end; closed when the caller gave up (cancelled, deadline).
    pub(crate) reply: oneshot::Sender<Result<(Outputs, Timing), EngineError>>,
    /// Queue room held until the job is answered.
    pub(crate) room: Reservation,
    /// The caller's span ([`crate::trace::item_span`]): the batcher's events about the
    /// job's rows are logged inside it, and its `inference` spans are its children.
    pub(crate) span: tracing::Span,
    /// Open from admission to the start of the job's first slice: its time in the queue.
    pub(crate) queued: tracing::Span,
}

/// Running totals of what the engine did.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs dropped unrun because their caller had gone away (cancelled, deadline passed).
    pub dropped_jobs: AtomicU64,
    /// Rows (windows, titles, label texts) run through a model.
    pub rows_run: AtomicU64,
    /// Articles tokenized (each after its admission).
    pub articles_tokenized: AtomicU64,
    /// Label texts embedded (each once while it stays in the cache).
    pub label_texts_embedded: AtomicU64,
}

/// The label-embedding cache: `capacity` texts, least recently used evicted first. moka's
/// default policy (TinyLFU) may refuse a new text when the cache is full of texts asked for
/// more often, so a busy server would recompute a new label set on every request.
fn label_cache(capacity: usize) -> moka::future::Cache<String, Arc<Vec<f32>>> {
    moka::future::Cache::builder()
        .max_capacity(capacity as u64)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    models: Arc<Models>,
    tx: std::sync::mpsc::Sender<Job>,
    pools: Arc<Pools>,
    cfg: EngineConfig,
    /// Label text -> embedding. Bounded; a text being computed is computed once however
    /// many requests ask for it, and a request keeps the vectors it got while it runs.
    labels: moka::future::Cache<String, Arc<Vec<f32>>>,
    default_labels: Arc<Mutex<Option<LabelSet>>>,
    next_caller: Arc<AtomicU64>,
    stats: Arc<EngineStats>,
    /// Embeddings of recently analyzed articles, for refining prototypes.
    seen: Arc<Mutex<Seen>>,
    /// The topic memory loaded at start-up, when there is one ([`Engine::with_topic_memory`]).
    fixed: Option<Arc<FixedMemory>>,
}

/// Bytes of refined label distributions kept for the label sets scored against a fixed
/// topic memory (N articles x K labels x 4 bytes each: 1,900 articles and 17 labels are
/// 130 KB); the least recently used go first, so no label set's memory is wiped by others.
const FIXED_REFINED_BYTES: u64 = 64 << 20;

/// A topic memory loaded at start-up, and the memories of the label sets refined against it.
struct FixedMemory {
    memory: crate::pipeline::topic_memory::TopicMemory,
    /// Label set key -> its memory. Bounded by bytes; one computation per key however many
    /// requests ask at once.
    refined: moka::future::Cache<u64, Arc<topics::Memory>>,
    /// One refinement at a time on the blocking pool: many new label sets at once queue
    /// here instead of taking every core from the batcher.
    running: tokio::sync::Semaphore,
}

/// The refinement pool of online refinement (`--refine-topics`): recent articles scored
/// with the default taxonomy, and the default taxonomy's memory refined from them.
///
/// Only the default taxonomy is refined online, and only from its own traffic: a caller
/// with labels of its own neither feeds the pool nor gets scores steered by it, so no
/// caller's traffic changes another's scores unless both chose the server's shared
/// taxonomy. Request labels get memory-backed scores from a fixed memory instead
/// (`--topic-memory`), the same on every replica.
#[derive(Default)]
struct Seen {
    articles: std::collections::VecDeque<Vec<f32>>,
    pushed: u64,
    /// The default taxonomy's memory and the pool generation it was refined from.
    refined: Option<(u64, Arc<topics::Memory>)>,
    /// Whether a refinement is running (one at a time; the others keep the previous one).
    refining: bool,
}

/// Marks the refinement as running until dropped; dropped before it finished (the caller
/// went away), it tells the computation to stop and counts it as stopped.
struct RefiningMark {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    finished: bool,
}

impl Drop for RefiningMark {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.seen.lock().refining = false;
        if !self.finished {
            metrics::counter!("tidings_topic_refinements_total", "outcome" => "stopped")
                .increment(1);
        }
    }
}

/// Multiply-adds of refinement charged as one token of queue room: what one token costs
/// the default topic encoder ([`crate::pipeline::analysis::MACS_PER_WORK_TOKEN`]), so a
/// refinement holds room in the batch pool like model work of the same size.
const REFINE_MACS_PER_TOKEN: usize = crate::pipeline::analysis::MACS_PER_WORK_TOKEN;

/// A hash of prototypes, identifying a label set.
fn prototypes_key(weights: &[Vec<f32>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for w in weights {
        for x in w {
            x.to_bits().hash(&mut h);
        }
        0xffu8.hash(&mut h);
    }
    h.finish()
}

/// The thread pool forward passes run *on*: the batcher loop (and `tidings bench`'s timed
/// passes) run inside [`rayon::ThreadPool::install`], so each of the dozens of small parallel
/// ops in a forward pass starts on a running worker that the other workers steal from,
/// instead of being injected from outside the pool and waking a sleeping thread through a
/// futex, then blocking the caller on another (measured: 1 x 21 tokens through both models
/// before the fused kernels, ~23 ms -> ~21.5 ms; 1 x 64 tokens int8 NER on the fused kernels,
/// see bench/README.md).
pub fn model_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .thread_name(|i| format!("tidings-model-{i}"))
        .build()
        .expect("building the model thread pool")
}

impl Engine {
    /// Starts the batcher thread over `models`.
    pub fn start(models: Arc<Models>, cfg: EngineConfig) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_models = models.clone();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let pool = model_pool();
        std::thread::Builder::new()
            .name("tidings-batcher".into())
            .spawn(move || pool.install(|| batcher::run(thread_models, rx, cfg, &thread_stats)))
            .expect("spawning the batcher thread");
        Self {
            models,
            tx,
            pools: Arc::new(Pools::new(cfg.max_queue_tokens)),
            cfg,
            labels: label_cache(cfg.label_cache),
            default_labels: Arc::new(Mutex::new(None)),
            next_caller: Arc::new(AtomicU64::new(1)),
            stats,
            seen: Arc::new(Mutex::new(Seen::default())),
            fixed: None,
        }
    }

    /// Scores zero-shot label sets (the default taxonomy and request labels) against
    /// `memory`: each set's prototypes are refined with the memory's articles and those
    /// articles then vote ([`topics::refine`], [`topics::Memory`]). The memory never changes
    /// while the engine runs, so the same request gets the same scores on every replica
    /// that loaded the same file, and after a restart. Takes the place of online refinement
    /// ([`EngineConfig::refine_pool`]).
    pub fn with_topic_memory(mut self, memory: crate::pipeline::topic_memory::TopicMemory) -> Self {
        let refined = moka::future::Cache::builder()
            .max_capacity(FIXED_REFINED_BYTES)
            .weigher(|_, m: &Arc<topics::Memory>| {
                let bytes = m.labels.iter().map(|l| l.len() * 4).sum::<usize>();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        self.fixed = Some(Arc::new(FixedMemory {
            memory,
            refined,
            running: tokio::sync::Semaphore::new(1),
        }));
        self
    }

    /// The topic memory loaded at start-up, if any.
    pub fn topic_memory(&self) -> Option<&crate::pipeline::topic_memory::TopicMemory> {
        self.fixed.as_ref().map(|f| &f.memory)
    }

    /// `set` with its memory from the fixed topic memory (computed once per label set).
    async fn refined_fixed(&self, fixed: &FixedMemory, mut set: LabelSet) -> LabelSet {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (prototypes_key(&set.weights), set.scale.to_bits()).hash(&mut h);
        let (weights, scale, pool) = (set.weights.clone(), set.scale, fixed.memory.vectors.clone());
        let memory = fixed
            .refined
            .try_get_with(h.finish(), async move {
                let _one_at_a_time = fixed.running.acquire().await;
                tokio::task::spawn_blocking(move || {
                    let refs: Vec<&[f32]> = pool.iter().map(Vec::as_slice).collect();
                    let prototypes = topics::refine(&weights, &refs, topics::REFINE_ROUNDS);
                    Arc::new(topics::Memory::pseudo_labelled(
                        &prototypes,
                        pool.clone(),
                        &[],
                        scale,
                    ))
                })
                .await
            })
            .await;
        match memory {
            Ok(m) => set.memory = Some(m),
            Err(e) => tracing::error!(error = %e, "refining a label set against the topic memory"),
        }
        set
    }

    /// `set` with a memory that gives its single-label scores (multi-label scores keep the
    /// calibrated original prototypes): from the fixed topic memory when one is loaded (any
    /// zero-shot set), else, for the default taxonomy (`default`) with online refinement on,
    /// from the articles seen ([`Engine::refined_online`]).
    async fn refined(&self, set: LabelSet, default: bool) -> LabelSet {
        if set.multi_label.is_none() {
            return set;
        }
        match &self.fixed {
            Some(fixed) => self.refined_fixed(fixed, set).await,
            None if default && self.cfg.refine_pool > 0 => self.refined_online(set).await,
            None => set,
        }
    }

    /// The default taxonomy with a memory of the articles seen with it, labelled by
    /// prototypes refined against them ([`topics::refine`], [`topics::Memory`]), once the
    /// pool holds enough articles; recomputed every [`REFINE_EVERY`] new articles, one
    /// computation at a time (the others keep the previous memory meanwhile). The work is
    /// charged to the batch pool (it waits for room like stream work), counted in
    /// `tidings_topic_refinements_total`, and stops when its caller goes away.
    async fn refined_online(&self, mut set: LabelSet) -> LabelSet {
        let (pool, generation) = {
            let mut seen = self.seen.lock();
            if seen.articles.len() < REFINE_MIN_POOL.min(self.cfg.refine_pool) {
                return set;
            }
            let generation = seen.pushed / REFINE_EVERY;
            set.memory = seen.refined.as_ref().map(|(_, m)| m.clone());
            if seen.refined.as_ref().is_some_and(|(g, _)| *g == generation) || seen.refining {
                return set;
            }
            seen.refining = true;
            let pool = Arc::new(seen.articles.iter().cloned().collect::<Vec<_>>());
            (pool, generation)
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Clears the mark however this ends, and stops the work when the caller's deadline
        // or cancellation drops this future.
        let mut mark = RefiningMark {
            seen: self.seen.clone(),
            stop: stop.clone(),
            finished: false,
        };
        let dim = set.weights.first().map_or(0, Vec::len);
        let macs = pool.len() * set.weights.len() * dim * (topics::REFINE_ROUNDS + 1);
        let tokens = macs.div_ceil(REFINE_MACS_PER_TOKEN).max(1);
        // Room now or not this time (the previous memory serves meanwhile): the caller holds
        // room already, and waiting for more while holding it could deadlock the pool.
        let Ok(_room) = Reservation::try_take(&self.pools, Class::Batch, tokens) else {
            mark.finished = true;
            metrics::counter!("tidings_topic_refinements_total", "outcome" => "no_room")
                .increment(1);
            return set;
        };
        let started = Instant::now();
        let (weights, scale) = (set.weights.clone(), set.scale);
        let refined = tokio::task::spawn_blocking(move || {
            let refs: Vec<&[f32]> = pool.iter().map(Vec::as_slice).collect();
            let stopped = || stop.load(Ordering::Relaxed);
            let prototypes =
                topics::refine_unless(&weights, &refs, topics::REFINE_ROUNDS, &stopped)?;
            Some(topics::Memory::pseudo_labelled(
                &prototypes,
                pool.clone(),
                &[],
                scale,
            ))
        })
        .await
        .ok()
        .flatten()
        .map(Arc::new);
        mark.finished = true;
        let outcome = if refined.is_some() { "done" } else { "stopped" };
        metrics::counter!("tidings_topic_refinements_total", "outcome" => outcome).increment(1);
        metrics::histogram!("tidings_topic_refine_seconds").record(started.elapsed().as_secs_f64());
        if let Some(m) = refined {
            self.seen.lock().refined = Some((generation, m.clone()));
            set.memory = Some(m);
        }
        set
    }

    /// Adds an analyzed article's embedding to the refinement pool.
    fn remember(&self, embedding: &[f32]) {
        if self.cfg.refine_pool == 0
            || self.fixed.is_some()
            || embedding.is_empty()
            || !embedding.iter().all(|x| x.is_finite())
        {
            return;
        }
        let mut seen = self.seen.lock();
        if seen.articles.len() >= self.cfg.refine_pool {
            seen.articles.pop_front();
        }
        seen.articles.push_back(embedding.to_vec());
        seen.pushed += 1;
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The loaded models.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// The engine's limits.
    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    /// Tokens of model work admitted and not yet answered, in both classes' pools.
    pub fn queued_tokens(&self) -> usize {
        self.pools.queued()
    }

    /// A new caller of `class`: one per unary call or stream.
    pub fn caller(&self, class: Class) -> Caller {
        Caller {
            class,
            id: self.next_caller.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn submit(
        &self,
        work: Work,
        cost: usize,
        room: Reservation,
        caller: Caller,
    ) -> Result<(Outputs, Timing), EngineError> {
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        let job = Job {
            work,
            cost,
            caller,
            enqueued: Instant::now(),
            reply,
            room,
            queued: tracing::info_span!(parent: &span, "queue", tokens = cost),
            span,
        };
        self.tx.send(job).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// The embedding of one label text, computed as a job of its own (the batcher packs the
    /// concurrent ones together). Its rows run in the caller's class, on room from the
    /// caller's pool: a stream's labels are batch work (issue #30: they ran as interactive
    /// work and took unary calls' share). `tokens` are the text's, when the request
    /// tokenized it already.
    async fn embed_text(
        &self,
        text: &str,
        tokens: Option<crate::pipeline::tokens::Tokens>,
        budget: &Budget,
        caller: Caller,
    ) -> Result<Arc<Vec<f32>>, EngineError> {
        let toks = match tokens {
            Some(t) => vec![t],
            None => self.tokenize_labels(vec![text.to_string()]).await?,
        };
        let cost = toks.iter().map(|t| t.len() + 2).sum();
        // Never waits: other requests may be waiting on this text (see take_now).
        let room = budget.take_now(cost)?;
        let (out, _) = self.submit(Work::Texts(toks), cost, room, caller).await?;
        self.stats
            .label_texts_embedded
            .fetch_add(1, Ordering::Relaxed);
        out.topics
            .into_iter()
            .next()
            .map(Arc::new)
            .ok_or_else(|| EngineError::Model("no embedding for a label text".into()))
    }

    /// Tokens of label texts, tokenized off the async runtime in one blocking task: a
    /// request may bring over a thousand texts of 2,000 characters (issue #30: they were
    /// tokenized on a runtime worker that also answers health probes).
    async fn tokenize_labels(
        &self,
        texts: Vec<String>,
    ) -> Result<Vec<crate::pipeline::tokens::Tokens>, EngineError> {
        let models = self.models.clone();
        tokio::task::spawn_blocking(move || models.tokenize_texts(&texts))
            .await
            .map_err(|e| EngineError::Model(format!("label tokenizer task: {e}")))?
            .map_err(|e| EngineError::Tokenize(e.to_string()))
    }

    /// Embeddings of `texts` through the topic model, from the cache where possible.
    async fn embed(
        &self,
        texts: &[String],
        budget: &Budget,
        caller: Caller,
    ) -> Result<Vec<Arc<Vec<f32>>>, EngineError> {
        let mut unique: Vec<&String> = texts.iter().collect();
        unique.sort();
        unique.dedup();
        let missing: Vec<String> = unique
            .iter()
            .filter(|t| !self.labels.contains_key(t.as_str()))
            .map(|t| t.to_string())
            .collect();
        let mut tokens: std::collections::HashMap<String, crate::pipeline::tokens::Tokens> =
            if missing.is_empty() {
                Default::default()
            } else {
                let toks = self.tokenize_labels(missing.clone()).await?;
                missing.into_iter().zip(toks).collect()
            };
        let got = futures::future::try_join_all(unique.iter().map(|t| {
            let pre = tokens.remove(t.as_str());
            self.labels
                .try_get_with_by_ref(t.as_str(), self.embed_text(t, pre, budget, caller))
        }))
        .await
        .map_err(|e| (*e).clone())?;
        let by_text: std::collections::HashMap<&String, Arc<Vec<f32>>> =
            unique.into_iter().zip(got).collect();
        Ok(texts.iter().map(|t| by_text[t].clone()).collect())
    }

    /// Most queue room embedding those of `labels`' texts not in the cache can take (an
    /// upper bound: [`admission::label_tokens`]).
    fn label_estimate(&self, labels: &[Label]) -> usize {
        let Some(tm) = &self.models.topics else {
            return 0;
        };
        let mut texts: Vec<String> = labels
            .iter()
            .flat_map(Label::prototype_texts)
            .filter(|t| !self.labels.contains_key(t))
            .collect();
        texts.sort_unstable();
        texts.dedup();
        texts
            .iter()
            .map(|t| admission::label_tokens(t, tm.window.size))
            .sum()
    }

    /// Estimated queue room for an article's own rows, tagged by the NER model at
    /// `ner_index` of [`Models::ner_models`].
    fn article_estimate(&self, article: &Article, ner_index: usize) -> usize {
        let text = article.text.chars().count();
        let mut est = 0;
        let ner = self.models.ner_model(ner_index);
        if let (true, Some(n)) = (article.options.entities, ner) {
            est += admission::estimate_tokens(text, n.window.size, n.window.overlap);
        }
        // With one encoder for both tasks the default NER model's rows give the body's topic
        // embeddings.
        let body_from_ner = self.models.shared_encoder
            && article.options.entities
            && ner_index == 0
            && ner.is_some();
        if let (true, Some(t)) = (article.options.topics, &self.models.topics) {
            if !body_from_ner {
                est += admission::estimate_tokens(text, t.window.size, t.window.overlap);
            }
            let title = article.title.chars().count();
            est += admission::estimate_tokens(title, t.window.size, 0).min(t.window.size + 2);
        }
        est
    }

    /// Prototype embeddings of labels: the mean of their texts' embeddings.
    async fn label_set_within(
        &self,
        labels: &[Label],
        budget: &Budget,
        caller: Caller,
    ) -> Result<LabelSet, EngineError> {
        let per_label: Vec<Vec<String>> = labels.iter().map(Label::prototype_texts).collect();
        let all: Vec<String> = per_label.iter().flatten().cloned().collect();
        let embs = self.embed(&all, budget, caller).await?;
        let mut at = 0;
        let mut weights = Vec::with_capacity(labels.len());
        for texts in &per_label {
            let vs: Vec<&[f32]> = embs[at..at + texts.len()]
                .iter()
                .map(|v| v.as_slice())
                .collect();
            weights.push(topics::mean_unit(&vs, &vec![1.0; vs.len()]));
            at += texts.len();
        }
        let scale = self
            .models
            .topics
            .as_ref()
            .map_or(topics::DEFAULT_SCALE, |t| t.scale);
        Ok(LabelSet {
            names: labels.iter().map(|l| l.name.clone()).collect(),
            bias: vec![0.0; weights.len()],
            weights,
            scale,
            ids: labels.iter().map(|l| l.id.clone()).collect(),
            memory: None,
            // Request labels are checked at the door and taxonomies when loaded.
            parents: topics::parents(labels).unwrap_or_else(|_| vec![None; labels.len()]),
            multi_label: Some((topics::MULTI_LABEL_SLOPE, topics::MULTI_LABEL_OFFSET)),
            encoder_probe: Vec::new(),
        })
    }

    /// Prototype embeddings of labels, admitted as `caller`'s work.
    pub async fn label_set(
        &self,
        labels: &[Label],
        caller: Caller,
    ) -> Result<LabelSet, EngineError> {
        let budget =
            Budget::admit(&self.pools, caller.class, self.label_estimate(labels), 0).await?;
        self.label_set_within(labels, &budget, caller).await
    }

    /// What requests without labels are scored against: the trained head
    /// (`serve --topic-head`) when one is loaded, else the default taxonomy's prototypes,
    /// computed once.
    pub async fn default_label_set(&self) -> Result<LabelSet, EngineError> {
        if let Some(s) = self.default_labels.lock().clone() {
            return Ok(s);
        }
        let Some(t) = &self.models.topics else {
            return Err(EngineError::NoModel("topic"));
        };
        let set = match &t.head {
            Some(head) => head.clone(),
            None => {
                self.label_set(&t.default_labels, self.caller(Class::Batch))
                    .await?
            }
        };
        *self.default_labels.lock() = Some(set.clone());
        Ok(set)
    }

    /// Computes the default labels' prototypes, and their memory when a topic memory is
    /// loaded, so that the first request does not wait for them.
    pub async fn warm_default_topics(&self) -> Result<(), EngineError> {
        let set = self.default_label_set().await?;
        if self.fixed.is_some() {
            self.refined(set, true).await;
        }
        Ok(())
    }

    /// The trained head loaded as `name` (`serve --topic-head NAME=PATH`).
    pub fn named_head(&self, name: &str) -> Result<LabelSet, EngineError> {
        let Some(t) = &self.models.topics else {
            return Err(EngineError::NoModel("topic"));
        };
        t.heads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| EngineError::UnknownHead {
                name: name.to_string(),
                known: if t.heads.is_empty() {
                    "none".into()
                } else {
                    t.heads
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    /// Tokenizes and windows an admitted article, off the async runtime.
    async fn prepare(&self, article: Article) -> Result<Prepared, EngineError> {
        let models = self.models.clone();
        let tokenizing = Instant::now();
        let prepared = tokio::task::spawn_blocking(move || models.prepare(article))
            .instrument(tracing::info_span!("tokenize"))
            .await
            .map_err(|e| EngineError::Tokenize(e.to_string()))??;
        tracing::debug!(
            tokenize_ms = tokenizing.elapsed().as_secs_f64() * 1e3,
            cost = prepared.cost(),
            "tokenized; queued"
        );
        self.stats
            .articles_tokenized
            .fetch_add(1, Ordering::Relaxed);
        Ok(prepared)
    }

    /// Analyzes one article for `caller`: admits it on an estimate of its cost, embeds new
    /// labels, tokenizes it (off the async runtime), queues its windows, and decodes the
    /// outputs. `labels` = `None` uses the default labels ([`Engine::default_label_set`]).
    pub async fn analyze(
        &self,
        article: Article,
        labels: Option<&[Label]>,
        caller: Caller,
    ) -> Result<(Analysis, Timing), EngineError> {
        if article.options.entities && self.models.ner.is_none() {
            return Err(EngineError::NoModel("entity"));
        }
        if article.options.topics && self.models.topics.is_none() {
            return Err(EngineError::NoModel("topic"));
        }
        // An unknown head or NER model is a bad request whatever the tasks and however full
        // the queue.
        let head = match &article.options.topic_head {
            Some(name) => Some(self.named_head(name)?),
            None => None,
        };
        let ner_index = self
            .models
            .ner_index(article.options.ner_model.as_deref())?;
        let custom = labels.filter(|l| article.options.topics && !l.is_empty());
        // Scored with the server's own taxonomy: the only traffic online refinement learns
        // from, and the only label set it refines.
        let shared = article.options.topics && custom.is_none() && head.is_none();
        // The default labels come before admission: they are admitted on their own (once),
        // and a request holding room while it waited for them could hold the room they
        // need (a deadlock when one request's estimate fills the pool).
        let default_set = match (article.options.topics, custom, head) {
            (true, None, None) => Some(self.default_label_set().await?),
            (_, _, head) => head,
        };
        // Admission comes first: a request the queue cannot take costs no tokenizing and no
        // label embedding.
        let labels_bound = custom.map_or(0, |l| self.label_estimate(l));
        let admitting = Instant::now();
        let budget = Budget::admit(
            &self.pools,
            caller.class,
            labels_bound,
            self.article_estimate(&article, ner_index),
        )
        .instrument(tracing::info_span!("admission"))
        .await?;
        tracing::debug!(
            wait_ms = admitting.elapsed().as_secs_f64() * 1e3,
            labels_bound,
            "admitted"
        );
        let label_set = match (article.options.topics, custom) {
            (false, _) => None,
            (true, Some(l)) => Some(self.label_set_within(l, &budget, caller).await?),
            (true, None) => default_set,
        };
        let label_set = match label_set {
            Some(set) => Some(self.refined(set, shared).await),
            None => None,
        };
        let prepared = Arc::new(self.prepare(article).await?);
        let cost = prepared.cost();
        let (out, timing) = if cost == 0 {
            (Outputs::default(), Timing::default())
        } else {
            let room = budget.take(cost).await?;
            // What the estimate held beyond the article's cost goes back now.
            drop(budget);
            self.submit(Work::Article(prepared.clone()), cost, room, caller)
                .await?
        };
        let models = self.models.clone();
        let analysis =
            tokio::task::spawn_blocking(move || models.finish(&prepared, &out, label_set.as_ref()))
                .instrument(tracing::info_span!("decode"))
                .await
                .map_err(|e| EngineError::Model(e.to_string()))?;
        if shared {
            self.remember(&analysis.embedding);
        }
        Ok((analysis, timing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #30: a full cache of often-used texts still takes a new one (LRU, as documented),
    /// where TinyLFU refused it.
    #[tokio::test]
    async fn a_full_label_cache_takes_new_texts() {
        let cache = label_cache(4);
        let v = Arc::new(vec![0f32; 4]);
        for k in 0..4 {
            cache.insert(format!("old {k}"), v.clone()).await;
        }
        for _ in 0..5 {
            for k in 0..4 {
                assert!(cache.get(&format!("old {k}")).await.is_some());
            }
        }
        cache.run_pending_tasks().await;
        cache.insert("new".to_string(), v.clone()).await;
        cache.run_pending_tasks().await;
        assert!(cache.get("new").await.is_some(), "the new text was refused");
        assert!(cache.entry_count() <= 4);
    }
}
