//! The batcher thread: takes jobs off the queue, packs their rows into forward passes by a
//! token budget, runs the models and routes the outputs back.
//!
//! It runs on a dedicated OS thread, never on tokio's workers: a forward pass holds the CPU
//! for milliseconds to seconds and would stall every connection the runtime serves.

use super::{EngineConfig, EngineError, EngineStats, Job, Timing, Work};
use crate::pipeline::analysis::{Models, Outputs};
use crate::pipeline::batch::Row;
use crate::pipeline::{embeddings, token_probs};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which model a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ner,
    Topics,
}

/// The rows of `work` for `target`, in output order.
fn rows_of(work: &Work, target: Target) -> Vec<Row<'_>> {
    match (work, target) {
        (Work::Article(p), Target::Ner) => p.ner_rows(),
        (Work::Article(p), Target::Topics) => p.topic_rows(),
        (Work::Texts(t), Target::Topics) => t
            .iter()
            .map(|t| Row {
                ids: &t.ids,
                casing: &t.casing,
            })
            .collect(),
        (Work::Texts(_), Target::Ner) => Vec::new(),
    }
}

/// Groups rows (sorted by length) into batches whose padded size stays within `budget`
/// tokens; each batch holds at least one row. Returns index ranges into `lens`.
pub fn pack(lens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let mut end = start + 1;
        let mut longest = lens[start] + 2;
        while end < lens.len() {
            let l = longest.max(lens[end] + 2);
            if l * (end - start + 1) > budget {
                break;
            }
            longest = l;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Milliseconds of virtual deadline per token of a job's cost: about the rate at which the
/// default models get through work on two cores (10 tokens per ms). See [`run`].
const DEADLINE_TOKENS_PER_MS: u64 = 10;

/// A job being worked on: its outputs fill up row by row over one or more slices.
struct Active {
    job: Job,
    /// Arrival plus cost at [`DEADLINE_TOKENS_PER_MS`]: the scheduling order.
    deadline: Instant,
    /// Padded length of each row, NER rows first, then topic rows.
    lens: Vec<usize>,
    ner_rows: usize,
    /// Rows handed to a slice so far (a prefix of `lens`).
    scheduled: usize,
    out: Outputs,
    /// When its first slice started.
    started: Option<Instant>,
    /// Time of the slices it took part in.
    inference: Duration,
}

impl Active {
    fn new(job: Job) -> Self {
        let deadline =
            job.enqueued + Duration::from_micros(job.cost as u64 * 1000 / DEADLINE_TOKENS_PER_MS);
        let ner = rows_of(&job.work, Target::Ner);
        let topics = rows_of(&job.work, Target::Topics);
        let out = Outputs {
            ner: vec![Vec::new(); ner.len()],
            topics: vec![Vec::new(); topics.len()],
        };
        let lens = ner.iter().chain(&topics).map(|r| r.ids.len() + 2).collect();
        let ner_rows = ner.len();
        drop((ner, topics));
        Self {
            job,
            deadline,
            lens,
            ner_rows,
            scheduled: 0,
            out,
            started: None,
            inference: Duration::ZERO,
        }
    }

    /// Row `i` of the job (NER rows first, then topic rows) and where its output goes.
    fn target(&self, i: usize) -> (Target, usize) {
        if i < self.ner_rows {
            (Target::Ner, i)
        } else {
            (Target::Topics, i - self.ner_rows)
        }
    }
}

/// The thread's body: runs until every [`super::Engine`] handle is dropped.
///
/// Scheduling: when idle it waits for a job, then up to `max_wait` for more to batch with it.
/// Work runs in slices of at most `slice_tokens` tokens of rows, taken from the pending jobs
/// in order of their virtual deadline (arrival + cost / rate); a job is answered as soon as
/// the slice holding its last row is done, and between slices whatever arrived meanwhile
/// joins in. So a short article waits for at most one slice of other work, never for the
/// whole of a long article that came before it, and a long article is put off by at most its
/// own cost's worth of time (no starvation).
pub fn run(models: Arc<Models>, rx: Receiver<Job>, cfg: EngineConfig, stats: &EngineStats) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        if active.is_empty() {
            let Ok(first) = rx.recv() else { break };
            let until = Instant::now() + cfg.max_wait;
            let mut tokens = first.cost;
            active.push(Active::new(first));
            while tokens < cfg.max_batch_tokens {
                let left = until.saturating_duration_since(Instant::now());
                match rx.try_recv().or_else(|_| rx.recv_timeout(left)) {
                    Ok(job) => {
                        tokens += job.cost;
                        active.push(Active::new(job));
                    }
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        } else {
            active.extend(rx.try_iter().map(Active::new));
        }
        // Callers that went away (cancelled, deadline passed) cost no more forward passes.
        let before = active.len();
        active.retain(|a| !a.job.reply.is_closed());
        let dropped = before - active.len();
        if dropped > 0 {
            metrics::counter!("tidings_jobs_dropped_total").increment(dropped as u64);
            stats
                .dropped_jobs
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        active.sort_by_key(|a| a.deadline);
        run_slice(&models, &mut active, &cfg, stats);
        // Answer the jobs that are complete.
        let mut i = 0;
        while i < active.len() {
            if active[i].scheduled == active[i].lens.len() {
                let a = active.remove(i);
                let timing = Timing {
                    queue: a
                        .started
                        .unwrap_or(a.job.enqueued)
                        .saturating_duration_since(a.job.enqueued),
                    inference: a.inference,
                };
                answer(a.job, Ok((a.out, timing)));
            } else {
                i += 1;
            }
        }
    }
    tracing::debug!("batcher stopped: all engine handles dropped");
}

/// Sends a job its answer. Its queue room is given back first, so that a caller holding its
/// answer also sees the room.
fn answer(job: Job, result: Result<(Outputs, Timing), EngineError>) {
    drop(job.permit);
    let _ = job.reply.send(result);
}

/// How many of `lens` (in run order) form the next slice: as many as fit in `budget`
/// tokens, at least one.
pub fn slice_len(lens: &[usize], budget: usize) -> usize {
    fitting(lens, budget).max(lens.len().min(1))
}

/// How many of `lens`, from the first, fit in `budget` tokens together.
fn fitting(lens: &[usize], budget: usize) -> usize {
    let mut total = 0;
    lens.iter()
        .take_while(|&&l| {
            total += l;
            total <= budget
        })
        .count()
}

/// Runs the next slice of rows of `active` (sorted by deadline) and stores their outputs.
/// A failed forward pass fails every job with a row in it (they are answered and removed).
fn run_slice(models: &Models, active: &mut Vec<Active>, cfg: &EngineConfig, stats: &EngineStats) {
    // (job, first row, end row) taken by this slice.
    let mut taken: Vec<(usize, usize, usize)> = Vec::new();
    let mut budget = cfg.slice_tokens;
    for (j, a) in active.iter().enumerate() {
        let left = &a.lens[a.scheduled..];
        if left.is_empty() {
            continue;
        }
        // The first job always gets a row in; later ones only what fits. No job takes more
        // than half a slice, so a long article runs in parts between shorter work.
        let n = if taken.is_empty() {
            slice_len(left, budget.min(cfg.slice_tokens / 2))
        } else {
            fitting(left, budget.min(cfg.slice_tokens / 2))
        };
        if n == 0 {
            break;
        }
        budget = budget.saturating_sub(left[..n].iter().sum());
        taken.push((j, a.scheduled, a.scheduled + n));
        if budget == 0 {
            break;
        }
    }
    if taken.is_empty() {
        return;
    }
    let started = Instant::now();
    let tokens: usize = taken
        .iter()
        .map(|&(j, a, b)| active[j].lens[a..b].iter().sum::<usize>())
        .sum();
    let result = run_rows(models, active, &taken, cfg.max_batch_tokens);
    let elapsed = started.elapsed();
    metrics::histogram!("tidings_forward_seconds").record(elapsed.as_secs_f64());
    metrics::histogram!("tidings_batch_items").record(taken.len() as f64);
    metrics::histogram!("tidings_batch_tokens").record(tokens as f64);
    metrics::counter!("tidings_tokens_total").increment(tokens as u64);
    match result {
        Ok(()) => {
            let rows: usize = taken.iter().map(|&(_, first, end)| end - first).sum();
            stats.rows_run.fetch_add(rows as u64, Ordering::Relaxed);
            for &(j, _, end) in &taken {
                let a = &mut active[j];
                a.scheduled = end;
                a.started.get_or_insert(started);
                a.inference += elapsed;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "forward pass failed");
            let mut failed: Vec<usize> = taken.iter().map(|t| t.0).collect();
            failed.sort_unstable();
            for j in failed.into_iter().rev() {
                answer(active.remove(j).job, Err(EngineError::Model(e.to_string())));
            }
        }
    }
}

/// Runs the `taken` rows `(job, first, end)` through their models in length-sorted,
/// budget-sized batches and stores the outputs in their jobs.
fn run_rows(
    models: &Models,
    active: &mut [Active],
    taken: &[(usize, usize, usize)],
    budget: usize,
) -> candle_core::Result<()> {
    for target in [Target::Ner, Target::Topics] {
        // (job, output index, row)
        let mut slots: Vec<(usize, usize, Row)> = Vec::new();
        for &(j, first, end) in taken {
            let a = &active[j];
            let rows = rows_of(&a.job.work, target);
            for i in first..end {
                let (t, index) = a.target(i);
                if t == target {
                    slots.push((j, index, rows[index]));
                }
            }
        }
        if slots.is_empty() {
            continue;
        }
        slots.sort_by_key(|s| s.2.ids.len());
        let lens: Vec<usize> = slots.iter().map(|s| s.2.ids.len()).collect();
        let mut results: Vec<(usize, usize, Vec<f32>)> = Vec::with_capacity(slots.len());
        for range in pack(&lens, budget) {
            let rows: Vec<Row> = slots[range.clone()].iter().map(|s| s.2).collect();
            let outs = match target {
                Target::Ner => {
                    let ner = models
                        .ner
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("no NER model".into()))?;
                    token_probs(&ner.model, &rows, ner.specials, &models.device)?
                }
                Target::Topics => {
                    let tm = models
                        .topics
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("no topic model".into()))?;
                    embeddings(&tm.model, &rows, tm.specials, &models.device)?
                }
            };
            results.extend(slots[range].iter().zip(outs).map(|(s, o)| (s.0, s.1, o)));
        }
        drop(slots);
        for (j, index, o) in results {
            let out = &mut active[j].out;
            match target {
                Target::Ner => out.ner[index] = o,
                Target::Topics => out.topics[index] = o,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_respects_budget_and_keeps_order() {
        // Sorted lengths; +2 special tokens each.
        let lens = [3, 3, 8, 8, 8, 30];
        let p = pack(&lens, 30);
        assert_eq!(p, vec![0..3, 3..5, 5..6]);
        for r in &p {
            let longest = lens[r.clone()].iter().max().unwrap() + 2;
            assert!(longest * r.len() <= 30 || r.len() == 1);
        }
        // A row longer than the budget still gets a batch of its own.
        assert_eq!(pack(&[100], 10), vec![0..1]);
        assert!(pack(&[], 10).is_empty());
    }

    #[test]
    fn slices_fill_their_budget_and_hold_at_least_one_job() {
        assert_eq!(slice_len(&[60, 70, 90, 900], 1024), 3);
        assert_eq!(slice_len(&[300, 300, 300, 300], 1024), 3);
        // A job over the budget still runs, alone.
        assert_eq!(slice_len(&[5000, 10], 1024), 1);
        assert_eq!(slice_len(&[1, 1, 1], 2), 2);
        assert_eq!(slice_len(&[], 1024), 0);
    }
}
