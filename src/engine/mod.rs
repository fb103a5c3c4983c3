//! The engine: a bounded queue in front of one batcher thread that runs the models.
//!
//! Callers (the gRPC handlers, `tidings analyze`) hand over a prepared article with a
//! `oneshot` sender for the answer, as in text-embeddings-inference's `queue.rs`. Admission
//! is bounded by a semaphore counted in padded tokens: unary calls are refused at once with
//! [`EngineError::QueueFull`] when it is exhausted, streams wait (back-pressure). The batcher
//! thread packs the windows of many articles into forward passes by a token budget, sorted by
//! length to waste little padding, and skips work whose caller has gone away.
//!
//! - [`batcher`] — the thread and its packing.

pub mod batcher;

use crate::pipeline::analysis::{Analysis, Article, LabelSet, Models, Outputs, Prepared};
use crate::pipeline::tokens::Tokens;
use crate::pipeline::topics::{self, Label};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Limits and batching knobs of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most padded tokens in one forward pass.
    pub max_batch_tokens: usize,
    /// Most tokens of work answered together: the jobs of a batch run cheapest first in
    /// slices of this size, each answered as soon as its slice is done.
    pub slice_tokens: usize,
    /// How long the batcher waits for more work after the first job of a batch arrives.
    pub max_wait: Duration,
    /// Most padded tokens admitted (queued or running) at once; more is refused or waits.
    pub max_queue_tokens: usize,
    /// Most label texts whose embeddings are cached.
    pub label_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            // Past ~500 tokens the fused kernels are within a few percent of their best
            // throughput (`tidings bench`: 8 x 64 and 32 x 64 both ~67% of peak).
            slice_tokens: 1024,
            max_wait: Duration::from_millis(2),
            max_queue_tokens: 262_144,
            label_cache: 8192,
        }
    }
}

/// Why the engine could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The queue is full (unary admission).
    #[error("server busy: the queue holds its limit of {limit} tokens; retry later")]
    QueueFull {
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
}

/// How to admit work when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Refuse at once with [`EngineError::QueueFull`] (unary calls).
    FailFast,
    /// Wait for room (streams: back-pressure).
    Wait,
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
pub enum Work {
    /// An article's windows.
    Article(Arc<Prepared>),
    /// Texts to embed with the topic model (label prototypes).
    Texts(Vec<Tokens>),
}

/// One queued unit of work and where its answer goes.
#[derive(Debug)]
pub struct Job {
    /// The work.
    pub work: Work,
    /// Padded tokens it costs.
    pub cost: usize,
    /// When it was admitted.
    pub enqueued: Instant,
    /// The caller's end; closed when the caller gave up (cancelled, deadline).
    pub reply: oneshot::Sender<Result<(Outputs, Timing), EngineError>>,
    /// Queue room held until the job is answered.
    pub permit: OwnedSemaphorePermit,
}

/// Running totals of what the batcher did.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs dropped unrun because their caller had gone away (cancelled, deadline passed).
    pub dropped_jobs: AtomicU64,
    /// Rows (windows, titles, label texts) run through a model.
    pub rows_run: AtomicU64,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    models: Arc<Models>,
    tx: std::sync::mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    cfg: EngineConfig,
    labels: Arc<Mutex<HashMap<String, Vec<f32>>>>,
    /// Held while label embeddings are computed, so that concurrent requests with the same
    /// new labels embed them once instead of once each.
    embedding_labels: Arc<tokio::sync::Mutex<()>>,
    default_labels: Arc<Mutex<Option<LabelSet>>>,
    stats: Arc<EngineStats>,
}

impl Engine {
    /// Starts the batcher thread over `models`.
    pub fn start(models: Arc<Models>, cfg: EngineConfig) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_models = models.clone();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        // The batcher loop runs *on* a worker of the pool that candle's kernels fork into, so
        // each of the hundreds of small parallel ops in a forward pass starts on a running
        // thread instead of waking a sleeping one from outside the pool (measured before the
        // fused kernels: 1 x 21 tokens through both models, ~23 ms -> ~21.5 ms).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("tidings-model-{i}"))
            .build()
            .expect("building the model thread pool");
        std::thread::Builder::new()
            .name("tidings-batcher".into())
            .spawn(move || pool.install(|| batcher::run(thread_models, rx, cfg, &thread_stats)))
            .expect("spawning the batcher thread");
        Self {
            models,
            tx,
            permits: Arc::new(Semaphore::new(cfg.max_queue_tokens)),
            cfg,
            labels: Arc::new(Mutex::new(HashMap::new())),
            embedding_labels: Arc::new(tokio::sync::Mutex::new(())),
            default_labels: Arc::new(Mutex::new(None)),
            stats,
        }
    }

    /// What the batcher has done so far.
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

    /// Tokens of model work admitted and not yet answered.
    pub fn queued_tokens(&self) -> usize {
        self.cfg.max_queue_tokens - self.permits.available_permits()
    }

    async fn submit(
        &self,
        work: Work,
        cost: usize,
        admission: Admission,
    ) -> Result<(Outputs, Timing), EngineError> {
        let limit = self.cfg.max_queue_tokens;
        if cost > limit {
            return Err(EngineError::TooLarge { cost, limit });
        }
        let n = cost.max(1) as u32;
        let permit = match admission {
            Admission::FailFast => self
                .permits
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|e| match e {
                    tokio::sync::TryAcquireError::Closed => EngineError::Stopped,
                    tokio::sync::TryAcquireError::NoPermits => EngineError::QueueFull { limit },
                })?,
            Admission::Wait => self
                .permits
                .clone()
                .acquire_many_owned(n)
                .await
                .map_err(|_| EngineError::Stopped)?,
        };
        let (reply, rx) = oneshot::channel();
        let job = Job {
            work,
            cost,
            enqueued: Instant::now(),
            reply,
            permit,
        };
        metrics::gauge!("tidings_queue_tokens").set(self.queued_tokens() as f64);
        self.tx.send(job).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Embeddings of texts through the topic model, from the cache where possible.
    async fn embed(
        &self,
        texts: &[String],
        admission: Admission,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let missing =
            |cache: &HashMap<String, Vec<f32>>| texts.iter().any(|t| !cache.contains_key(t));
        let _single_flight = if missing(&self.labels.lock().unwrap_or_else(|e| e.into_inner())) {
            Some(self.embedding_labels.lock().await)
        } else {
            None
        };
        let missing: Vec<String> = {
            let cache = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            let mut m: Vec<String> = texts
                .iter()
                .filter(|t| !cache.contains_key(*t))
                .cloned()
                .collect();
            m.sort();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            let toks = self
                .models
                .tokenize_texts(&missing)
                .map_err(|e| EngineError::Tokenize(e.to_string()))?;
            let cost = toks.iter().map(|t| t.len() + 2).sum();
            let (out, _) = self.submit(Work::Texts(toks), cost, admission).await?;
            let mut cache = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() + missing.len() > self.cfg.label_cache {
                cache.clear();
            }
            for (t, v) in missing.into_iter().zip(out.topics) {
                cache.insert(t, v);
            }
        }
        let cache = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        texts
            .iter()
            .map(|t| cache.get(t).cloned().ok_or(EngineError::Stopped))
            .collect()
    }

    /// Prototype embeddings of labels: the mean of their texts' embeddings.
    pub async fn label_set(
        &self,
        labels: &[Label],
        admission: Admission,
    ) -> Result<LabelSet, EngineError> {
        let per_label: Vec<Vec<String>> = labels.iter().map(Label::prototype_texts).collect();
        let all: Vec<String> = per_label.iter().flatten().cloned().collect();
        let embs = self.embed(&all, admission).await?;
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
        })
    }

    /// The default taxonomy's label set, computed once.
    pub async fn default_label_set(&self) -> Result<LabelSet, EngineError> {
        if let Some(s) = self
            .default_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(s);
        }
        let labels = match &self.models.topics {
            Some(t) => t.default_labels.clone(),
            None => return Err(EngineError::NoModel("topic")),
        };
        let set = self.label_set(&labels, Admission::Wait).await?;
        *self
            .default_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(set.clone());
        Ok(set)
    }

    /// Analyzes one article: tokenizes it (off the async runtime), queues its windows, and
    /// decodes the outputs. `labels` = `None` uses the default taxonomy.
    pub async fn analyze(
        &self,
        article: Article,
        labels: Option<&[Label]>,
        admission: Admission,
    ) -> Result<(Analysis, Timing), EngineError> {
        if article.options.entities && self.models.ner.is_none() {
            return Err(EngineError::NoModel("entity"));
        }
        if article.options.topics && self.models.topics.is_none() {
            return Err(EngineError::NoModel("topic"));
        }
        let label_set = if article.options.topics {
            Some(match labels {
                Some(l) if !l.is_empty() => self.label_set(l, admission).await?,
                _ => self.default_label_set().await?,
            })
        } else {
            None
        };
        let models = self.models.clone();
        let prepared = tokio::task::spawn_blocking(move || models.prepare(article))
            .await
            .map_err(|e| EngineError::Tokenize(e.to_string()))?
            .map_err(|e| EngineError::Tokenize(e.to_string()))?;
        let prepared = Arc::new(prepared);
        let cost = prepared.cost();
        let (out, timing) = if cost == 0 {
            (Outputs::default(), Timing::default())
        } else {
            self.submit(Work::Article(prepared.clone()), cost, admission)
                .await?
        };
        let models = self.models.clone();
        let analysis =
            tokio::task::spawn_blocking(move || models.finish(&prepared, &out, label_set.as_ref()))
                .await
                .map_err(|e| EngineError::Model(e.to_string()))?;
        Ok((analysis, timing))
    }
}
