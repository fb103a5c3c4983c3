//! Admission: queue room counted in padded tokens, in one pool per [`Class`], and the
//! reservations that hold it until work is answered.
//!
//! Unary calls and streams draw on separate pools of `max_queue_tokens` each, so a batch
//! job's backlog can never make an interactive call RESOURCE_EXHAUSTED. A request is admitted
//! on an estimate of its cost *before* any work is done for it (tokenizing 200k characters,
//! embedding new labels); the estimate is trued up as its jobs become known
//! ([`Budget::take`]). A batch request whose estimate fell short gives back what it holds
//! before it waits for the whole amount, so requests never wait while holding room (no
//! hold-and-wait deadlock between streams).

use super::EngineError;
use parking_lot::Mutex;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The kind of caller work comes from: it picks the pool the work is admitted from and its
/// place in the batcher's slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Unary calls: admitted at once or refused with [`EngineError::QueueFull`]; their rows
    /// run first, up to their share of each slice while batch work waits.
    Interactive,
    /// Streams and local jobs: wait for room (back-pressure) and run in what interactive
    /// work leaves.
    Batch,
}

/// Who asked: the class of its work, and an id the batcher shares slices out by, so that
/// one caller's many jobs (a stream, an AnalyzeBatch call) take turns with other callers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Its class.
    pub class: Class,
    /// Distinct for each call (each unary call, each stream).
    pub id: u64,
}

/// The two pools of queue room.
#[derive(Debug)]
pub(crate) struct Pools {
    interactive: Arc<Semaphore>,
    batch: Arc<Semaphore>,
    /// Room in each pool.
    pub(crate) limit: usize,
    /// Held while the gauges are read and set, so that an older reading never overwrites a
    /// newer one (the batcher thread and the runtime's threads publish at once).
    publishing: parking_lot::Mutex<()>,
}

impl Pools {
    /// Two pools of `limit` tokens each.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            interactive: Arc::new(Semaphore::new(limit)),
            batch: Arc::new(Semaphore::new(limit)),
            limit,
            publishing: parking_lot::Mutex::new(()),
        }
    }

    fn pool(&self, class: Class) -> &Arc<Semaphore> {
        match class {
            Class::Interactive => &self.interactive,
            Class::Batch => &self.batch,
        }
    }

    /// Tokens admitted and not yet answered, in `class`'s pool.
    pub(crate) fn queued_in(&self, class: Class) -> usize {
        self.limit - self.pool(class).available_permits()
    }

    /// Tokens admitted and not yet answered, in both pools.
    pub(crate) fn queued(&self) -> usize {
        self.queued_in(Class::Interactive) + self.queued_in(Class::Batch)
    }

    /// Sets the `tidings_queue_tokens` gauge: called at every change, so that it reads 0
    /// when the server is idle.
    fn publish(&self) {
        let _one_at_a_time = self.publishing.lock();
        metrics::gauge!("tidings_queue_tokens").set(self.queued() as f64);
        for class in [Class::Interactive, Class::Batch] {
            metrics::gauge!("tidings_queue_tokens_by_class", "class" => class.name())
                .set(self.queued_in(class) as f64);
        }
    }

    /// `n` tokens from `class`'s pool at once, or QueueFull, whatever the class.
    fn try_acquire(&self, class: Class, n: usize) -> Result<OwnedSemaphorePermit, EngineError> {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        let permit = self
            .pool(class)
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|e| match e {
                TryAcquireError::Closed => EngineError::Stopped,
                TryAcquireError::NoPermits => EngineError::QueueFull { limit: self.limit },
            });
        self.publish();
        permit
    }

    /// `n` tokens from `class`'s pool: at once or QueueFull (interactive), or when there is
    /// room (batch).
    async fn acquire(
        self: &Arc<Self>,
        class: Class,
        n: usize,
    ) -> Result<OwnedSemaphorePermit, EngineError> {
        let pool = self.pool(class).clone();
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        match class {
            // Also publishes after a refusal: room a caller gave back before asking may have
            // changed the gauge.
            Class::Interactive => self.try_acquire(class, n as usize),
            Class::Batch => {
                let permit = pool
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| EngineError::Stopped);
                self.publish();
                permit
            }
        }
    }
}

impl Class {
    /// The class's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }
}

/// Queue room held by one queued job; given back, and the gauge updated, when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    pools: Arc<Pools>,
}

impl Reservation {
    /// `n` tokens of `class`'s pool taken at once, or refused with
    /// [`EngineError::QueueFull`]: for work the engine does on its own account (a topic
    /// refinement) inside a request that holds room already, which must never wait for more
    /// (waiting while holding is how pools deadlock).
    pub(crate) fn try_take(
        pools: &Arc<Pools>,
        class: Class,
        n: usize,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            permit: Some(pools.try_acquire(class, n)?),
            pools: pools.clone(),
        })
    }
}

#[cfg(test)]
impl Reservation {
    /// Room that holds nothing, for the batcher's tests (which admit no requests).
    pub(crate) fn unmetered() -> Self {
        Self {
            permit: None,
            pools: Arc::new(Pools::new(1)),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.pools.publish();
    }
}

/// Queue room held by one request: its estimate at admission, out of which its jobs take
/// their exact room. What is left goes back when the budget is dropped.
#[derive(Debug)]
pub(crate) struct Budget {
    pools: Arc<Pools>,
    class: Class,
    held: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Budget {
    /// Admits a request before any work is done for it: `labels` tokens of label work (an
    /// upper bound, [`label_tokens`]) that must fit in the pool, or it is refused with
    /// [`EngineError::TooLarge`], plus an `article` estimate capped at what the pool holds
    /// beyond the labels (the article's exact cost is taken, and checked against the pool,
    /// once it is tokenized: [`Budget::take`]). At once or refused (interactive), or once
    /// there is room (batch).
    pub(crate) async fn admit(
        pools: &Arc<Pools>,
        class: Class,
        labels: usize,
        article: usize,
    ) -> Result<Self, EngineError> {
        let limit = pools.limit;
        if labels > limit {
            return Err(EngineError::LabelsTooLarge {
                cost: labels,
                limit,
            });
        }
        let permit = pools
            .acquire(class, labels + article.min(limit - labels))
            .await?;
        Ok(Self {
            pools: pools.clone(),
            class,
            held: Mutex::new(Some(permit)),
        })
    }

    /// `n` tokens of room for one job: split from what the request holds, topped up from its
    /// pool when the estimate fell short.
    pub(crate) async fn take(&self, n: usize) -> Result<Reservation, EngineError> {
        let limit = self.pools.limit;
        if n > limit {
            return Err(EngineError::TooLarge { cost: n, limit });
        }
        let n = n.max(1);
        let held = match self.split(n) {
            Ok(part) => return Ok(part),
            Err(held) => held,
        };
        let permit = match self.class {
            Class::Interactive => {
                let have = held.as_ref().map_or(0, |p| p.num_permits());
                let mut more = self.pools.acquire(self.class, n - have).await?;
                if let Some(h) = held {
                    more.merge(h);
                }
                more
            }
            Class::Batch => {
                // Never wait while holding room: give it back, then wait for the whole.
                drop(held);
                self.pools.publish();
                self.pools.acquire(self.class, n).await?
            }
        };
        Ok(self.reservation(permit))
    }

    /// `n` tokens of room for a label text, without ever waiting: from what the request
    /// holds (its admission counted an upper bound of its label work, so the room is
    /// normally there), else topped up from the pool at once or refused with
    /// [`EngineError::QueueFull`]. A label text's computation may be shared with other
    /// requests that wait on it, so it must not wait for room while they hold theirs (that
    /// could deadlock the pool); and it never runs on room the queue did not grant.
    pub(crate) fn take_now(&self, n: usize) -> Result<Reservation, EngineError> {
        let n = n.max(1);
        let held = match self.split(n) {
            Ok(part) => return Ok(part),
            Err(held) => held,
        };
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        let mut more = match self.pools.try_acquire(self.class, n - have) {
            Ok(p) => p,
            Err(e) => {
                // Keep what the request held for its other work.
                *self.held.lock() = held;
                return Err(e);
            }
        };
        if let Some(h) = held {
            more.merge(h);
        }
        Ok(self.reservation(more))
    }

    /// `n` tokens split from what the request holds, or (when it holds fewer) all it holds,
    /// taken out of the budget.
    fn split(&self, n: usize) -> Result<Reservation, Option<OwnedSemaphorePermit>> {
        let mut held = self.held.lock();
        match held.as_mut().and_then(|p| p.split(n)) {
            Some(part) => Ok(self.reservation(part)),
            None => Err(held.take()),
        }
    }

    fn reservation(&self, permit: OwnedSemaphorePermit) -> Reservation {
        Reservation {
            permit: Some(permit),
            pools: self.pools.clone(),
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        let held = self.held.get_mut().take();
        if held.is_some() {
            drop(held);
            self.pools.publish();
        }
    }
}

/// Padded tokens an estimate counts for `chars` characters read in windows of `size`
/// pieces overlapping by `overlap`: three characters a piece (English averages four to
/// five, so this is high), plus the overlaps and two special tokens per window.
pub(crate) fn estimate_tokens(chars: usize, size: usize, overlap: usize) -> usize {
    if chars == 0 {
        return 0;
    }
    let pieces = chars / 3 + 1;
    let stride = size.saturating_sub(overlap).max(1);
    let windows = pieces.saturating_sub(overlap).div_ceil(stride).max(1);
    pieces + (windows - 1) * overlap + 2 * windows
}

/// Most padded tokens one label text can cost when read as a single row of at most `size`
/// pieces: no tokenizer makes more pieces than the text has UTF-8 bytes (a WordPiece or BPE
/// piece covers at least one byte; SentencePiece may add one leading `▁`), plus the two
/// special tokens. An upper bound, not an estimate: the 3-characters-a-piece estimate of
/// articles counts 31 pieces for 85 `!` (87 pieces) and far too few for CJK (issue #30).
pub(crate) fn label_tokens(text: &str, size: usize) -> usize {
    (text.len() + 1).min(size) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budgets_split_top_up_and_give_back() {
        let pools = Arc::new(Pools::new(100));
        let b = Budget::admit(&pools, Class::Interactive, 0, 30)
            .await
            .unwrap();
        assert_eq!(pools.queued(), 30);
        let r1 = b.take(10).await.unwrap();
        // Short of the estimate: topped up from the pool.
        let r2 = b.take(50).await.unwrap();
        assert_eq!(pools.queued(), 60);
        drop(b);
        assert_eq!(pools.queued(), 60);
        drop((r1, r2));
        assert_eq!(pools.queued(), 0);
        // Interactive admission is refused at once when the pool is full; batch is not
        // touched by it.
        let all = Budget::admit(&pools, Class::Interactive, 0, 100)
            .await
            .unwrap();
        let e = Budget::admit(&pools, Class::Interactive, 0, 1)
            .await
            .unwrap_err();
        assert!(matches!(e, EngineError::QueueFull { limit: 100 }));
        let batch = Budget::admit(&pools, Class::Batch, 0, 100).await.unwrap();
        assert_eq!(pools.queued_in(Class::Batch), 100);
        assert!(matches!(
            all.take(101).await.unwrap_err(),
            EngineError::TooLarge { cost: 101, .. }
        ));
        drop((all, batch));
        assert_eq!(pools.queued(), 0);
    }

    /// Issue #30: label work over the pool is refused instead of being capped to it, an
    /// article estimate is capped to what the labels leave, and label texts never run on
    /// room the pool did not grant.
    #[tokio::test]
    async fn label_work_stays_within_what_was_admitted() {
        let pools = Arc::new(Pools::new(100));
        for class in [Class::Interactive, Class::Batch] {
            let e = Budget::admit(&pools, class, 101, 0).await.unwrap_err();
            assert!(matches!(
                e,
                EngineError::LabelsTooLarge {
                    cost: 101,
                    limit: 100
                }
            ));
        }
        assert_eq!(pools.queued(), 0);
        // 60 of labels and a 500-token article estimate: the estimate takes the other 40.
        let b = Budget::admit(&pools, Class::Batch, 60, 500).await.unwrap();
        assert_eq!(pools.queued_in(Class::Batch), 100);
        let l1 = b.take_now(50).unwrap();
        let l2 = b.take_now(50).unwrap();
        // The pool is spent: a label text past it is refused at once, even for batch work,
        // and the request keeps nothing it did not hold.
        assert!(matches!(
            b.take_now(1).unwrap_err(),
            EngineError::QueueFull { limit: 100 }
        ));
        drop(l1);
        let l3 = b.take_now(30).unwrap();
        assert_eq!(pools.queued_in(Class::Batch), 80);
        drop((l2, l3, b));
        assert_eq!(pools.queued(), 0);
    }

    #[test]
    fn label_bounds_count_bytes() {
        // 85 '!' are 85 pieces (87 padded) for BERT's tokenizer: the bound holds them.
        assert_eq!(label_tokens(&"!".repeat(85), 254), 88);
        // Three bytes a CJK character, one piece each at most.
        assert_eq!(label_tokens("東京都", 254), 12);
        // A row is cut at the window.
        assert_eq!(label_tokens(&"a".repeat(2000), 254), 256);
    }

    #[test]
    fn estimates_count_windows() {
        assert_eq!(estimate_tokens(0, 254, 64), 0);
        // 300 chars: 101 pieces, one window.
        assert_eq!(estimate_tokens(300, 254, 64), 103);
        // 3000 chars: 1001 pieces in 5 windows of stride 190.
        assert_eq!(estimate_tokens(3000, 254, 64), 1001 + 4 * 64 + 10);
    }
}
