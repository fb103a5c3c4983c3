//! The batcher thread: takes jobs off the queue, packs their rows into forward passes by a
//! token budget, runs the models and routes the outputs back.
//!
//! It runs on a dedicated OS thread, never on tokio's workers: a forward pass holds the CPU
//! for milliseconds to seconds and would stall every connection the runtime serves.

use super::{EngineConfig, EngineError, Job, Timing, Work};
use crate::pipeline::analysis::{Models, Outputs};
use crate::pipeline::batch::Row;
use crate::pipeline::{embeddings, token_probs};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

/// Which model a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ner,
    Topics,
}

/// A row and where its output belongs: `(job, slot within the job's outputs)`.
struct Slot<'a> {
    job: usize,
    index: usize,
    row: Row<'a>,
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

/// The thread's body: runs until every [`super::Engine`] handle is dropped.
pub fn run(models: Arc<Models>, rx: Receiver<Job>, cfg: EngineConfig) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut tokens = jobs[0].cost;
        let until = Instant::now() + cfg.max_wait;
        while tokens < cfg.max_batch_tokens {
            let left = until.saturating_duration_since(Instant::now());
            match rx.try_recv().or_else(|_| rx.recv_timeout(left)) {
                Ok(job) => {
                    tokens += job.cost;
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Callers that went away (cancelled, deadline passed) cost no forward pass.
        let before = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        let dropped = before - jobs.len();
        if dropped > 0 {
            metrics::counter!("tidings_jobs_dropped_total").increment(dropped as u64);
        }
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        let result = run_jobs(&models, &jobs, cfg.max_batch_tokens);
        let inference = started.elapsed();
        metrics::histogram!("tidings_forward_seconds").record(inference.as_secs_f64());
        metrics::histogram!("tidings_batch_items").record(jobs.len() as f64);
        metrics::histogram!("tidings_batch_tokens").record(tokens as f64);
        metrics::counter!("tidings_tokens_total").increment(tokens as u64);
        match result {
            Ok(outputs) => {
                for (job, out) in jobs.into_iter().zip(outputs) {
                    let timing = Timing {
                        queue: started.saturating_duration_since(job.enqueued),
                        inference,
                    };
                    let _ = job.reply.send(Ok((out, timing)));
                    drop(job.permit);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for job in jobs {
                    let _ = job.reply.send(Err(EngineError::Model(e.to_string())));
                }
            }
        }
    }
    tracing::debug!("batcher stopped: all engine handles dropped");
}

/// Runs every row of `jobs` through its model in length-sorted, budget-sized batches.
fn run_jobs(models: &Models, jobs: &[Job], budget: usize) -> candle_core::Result<Vec<Outputs>> {
    let mut outputs: Vec<Outputs> = jobs
        .iter()
        .map(|j| match &j.work {
            Work::Article(p) => Outputs {
                ner: vec![Vec::new(); p.ner_windows.len()],
                topics: vec![Vec::new(); p.topic_rows().len()],
            },
            Work::Texts(t) => Outputs {
                ner: Vec::new(),
                topics: vec![Vec::new(); t.len()],
            },
        })
        .collect();
    for target in [Target::Ner, Target::Topics] {
        let mut slots: Vec<Slot> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let rows = match (&job.work, target) {
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
            };
            slots.extend(rows.into_iter().enumerate().map(|(index, row)| Slot {
                job: j,
                index,
                row,
            }));
        }
        if slots.is_empty() {
            continue;
        }
        slots.sort_by_key(|s| s.row.ids.len());
        let lens: Vec<usize> = slots.iter().map(|s| s.row.ids.len()).collect();
        for range in pack(&lens, budget) {
            let rows: Vec<Row> = slots[range.clone()].iter().map(|s| s.row).collect();
            let results = match target {
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
            for (slot, res) in slots[range].iter().zip(results) {
                let out = &mut outputs[slot.job];
                match target {
                    Target::Ner => out.ner[slot.index] = res,
                    Target::Topics => out.topics[slot.index] = res,
                }
            }
        }
    }
    Ok(outputs)
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
}
