//! The batcher thread: takes jobs off the queue, plans slices of rows (interactive first,
//! callers in turn), packs them into forward passes by a token budget, runs the models and
//! routes the outputs back.
//!
//! It runs on a dedicated OS thread, never on tokio's workers: a forward pass holds the CPU
//! for milliseconds to seconds and would stall every connection the runtime serves.
//!
//! It runs rows through a `RowModel`: the loaded models in a server, a stand-in in the
//! tests below, which check turns, shares, deadlines, cancellation and failed passes in
//! milliseconds. Each job's `queue` span ends when its first slice starts, and each slice is
//! an `inference` span in the trace of every job it ran ([`crate::trace`]).

use super::{Class, EngineConfig, EngineError, EngineStats, Job, Timing, Work};
use crate::pipeline::analysis::{Models, Outputs};
use crate::pipeline::batch::Row;
use crate::pipeline::{embeddings, token_probs, token_probs_and_embeddings};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which model a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// The NER model at this index of [`Models::ner_models`] (0: the default).
    Ner(usize),
    /// The topic model.
    Topics,
}

/// The NER model that tags `work` (an index into [`Models::ner_models`]; 0 for label texts,
/// which have no NER rows).
fn ner_model_of(work: &Work) -> usize {
    match work {
        Work::Article(p) => p.ner_model,
        Work::Texts(_) => 0,
    }
}

/// The rows of `work` for `target`, in output order.
fn rows_of(work: &Work, target: Target) -> Vec<Row<'_>> {
    match (work, target) {
        (Work::Article(p), Target::Ner(m)) if m == p.ner_model => p.ner_rows(),
        (Work::Article(p), Target::Topics) => p.topic_rows(),
        (Work::Texts(t), Target::Topics) => t.iter().map(Row::from).collect(),
        (_, Target::Ner(_)) => Vec::new(),
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
    /// Padded length of each row in scheduled tokens (a NER row's weighed by its model's
    /// `token_weight`), NER rows first, then topic rows.
    lens: Vec<usize>,
    ner_rows: usize,
    /// The NER model its NER rows go to.
    ner_model: usize,
    /// Where the outputs of topic rows start in `out.topics`: after the body windows' when
    /// the NER pass gives those ([`crate::pipeline::analysis::Prepared::topics_from_ner`]).
    topic_offset: usize,
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
        // Work in scheduled tokens: a heavier tagger's rows count for more (see
        // `analysis::token_weight`), in the deadline and in each slice's budget.
        let (work, ner_weight) = match &job.work {
            Work::Article(p) => (p.work(), p.ner_weight),
            Work::Texts(_) => (job.cost, 1),
        };
        let deadline =
            job.enqueued + Duration::from_micros(work as u64 * 1000 / DEADLINE_TOKENS_PER_MS);
        let ner_model = ner_model_of(&job.work);
        let ner = rows_of(&job.work, Target::Ner(ner_model));
        let topics = rows_of(&job.work, Target::Topics);
        let topic_offset = match &job.work {
            Work::Article(p) if p.topics_from_ner => ner.len(),
            _ => 0,
        };
        let out = Outputs {
            ner: vec![Vec::new(); ner.len()],
            topics: vec![Vec::new(); topic_offset + topics.len()],
        };
        let lens = ner
            .iter()
            .map(|r| (r.ids.len() + 2) * ner_weight)
            .chain(topics.iter().map(|r| r.ids.len() + 2))
            .collect();
        let ner_rows = ner.len();
        drop((ner, topics));
        Self {
            job,
            deadline,
            lens,
            ner_rows,
            ner_model,
            topic_offset,
            scheduled: 0,
            out,
            started: None,
            inference: Duration::ZERO,
        }
    }

    /// Rows not yet handed to a slice.
    fn pending(&self) -> &[usize] {
        &self.lens[self.scheduled..]
    }

    /// Row `i` of the job (NER rows first, then topic rows) and where its output goes.
    fn target(&self, i: usize) -> (Target, usize) {
        if i < self.ner_rows {
            (Target::Ner(self.ner_model), i)
        } else {
            (Target::Topics, i - self.ner_rows)
        }
    }
}

/// The thread's body: runs until every [`super::Engine`] handle is dropped.
///
/// Scheduling: when idle it waits for a job, then up to `max_wait` for more to batch with it.
/// Work runs in slices of at most `slice_tokens` tokens of rows ([`plan_slice`]); a job is
/// answered as soon as the slice holding its last row is done, and between slices whatever
/// arrived meanwhile joins in. So a short article waits for at most one slice of other work,
/// never for the whole of a long article that came before it, and a long article is put off
/// by at most its own cost's worth of time (no starvation).
pub(crate) fn run<M: RowModel + ?Sized>(
    models: Arc<M>,
    rx: Receiver<Job>,
    cfg: EngineConfig,
    stats: &EngineStats,
) {
    let mut active: Vec<Active> = Vec::new();
    // Interactive work's account of tokens (see `plan_shared`).
    let mut balance = 0i64;
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
        let plan = plan_slice(&active, &cfg, &mut balance);
        run_slice(&*models, &mut active, &plan, &cfg, stats);
        // Answer the jobs that are complete.
        let (done, pending): (Vec<Active>, Vec<Active>) =
            active.into_iter().partition(|a| a.pending().is_empty());
        active = pending;
        for a in done {
            let timing = Timing {
                queue: a
                    .started
                    .unwrap_or(a.job.enqueued)
                    .saturating_duration_since(a.job.enqueued),
                inference: a.inference,
            };
            answer(a.job, Ok((a.out, timing)));
        }
    }
    tracing::debug!("batcher stopped: all engine handles dropped");
}

/// Rows `rows` of job `job` (an index into the active jobs), taken by a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    /// Which job.
    pub job: usize,
    /// Which of its rows (NER rows first, then topic rows).
    pub rows: Range<usize>,
}

/// The order jobs get rows in: interactive before batch; within a class, callers in turn
/// (every caller's first pending job, then every caller's second, ...), each caller's jobs
/// by virtual deadline.
fn turn_order(active: &[Active]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..active.len()).collect();
    order.sort_by_key(|&j| (active[j].job.caller.class, active[j].deadline));
    let mut seen: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut turn = vec![0; active.len()];
    for &j in &order {
        let n = seen.entry(active[j].job.caller.id).or_default();
        turn[j] = *n;
        *n += 1;
    }
    order.sort_by_key(|&j| (active[j].job.caller.class, turn[j], active[j].deadline));
    order
}

/// Plans the next slice of at most `slice_tokens` tokens of rows.
///
/// Interactive rows come first, up to `interactive_room` tokens while batch work waits (and
/// then only rows that fit it); batch rows fill what is left (at least one row when the slice
/// is empty, however long); interactive rows then fill any room batch work left. No job
/// takes more than half a slice while another job of its class waits, so a long article
/// runs in parts between shorter work.
pub fn plan_slice_of(
    jobs: &[(Class, &[usize])],
    order: &[usize],
    slice_tokens: usize,
    interactive_room: usize,
) -> Vec<Take> {
    let batch_waits = jobs
        .iter()
        .any(|(c, lens)| *c == Class::Batch && !lens.is_empty());
    let interactive_room = if batch_waits {
        interactive_room
    } else {
        slice_tokens
    };
    let mut plan: Vec<Take> = Vec::new();
    let mut used = 0;
    let per_job = slice_tokens / 2;
    // A job may take more than half the slice when no other job of its class waits.
    let alone = |class: Class| {
        jobs.iter()
            .filter(|(c, lens)| *c == class && !lens.is_empty())
            .count()
            <= 1
    };
    let fill = |class: Class, room: usize, force: bool, plan: &mut Vec<Take>, used: &mut usize| {
        let per_job = if alone(class) { slice_tokens } else { per_job };
        let mut class_used = 0;
        for &j in order {
            let (c, lens) = jobs[j];
            if c != class {
                continue;
            }
            let taken = plan.iter().find(|t| t.job == j);
            let start = taken.map_or(0, |t| t.rows.end);
            let had: usize = taken.map_or(0, |t| lens[t.rows.clone()].iter().sum());
            let left = &lens[start..];
            if left.is_empty() {
                continue;
            }
            let budget = room
                .saturating_sub(class_used)
                .min(slice_tokens.saturating_sub(*used))
                .min(per_job.saturating_sub(had));
            let mut n = fitting(left, budget);
            if n == 0 && *used == 0 && force {
                n = 1;
            }
            if n == 0 {
                continue;
            }
            let tokens: usize = left[..n].iter().sum();
            class_used += tokens;
            *used += tokens;
            match plan.iter_mut().find(|t| t.job == j) {
                Some(t) => t.rows.end += n,
                None => plan.push(Take {
                    job: j,
                    rows: start..start + n,
                }),
            }
            if *used >= slice_tokens || class_used >= room {
                break;
            }
        }
    };
    // While batch work waits, interactive rows take only the room they have earned: no row
    // is forced in (issue #30: one forced row a slice gave interactive work half of every
    // slice with 256-token rows, and all of it with 510-token windows).
    fill(
        Class::Interactive,
        interactive_room,
        !batch_waits,
        &mut plan,
        &mut used,
    );
    fill(Class::Batch, slice_tokens, true, &mut plan, &mut used);
    fill(
        Class::Interactive,
        slice_tokens,
        false,
        &mut plan,
        &mut used,
    );
    plan
}

/// [`plan_slice_of`] over the active jobs; the takes' rows are offsets into each job's rows.
fn plan_slice(active: &[Active], cfg: &EngineConfig, balance: &mut i64) -> Vec<Take> {
    let jobs: Vec<(Class, &[usize])> = active
        .iter()
        .map(|a| (a.job.caller.class, a.pending()))
        .collect();
    let order = turn_order(active);
    plan_shared(&jobs, &order, cfg.slice_tokens, cfg.batch_share, balance)
        .into_iter()
        .map(|t| Take {
            job: t.job,
            rows: active[t.job].scheduled + t.rows.start..active[t.job].scheduled + t.rows.end,
        })
        .collect()
}

/// Plans one slice while sharing the model between the classes by tokens (deficit round
/// robin). `balance` is interactive work's account: every token of batch rows run while
/// interactive work waits earns it `(1 - batch_share) / batch_share` tokens, every token of
/// its own rows run while batch work waits costs one, and its rows take only what the
/// account holds (it may go into debt by filling room batch work could not use). So over any
/// stretch where both wait, batch work gets `batch_share` of the tokens run, whatever the
/// length of the rows (issue #30). While only batch work waits, the account fills up to one
/// slice, so interactive calls arriving together start at once; it is capped at one slice
/// each way. Slices keep their length while both wait: halving them (as before) cost ~15% of
/// the machine's throughput in smaller passes, which both classes then lacked
/// (`bench/isolation.sh` on a 2-core Xeon, short articles: batch kept 0.58 with half slices,
/// 0.88 without, unary p99 3.49x and 2.94x its idle p99).
pub fn plan_shared(
    jobs: &[(Class, &[usize])],
    order: &[usize],
    slice_tokens: usize,
    batch_share: f32,
    balance: &mut i64,
) -> Vec<Take> {
    let waits = |class| jobs.iter().any(|(c, lens)| *c == class && !lens.is_empty());
    let (batch_waits, interactive_waits) = (waits(Class::Batch), waits(Class::Interactive));
    let both = batch_waits && interactive_waits;
    let room = usize::try_from(*balance).unwrap_or(0);
    let plan = plan_slice_of(jobs, order, slice_tokens, room);
    let tokens = |class: Class| -> i64 {
        plan.iter()
            .filter(|t| jobs[t.job].0 == class)
            .map(|t| jobs[t.job].1[t.rows.clone()].iter().sum::<usize>() as i64)
            .sum()
    };
    let share = f64::from(batch_share.clamp(0.05, 1.0));
    let rate = (1.0 - share) / share;
    let cap = slice_tokens as i64;
    if both {
        let earned = (tokens(Class::Batch) as f64 * rate).round() as i64;
        *balance = (*balance + earned - tokens(Class::Interactive)).clamp(-cap, cap);
    } else if batch_waits {
        let earned = (tokens(Class::Batch) as f64 * rate).round() as i64;
        *balance = (*balance + earned).min(cap);
    }
    plan
}

/// Sends a job its answer. Its queue room is given back first, so that a caller holding its
/// answer also sees the room.
fn answer(job: Job, result: Result<(Outputs, Timing), EngineError>) {
    let Job { reply, room, .. } = job;
    drop(room);
    let _ = reply.send(result);
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

/// Runs the `plan`ned slice of rows of `active` and stores their outputs. A failed forward
/// pass fails every job with a row in it (they are answered and removed).
fn run_slice<M: RowModel + ?Sized>(
    models: &M,
    active: &mut Vec<Active>,
    plan: &[Take],
    cfg: &EngineConfig,
    stats: &EngineStats,
) {
    if plan.is_empty() {
        return;
    }
    let started = Instant::now();
    let tokens: usize = plan
        .iter()
        .map(|t| active[t.job].lens[t.rows.clone()].iter().sum::<usize>())
        .sum();
    // Each job's time in the queue ends with its first slice; the slice is an `inference`
    // span in each job's trace.
    let spans: Vec<tracing::Span> = plan
        .iter()
        .map(|t| {
            let job = &mut active[t.job].job;
            drop(std::mem::replace(&mut job.queued, tracing::Span::none()));
            tracing::info_span!(
                parent: &job.span,
                "inference",
                rows = t.rows.len(),
                slice_tokens = tokens,
                slice_jobs = plan.len()
            )
        })
        .collect();
    let result = run_rows(models, active, plan, cfg.max_batch_tokens);
    let elapsed = started.elapsed();
    drop(spans);
    metrics::histogram!("tidings_forward_seconds").record(elapsed.as_secs_f64());
    metrics::histogram!("tidings_batch_items").record(plan.len() as f64);
    metrics::histogram!("tidings_batch_tokens").record(tokens as f64);
    metrics::counter!("tidings_tokens_total").increment(tokens as u64);
    match result {
        Ok(()) => {
            let rows: usize = plan.iter().map(|t| t.rows.len()).sum();
            stats.rows_run.fetch_add(rows as u64, Ordering::Relaxed);
            for t in plan {
                let a = &mut active[t.job];
                tracing::debug!(
                    parent: &a.job.span,
                    rows = t.rows.len(),
                    row_tokens = a.lens[t.rows.clone()].iter().sum::<usize>(),
                    slice_tokens = tokens,
                    slice_jobs = plan.len(),
                    slice_ms = elapsed.as_secs_f64() * 1e3,
                    left = a.lens.len() - t.rows.end,
                    "rows run"
                );
                a.scheduled = t.rows.end;
                a.started.get_or_insert(started);
                a.inference += elapsed;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "forward pass failed");
            let mut failed: Vec<usize> = plan.iter().map(|t| t.job).collect();
            failed.sort_unstable();
            for j in failed.into_iter().rev() {
                answer(active.remove(j).job, Err(EngineError::Model(e.to_string())));
            }
        }
    }
}

/// What the batcher runs rows through: the loaded [`Models`], or a stand-in that lets the
/// scheduler's rules (turns, shares, deadlines, cancellation, failures) be tested in
/// milliseconds without weights (see the tests below).
pub(crate) trait RowModel: Send + Sync {
    /// Tag probabilities of each NER row (`[len, labels]` row-major) by the NER model at
    /// index `model` ([`Models::ner_models`]), with the row's pooled topic embedding from
    /// the same pass when `pooled`.
    fn ner(
        &self,
        model: usize,
        rows: &[Row<'_>],
        pooled: bool,
    ) -> candle_core::Result<Vec<RowOutput>>;
    /// Topic embedding of each row.
    fn topics(&self, rows: &[Row<'_>]) -> candle_core::Result<Vec<Vec<f32>>>;
}

/// A NER row's output: its tag probabilities, and its topic embedding when asked for.
pub(crate) type RowOutput = (Vec<f32>, Option<Vec<f32>>);

impl RowModel for Models {
    fn ner(
        &self,
        model: usize,
        rows: &[Row<'_>],
        pooled: bool,
    ) -> candle_core::Result<Vec<RowOutput>> {
        let ner = self
            .ner_model(model)
            .ok_or_else(|| candle_core::Error::Msg(format!("no NER model {model}")))?;
        Ok(if pooled {
            token_probs_and_embeddings(&ner.model, rows, ner.specials, &self.device)?
                .into_iter()
                .map(|(p, e)| (p, Some(e)))
                .collect()
        } else {
            token_probs(&ner.model, rows, ner.specials, &self.device)?
                .into_iter()
                .map(|p| (p, None))
                .collect()
        })
    }

    fn topics(&self, rows: &[Row<'_>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let tm = self
            .topics
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no topic model".into()))?;
        embeddings(&tm.model, rows, tm.specials, &self.device)
    }
}

/// A row's outputs: (job, output index, output, topic embedding from the NER pass).
type RowResult = (usize, usize, Vec<f32>, Option<Vec<f32>>);

/// The planned rows of `target`, as (job, output index, row), sorted by length.
fn slots_of<'a>(
    active: &'a [Active],
    plan: &[Take],
    target: Target,
) -> Vec<(usize, usize, Row<'a>)> {
    let mut slots = Vec::new();
    for take in plan {
        let a = &active[take.job];
        let rows = rows_of(&a.job.work, target);
        for i in take.rows.clone() {
            let (t, index) = a.target(i);
            if t == target {
                slots.push((take.job, index, rows[index]));
            }
        }
    }
    slots.sort_by_key(|s| s.2.ids.len());
    slots
}

/// The models the `plan`ned rows go to: each NER model with rows in it (by index), then the
/// topic model.
fn targets_of(active: &[Active], plan: &[Take]) -> Vec<Target> {
    let mut targets: Vec<Target> = plan
        .iter()
        .map(|t| &active[t.job])
        .filter(|a| a.ner_rows > 0)
        .map(|a| Target::Ner(a.ner_model))
        .collect();
    targets.sort_unstable();
    targets.dedup();
    targets.push(Target::Topics);
    targets
}

/// Runs the `plan`ned rows through their models (each NER model's rows through that model)
/// in length-sorted, budget-sized batches and stores the outputs in their jobs.
fn run_rows<M: RowModel + ?Sized>(
    models: &M,
    active: &mut [Active],
    plan: &[Take],
    budget: usize,
) -> candle_core::Result<()> {
    for target in targets_of(active, plan) {
        let slots = slots_of(active, plan, target);
        if slots.is_empty() {
            continue;
        }
        let lens: Vec<usize> = slots.iter().map(|s| s.2.ids.len()).collect();
        let mut results: Vec<RowResult> = Vec::with_capacity(slots.len());
        for range in pack(&lens, budget) {
            let rows: Vec<Row> = slots[range.clone()].iter().map(|s| s.2).collect();
            let outs: Vec<RowOutput> = match target {
                // One pass gives the topic embeddings of the jobs that want them.
                Target::Ner(model) => models.ner(
                    model,
                    &rows,
                    slots[range.clone()]
                        .iter()
                        .any(|s| active[s.0].topic_offset > 0),
                )?,
                Target::Topics => models
                    .topics(&rows)?
                    .into_iter()
                    .map(|e| (e, None))
                    .collect(),
            };
            results.extend(
                slots[range]
                    .iter()
                    .zip(outs)
                    .map(|(s, (o, e))| (s.0, s.1, o, e)),
            );
        }
        drop(slots);
        for (j, index, o, embedding) in results {
            let a = &mut active[j];
            match target {
                Target::Ner(_) => {
                    a.out.ner[index] = o;
                    if let (Some(e), true) = (embedding, a.topic_offset > 0) {
                        a.out.topics[index] = e;
                    }
                }
                Target::Topics => a.out.topics[a.topic_offset + index] = o,
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

    fn take(job: usize, rows: std::ops::Range<usize>) -> Take {
        Take { job, rows }
    }

    #[test]
    fn slices_fill_their_budget_and_hold_at_least_one_row() {
        use Class::{Batch, Interactive};
        let plan =
            |jobs: &[(Class, &[usize])], order: &[usize]| plan_slice_of(jobs, order, 1024, 256);
        // Alone, one class gets the whole slice, no job more than half of it.
        let a: &[usize] = &[60, 70, 90, 900];
        let b: &[usize] = &[300, 300, 300];
        assert_eq!(
            plan(&[(Batch, a), (Batch, b)], &[0, 1]),
            vec![take(0, 0..3), take(1, 0..1)]
        );
        // A row over the budget still runs, alone.
        assert_eq!(plan(&[(Batch, &[5000, 10])], &[0]), vec![take(0, 0..1)]);
        assert!(plan(&[(Batch, &[])], &[0]).is_empty());
        // Interactive rows first, up to a quarter while batch work waits; batch fills the
        // rest, its jobs in turn.
        let i: &[usize] = &[100; 8];
        let many: &[usize] = &[100; 10];
        assert_eq!(
            plan(
                &[(Batch, many), (Batch, many), (Interactive, i)],
                &[2, 0, 1]
            ),
            vec![take(2, 0..2), take(0, 0..5), take(1, 0..3)]
        );
        // Interactive rows then fill what batch work left (a lone job, all of it).
        let small: &[usize] = &[50];
        assert_eq!(
            plan(&[(Batch, small), (Interactive, i)], &[1, 0]),
            vec![take(1, 0..8), take(0, 0..1)]
        );
        // While batch work waits, an interactive row longer than the room it has earned
        // waits (issue #30); a lone batch job may take the whole slice.
        let long: &[usize] = &[258];
        assert_eq!(
            plan(
                &[(Interactive, long), (Interactive, long), (Batch, b)],
                &[0, 1, 2]
            ),
            vec![take(2, 0..3)]
        );
        // Without batch work, it runs however long.
        assert_eq!(
            plan_slice_of(&[(Interactive, &[5000])], &[0], 1024, 0),
            vec![take(0, 0..1)]
        );
    }

    /// Issue #30: while both classes wait, batch work gets its share of the tokens run
    /// whatever the rows' length; before, one interactive row forced into every slice took
    /// half of them with 256-token windows and all of them with 510-token ones.
    #[test]
    fn batch_keeps_its_share_with_long_rows() {
        for (row, share) in [(57, 0.7f32), (258, 0.7), (512, 0.7), (258, 0.5), (512, 0.9)] {
            let interactive = vec![row; 1 << 14];
            let batch = vec![row; 1 << 14];
            let (mut i_at, mut b_at, mut balance) = (0, 0, 0i64);
            for _ in 0..400 {
                let jobs = [
                    (Class::Interactive, &interactive[i_at..]),
                    (Class::Batch, &batch[b_at..]),
                ];
                for t in plan_shared(&jobs, &[0, 1], 1024, share, &mut balance) {
                    if t.job == 0 {
                        i_at += t.rows.end;
                    } else {
                        b_at += t.rows.end;
                    }
                }
            }
            let got = b_at as f32 / (b_at + i_at) as f32;
            assert!(
                (got - share).abs() < 0.04 && i_at > 0,
                "rows of {row}: batch got {got:.3} of the rows, its share is {share} \
                 ({b_at} batch, {i_at} interactive)"
            );
        }
    }

    /// The scheduler on its thread with a stand-in model: each row's ids all hold its job's
    /// tag, and the model logs every pass as (tag, row length) pairs, so the tests see which
    /// jobs shared which slice (with these sizes one slice is one pass).
    mod scheduler {
        use super::super::{run, RowModel, RowOutput};
        use crate::engine::admission::Reservation;
        use crate::engine::{
            Caller, Class, EngineConfig, EngineError, EngineStats, Job, Timing, Work,
        };
        use crate::pipeline::analysis::{Article, Options, Outputs, Prepared};
        use crate::pipeline::batch::Row;
        use crate::pipeline::tokens::Tokens;
        use crate::pipeline::windows::Window;
        use std::sync::mpsc::{channel, Sender};
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};
        use tokio::sync::oneshot;

        /// Tag of the rows the stand-in fails on.
        const FAILING: u32 = 99;

        #[derive(Default)]
        struct Fake {
            passes: Mutex<Vec<Vec<(u32, usize)>>>,
            /// The NER model of each NER pass, in order.
            models: Mutex<Vec<usize>>,
            /// Told the index of each pass as it starts.
            started: Mutex<Option<Sender<usize>>>,
            /// When set, each pass waits for a token from it before it ends, and runs freely
            /// once its sender is dropped: the tests decide what happens between passes,
            /// however slow the machine.
            gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        }

        impl Fake {
            /// A stand-in whose passes each wait for a token of the returned sender.
            fn gated() -> (Arc<Self>, Sender<()>, std::sync::mpsc::Receiver<usize>) {
                let (open, gate) = channel();
                let (started_tx, started) = channel();
                let fake = Self {
                    started: Mutex::new(Some(started_tx)),
                    gate: Mutex::new(Some(gate)),
                    ..Self::default()
                };
                (Arc::new(fake), open, started)
            }
        }

        impl RowModel for Fake {
            fn ner(
                &self,
                model: usize,
                rows: &[Row<'_>],
                _: bool,
            ) -> candle_core::Result<Vec<RowOutput>> {
                self.models.lock().unwrap().push(model);
                Ok(self.topics(rows)?.into_iter().map(|o| (o, None)).collect())
            }

            fn topics(&self, rows: &[Row<'_>]) -> candle_core::Result<Vec<Vec<f32>>> {
                let pass: Vec<(u32, usize)> =
                    rows.iter().map(|r| (r.ids[0], r.ids.len())).collect();
                let n = {
                    let mut passes = self.passes.lock().unwrap();
                    passes.push(pass.clone());
                    passes.len() - 1
                };
                if let Some(tx) = self.started.lock().unwrap().as_ref() {
                    let _ = tx.send(n);
                }
                if let Some(gate) = self.gate.lock().unwrap().as_ref() {
                    let _ = gate.recv();
                }
                if pass.iter().any(|&(tag, _)| tag == FAILING) {
                    return Err(candle_core::Error::Msg("the stand-in fails".into()));
                }
                Ok(rows.iter().map(|r| vec![r.ids[0] as f32]).collect())
            }
        }

        type Answer = oneshot::Receiver<Result<(Outputs, Timing), EngineError>>;

        /// A job of `rows` label texts of `len` pieces each (`len + 2` tokens a row).
        fn job(tag: u32, class: Class, caller: u64, rows: usize, len: usize) -> (Job, Answer) {
            let text = Tokens {
                ids: vec![tag; len],
                offsets: vec![(0, 0); len],
                casing: vec![0; len],
                words: vec![0; len],
            };
            let (reply, answer) = oneshot::channel();
            let job = Job {
                work: Work::Texts(vec![text; rows]),
                cost: rows * (len + 2),
                caller: Caller { class, id: caller },
                enqueued: Instant::now(),
                reply,
                room: Reservation::unmetered(),
                span: tracing::Span::none(),
                queued: tracing::Span::none(),
            };
            (job, answer)
        }

        /// An article job whose `rows` NER windows of `len` pieces each (ids all `tag`) go to
        /// the NER model at index `model`.
        fn ner_job(tag: u32, model: usize, rows: usize, len: usize) -> (Job, Answer) {
            weighed_ner_job(tag, model, 1, rows, len)
        }

        /// [`ner_job`] on a model whose tokens are `weight` tokens of work each.
        fn weighed_ner_job(
            tag: u32,
            model: usize,
            weight: usize,
            rows: usize,
            len: usize,
        ) -> (Job, Answer) {
            let n = rows * len;
            let tokens = Tokens {
                ids: vec![tag; n],
                offsets: vec![(0, 0); n],
                casing: vec![0; n],
                words: vec![0; n],
            };
            let prepared = Prepared {
                article: Article {
                    id: tag.to_string(),
                    text: String::new(),
                    title: String::new(),
                    options: Options::default(),
                },
                ner_model: model,
                ner_weight: weight,
                ner_tokens: Some(Arc::new(tokens)),
                ner_windows: (0..rows)
                    .map(|r| Window {
                        start: r * len,
                        end: (r + 1) * len,
                    })
                    .collect(),
                topic_tokens: None,
                topic_windows: Vec::new(),
                title_tokens: None,
                topics_from_ner: false,
            };
            let (mut job, answer) = job(tag, Class::Interactive, tag.into(), 0, len);
            job.work = Work::Article(Arc::new(prepared));
            job.cost = rows * (len + 2);
            (job, answer)
        }

        /// The batcher on its own thread over `fake`, with `queued` jobs in its queue before
        /// it starts; returns the queue's sender and the thread (which ends when the sender
        /// is dropped).
        fn start(
            fake: &Arc<Fake>,
            queued: Vec<Job>,
        ) -> (Sender<Job>, std::thread::JoinHandle<()>, Arc<EngineStats>) {
            let (tx, rx) = channel();
            for j in queued {
                tx.send(j).unwrap();
            }
            let cfg = EngineConfig::default();
            let stats = Arc::new(EngineStats::default());
            let (model, thread_stats) = (fake.clone(), stats.clone());
            let thread = std::thread::spawn(move || run(model, rx, cfg, &thread_stats));
            (tx, thread, stats)
        }

        fn passes(fake: &Fake) -> Vec<Vec<(u32, usize)>> {
            fake.passes.lock().unwrap().clone()
        }

        /// Index of the first and last pass that ran rows of `tag`.
        fn span_of(passes: &[Vec<(u32, usize)>], tag: u32) -> (usize, usize) {
            let hits: Vec<usize> = (0..passes.len())
                .filter(|&i| passes[i].iter().any(|&(t, _)| t == tag))
                .collect();
            (hits[0], *hits.last().unwrap())
        }

        fn answered(answer: Answer) -> Result<Outputs, EngineError> {
            answer
                .blocking_recv()
                .expect("the batcher answers every job")
                .map(|(o, _)| o)
        }

        /// An interactive call that arrives while a long batch job runs waits for the slice
        /// under way and then its earned room, not for the batch job.
        #[test]
        fn interactive_call_overtakes_a_long_batch_job() {
            let (fake, open, started) = Fake::gated();
            let (long, long_answer) = job(1, Class::Batch, 1, 64, 62);
            let (tx, thread, _) = start(&fake, vec![long]);
            // The call arrives while the first slice runs.
            started.recv().unwrap();
            let (call, call_answer) = job(2, Class::Interactive, 2, 2, 62);
            tx.send(call).unwrap();
            drop(open);
            let out = answered(call_answer).unwrap();
            assert_eq!(
                out.topics,
                vec![vec![2.0]; 2],
                "each row gets its own output"
            );
            answered(long_answer).unwrap();
            drop(tx);
            thread.join().unwrap();
            let passes = passes(&fake);
            let (first, last) = span_of(&passes, 2);
            assert_eq!(first, last, "the call's two rows run in one slice");
            assert_eq!(first, 1, "the call runs in the next slice: {passes:?}");
            assert!(
                span_of(&passes, 1).1 > first,
                "the batch job still had rows left"
            );
            // 64 rows of 64 tokens: a slice of 1024 holds 16.
            assert_eq!(passes.iter().map(Vec::len).sum::<usize>(), 66);
        }

        /// Callers take turns: a caller with one job is served at its first slice, before
        /// another caller's eight jobs queued before it are done, and no job takes more than
        /// half a slice while another of its class waits.
        #[test]
        fn callers_take_turns() {
            let fake = Arc::new(Fake::default());
            let mut queued = Vec::new();
            let mut answers = Vec::new();
            for tag in 10..18 {
                let (j, a) = job(tag, Class::Batch, 1, 8, 126);
                queued.push(j);
                answers.push(a);
            }
            let (other, other_answer) = job(20, Class::Batch, 2, 4, 126);
            queued.push(other);
            let (tx, thread, _) = start(&fake, queued);
            answered(other_answer).unwrap();
            for a in answers {
                answered(a).unwrap();
            }
            drop(tx);
            thread.join().unwrap();
            let passes = passes(&fake);
            // The batcher stops gathering its first batch at `max_batch_tokens` (the eight
            // jobs), so the other caller's job joins at the next slice, all of it there.
            let (first, last) = span_of(&passes, 20);
            assert!(first <= 1 && first == last, "{passes:?}");
            let rows = |tag| passes[first].iter().filter(|p| p.0 == tag).count();
            assert_eq!(
                rows(20),
                4,
                "half a slice for the caller's turn: {passes:?}"
            );
            assert!(
                span_of(&passes, 17).1 > first,
                "the first caller's last job was not done before: {passes:?}"
            );
        }

        /// While both classes wait, batch work gets its share (0.7) of the tokens run.
        #[test]
        fn batch_work_gets_its_share() {
            let fake = Arc::new(Fake::default());
            let (calls, calls_answer) = job(1, Class::Interactive, 1, 200, 62);
            let (batch, batch_answer) = job(2, Class::Batch, 2, 200, 62);
            let (tx, thread, _) = start(&fake, vec![calls, batch]);
            answered(calls_answer).unwrap();
            answered(batch_answer).unwrap();
            drop(tx);
            thread.join().unwrap();
            let passes = passes(&fake);
            // Over the passes where both still had rows left.
            let both = span_of(&passes, 1).1.min(span_of(&passes, 2).1);
            let count = |tag| -> usize {
                passes[..both]
                    .iter()
                    .flatten()
                    .filter(|p| p.0 == tag)
                    .count()
            };
            let share = count(2) as f64 / (count(1) + count(2)) as f64;
            assert!(
                (share - 0.7).abs() < 0.05,
                "batch got {share:.3} of the rows"
            );
        }

        /// One caller's jobs run by virtual deadline (arrival plus cost): a short one sent
        /// after a long one is answered first.
        #[test]
        fn short_jobs_run_before_long_ones_of_the_same_caller() {
            let (fake, open, _) = Fake::gated();
            let (long, long_answer) = job(1, Class::Batch, 1, 32, 126);
            std::thread::sleep(Duration::from_millis(1));
            let (short, short_answer) = job(2, Class::Batch, 1, 1, 62);
            let (tx, thread, _) = start(&fake, vec![long, short]);
            // One pass at a time: the short job is answered after the first.
            open.send(()).unwrap();
            answered(short_answer).unwrap();
            assert!(
                long_answer_pending(&fake, 1),
                "the long job was not done when the short one was answered"
            );
            drop(open);
            answered(long_answer).unwrap();
            drop(tx);
            thread.join().unwrap();
            let passes = passes(&fake);
            assert_eq!(
                passes[0][0].0, 2,
                "the short job's row ran first: {passes:?}"
            );
        }

        /// Whether rows of `tag` ran in fewer passes than its job needs in all (32 rows of
        /// 128 tokens: at least 4).
        fn long_answer_pending(fake: &Fake, tag: u32) -> bool {
            let passes = passes(fake);
            passes.iter().flatten().filter(|p| p.0 == tag).count() < 32
        }

        /// Jobs whose caller went away cost no more forward passes: one cancelled before it
        /// ran never runs, one cancelled while running stops after the slice under way.
        #[test]
        fn cancelled_jobs_stop_running() {
            let (fake, open, started) = Fake::gated();
            let (gone, gone_answer) = job(1, Class::Batch, 1, 4, 62);
            drop(gone_answer);
            let (long, long_answer) = job(2, Class::Batch, 2, 256, 62);
            let (tx, thread, stats) = start(&fake, vec![gone, long]);
            // Cancelled while its first slice runs.
            started.recv().unwrap();
            drop(long_answer);
            let (last, last_answer) = job(3, Class::Batch, 3, 1, 62);
            tx.send(last).unwrap();
            drop(open);
            answered(last_answer).unwrap();
            drop(tx);
            thread.join().unwrap();
            let passes = passes(&fake);
            assert!(passes.iter().flatten().all(|p| p.0 != 1), "{passes:?}");
            let ran = passes.iter().flatten().filter(|p| p.0 == 2).count();
            assert_eq!(ran, 16, "the cancelled job ran only the slice under way");
            assert_eq!(
                stats
                    .dropped_jobs
                    .load(std::sync::atomic::Ordering::Relaxed),
                2
            );
        }

        /// Articles tagged by different NER models share a slice, and each model's rows run
        /// through that model alone; every row's output goes back to its own article.
        #[test]
        fn each_ner_model_runs_its_own_rows() {
            let fake = Arc::new(Fake::default());
            let (mut queued, mut answers) = (Vec::new(), Vec::new());
            for (tag, model) in [(1, 0), (2, 1), (3, 0), (4, 2)] {
                let (j, a) = ner_job(tag, model, 3, 20);
                queued.push(j);
                answers.push((tag, a));
            }
            let (tx, thread, _) = start(&fake, queued);
            for (tag, a) in answers {
                let out = answered(a).unwrap();
                assert_eq!(out.ner, vec![vec![tag as f32]; 3], "article {tag}");
                assert!(out.topics.is_empty());
            }
            drop(tx);
            thread.join().unwrap();
            let (passes, models) = (passes(&fake), fake.models.lock().unwrap().clone());
            assert_eq!(models, [0, 1, 2], "one pass per model, in index order");
            let model_of = |tag: u32| [0, 0, 1, 0, 2][tag as usize];
            for (pass, model) in passes.iter().zip(&models) {
                assert!(
                    pass.iter().all(|&(tag, _)| model_of(tag) == *model),
                    "model {model} ran {pass:?}"
                );
            }
        }

        /// A tagger eight times as heavy per token gets an eighth of the rows into a slice:
        /// 16 rows of 64 tokens fill one 1024-token slice on a light model, eight slices on
        /// the heavy one, so a slice takes about as long whichever model it runs.
        #[test]
        fn a_heavier_model_gets_fewer_rows_per_slice() {
            for (weight, slices) in [(1, 1), (8, 8)] {
                let fake = Arc::new(Fake::default());
                let (j, a) = weighed_ner_job(1, 0, weight, 16, 62);
                let (tx, thread, _) = start(&fake, vec![j]);
                answered(a).unwrap();
                drop(tx);
                thread.join().unwrap();
                let passes = passes(&fake);
                assert_eq!(passes.len(), slices, "weight {weight}: {passes:?}");
                assert!(passes.iter().all(|p| p.len() == 16 / slices));
            }
        }

        /// A failed pass fails the jobs with a row in it, and the batcher goes on serving.
        #[test]
        fn a_failed_pass_fails_only_its_jobs() {
            let fake = Arc::new(Fake::default());
            let (bad, bad_answer) = job(FAILING, Class::Interactive, 1, 1, 10);
            let (tx, thread, _) = start(&fake, vec![bad]);
            let err = answered(bad_answer).unwrap_err();
            assert!(
                matches!(err, EngineError::Model(ref m) if m.contains("stand-in")),
                "{err}"
            );
            let (good, good_answer) = job(5, Class::Interactive, 2, 1, 10);
            tx.send(good).unwrap();
            assert_eq!(answered(good_answer).unwrap().topics, vec![vec![5.0]]);
            drop(tx);
            thread.join().unwrap();
        }
    }
}
