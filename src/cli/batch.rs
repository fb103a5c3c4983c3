//! `tidings batch`: a client for large JSONL jobs against a running server.
//!
//! Streams `{"id","text","title"?}` lines through `AnalyzeStream` with a bounded number in
//! flight, writes one JSON line per result as it comes, retries after transient failures
//! (reconnecting with back-off and resending what was not answered), and resumes from what
//! the output already holds: no id is lost and none is written twice.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidings::proto::{tidings_client::TidingsClient, AnalyzeRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Flags of `tidings batch`.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Input JSONL: one `{"id", "text", "title"?}` object per line.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL: one AnalyzeResponse (or `{"id","error"}`) per line; appended to on resume.
    #[arg(long)]
    output: PathBuf,
    /// Server URL.
    #[arg(long, env = "TIDINGS_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Consecutive failed attempts (no progress) before giving up.
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// Topics to keep per article (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
}

#[derive(serde::Deserialize)]
struct InputLine {
    id: String,
    text: String,
    #[serde(default)]
    title: String,
}

/// Ids already in `output`; a torn last line (a crash mid-write) is cut off first.
fn done_ids(output: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    if !output.exists() {
        return Ok(done);
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(output)?;
    let mut good_len = 0u64;
    let mut reader = BufReader::new(&mut file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) => {
                if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                    done.insert(id.to_string());
                }
                good_len += n as u64;
            }
            Err(_) => break,
        }
    }
    drop(reader);
    if good_len < file.metadata()?.len() {
        eprintln!(
            "batch: cutting a torn line off the end of {}",
            output.display()
        );
        file.set_len(good_len)?;
    }
    file.seek(std::io::SeekFrom::End(0))?;
    Ok(done)
}

/// Runs the job.
pub fn run(a: BatchArgs) -> Result<()> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let done = done_ids(&a.output)?;
    let reader = BufReader::new(
        std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?,
    );
    let mut pending: VecDeque<AnalyzeRequest> = VecDeque::new();
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let item: InputLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: not a {{\"id\",\"text\"}} object",
                a.input.display(),
                i + 1
            )
        })?;
        if !seen.insert(item.id.clone()) {
            bail!(
                "{}:{}: duplicate id {:?}",
                a.input.display(),
                i + 1,
                item.id
            );
        }
        total += 1;
        if !done.contains(&item.id) {
            pending.push_back(AnalyzeRequest {
                id: item.id,
                text: item.text,
                title: item.title,
                top_k: a.top_k,
                ..Default::default()
            });
        }
    }
    eprintln!(
        "batch: {total} items, {} already in {}, {} to do",
        total - pending.len(),
        a.output.display(),
        pending.len()
    );
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.output)?;
    let mut out = std::io::BufWriter::new(out);
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position((total - pending.len()) as u64);
    let rt = super::runtime()?;
    let failed = rt.block_on(drive(&a, pending, &mut out, &bar))?;
    bar.finish();
    out.flush()?;
    eprintln!(
        "batch: finished, {failed} items with errors (written as {{\"id\",\"error\"}} lines)"
    );
    Ok(())
}

/// Streams everything in `pending`, reconnecting as needed; returns how many items failed
/// permanently.
async fn drive(
    a: &BatchArgs,
    mut pending: VecDeque<AnalyzeRequest>,
    out: &mut impl Write,
    bar: &indicatif::ProgressBar,
) -> Result<usize> {
    let mut failed = 0usize;
    let mut attempts = 0u32;
    while !pending.is_empty() {
        let mut client = match TidingsClient::connect(a.server.clone()).await {
            Ok(c) => c
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            Err(e) => {
                attempts += 1;
                if attempts > a.retries {
                    bail!("cannot reach {} after {} attempts: {e}", a.server, attempts);
                }
                backoff(attempts, &e.to_string(), bar).await;
                continue;
            }
        };
        // Requests flow through a channel so that at most `concurrency` are unanswered.
        let (tx, rx) = mpsc::channel::<AnalyzeRequest>(a.concurrency);
        let mut in_flight: HashMap<String, AnalyzeRequest> = HashMap::new();
        let fill = |in_flight: &mut HashMap<String, AnalyzeRequest>,
                    pending: &mut VecDeque<AnalyzeRequest>| {
            while in_flight.len() < a.concurrency {
                let Some(r) = pending.pop_front() else { break };
                if tx.try_send(r.clone()).is_err() {
                    pending.push_front(r);
                    break;
                }
                in_flight.insert(r.id.clone(), r);
            }
        };
        fill(&mut in_flight, &mut pending);
        let mut responses = match client.analyze_stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                pending.extend(in_flight.into_values());
                attempts += 1;
                if attempts > a.retries {
                    bail!("stream refused {} times: {s}", attempts);
                }
                backoff(attempts, s.message(), bar).await;
                continue;
            }
        };
        let outcome = loop {
            match responses.message().await {
                Ok(Some(resp)) => {
                    if in_flight.remove(&resp.id).is_some() {
                        serde_json::to_writer(&mut *out, &resp)?;
                        out.write_all(b"\n")?;
                        out.flush()?;
                        bar.inc(1);
                        attempts = 0;
                    }
                    if pending.is_empty() && in_flight.is_empty() {
                        break Ok(());
                    }
                    fill(&mut in_flight, &mut pending);
                    if pending.is_empty() && in_flight.is_empty() {
                        break Ok(());
                    }
                }
                Ok(None) => break Err(Status::unavailable("stream ended early")),
                Err(s) => break Err(s),
            }
        };
        match outcome {
            Ok(()) => break,
            Err(s) => {
                // A status naming an item the server rejects for good: record it, go on.
                let bad = item_of(&s).filter(|id| in_flight.contains_key(id));
                match (bad, permanent(s.code())) {
                    (Some(id), true) => {
                        in_flight.remove(&id);
                        let line = serde_json::json!({"id": id, "error": {"code": s.code() as i32, "message": s.message()}});
                        serde_json::to_writer(&mut *out, &line)?;
                        out.write_all(b"\n")?;
                        out.flush()?;
                        bar.inc(1);
                        failed += 1;
                        attempts = 0;
                    }
                    _ => {
                        attempts += 1;
                        if attempts > a.retries {
                            bail!("giving up after {} failed attempts: {s}", attempts);
                        }
                        backoff(attempts, s.message(), bar).await;
                    }
                }
                // Everything unanswered goes back to the front of the queue.
                let mut back: Vec<AnalyzeRequest> = in_flight.into_values().collect();
                back.sort_by(|x, y| x.id.cmp(&y.id));
                for r in back.into_iter().rev() {
                    pending.push_front(r);
                }
            }
        }
    }
    Ok(failed)
}

fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// The item id a status names, from the `tidings-item-id` metadata the server sets.
fn item_of(s: &Status) -> Option<String> {
    s.metadata()
        .get("tidings-item-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn backoff(attempt: u32, why: &str, bar: &indicatif::ProgressBar) {
    let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(6)));
    bar.set_message(format!("retry {attempt} in {wait:?}: {why}"));
    tokio::time::sleep(wait).await;
}
