//! `tidings train memory`: a topic memory from a corpus of unlabelled articles
//! ([`tidings::pipeline::topic_memory`]), for `serve --topic-memory`.

use super::{analyze_topics, runtime, LimitArgs, ModelArgs};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Which rows of the corpus file to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rows {
    /// Every row.
    All,
    /// Rows 0, 2, 4, ... (so that the odd ones can measure a memory built from these).
    Even,
    /// Rows 1, 3, 5, ...
    Odd,
}

impl Rows {
    /// Whether row `i` (from 0) is taken.
    pub fn keeps(self, i: usize) -> bool {
        match self {
            Rows::All => true,
            Rows::Even => i.is_multiple_of(2),
            Rows::Odd => !i.is_multiple_of(2),
        }
    }
}

/// `tidings train memory` flags.
#[derive(Args, Debug)]
pub struct TrainMemoryArgs {
    /// Unlabelled articles: CSV (`label,title,text`, the label ignored) or JSON lines
    /// (`{"title": ..., "text": ...}`).
    #[arg(long)]
    pub unlabelled: PathBuf,
    /// Which rows to take.
    #[arg(long, value_enum, default_value_t = Rows::All)]
    pub rows: Rows,
    /// At most this many articles (0 = all the rows taken).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// The corpus's name, reported by GetInfo (default: the file's name and the rows).
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the memory (safetensors).
    #[arg(long, default_value = "models/topics/memory.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Embeds the articles with the topic encoder, as `serve` embeds an article, and writes
/// their embeddings.
pub fn run(a: TrainMemoryArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let examples = tidings::train::topics::read_examples(&a.unlabelled)?;
    let articles: Vec<(String, String)> = examples
        .into_iter()
        .enumerate()
        .filter(|(i, _)| a.rows.keeps(*i))
        .map(|(_, e)| (e.title, e.text))
        .take(if a.limit == 0 { usize::MAX } else { a.limit })
        .collect();
    let models = a.models.load()?;
    let probe = models
        .encoder_probe()?
        .context("train memory needs a topic model")?;
    let engine = a.limits.engine(models);
    let rt = runtime()?;
    let analyses = analyze_topics(&rt, &engine, &articles, None)?;
    let total = analyses.len();
    // An article with no text to read has no embedding: skipped, and said.
    let embeddings: Vec<Vec<f32>> = analyses
        .into_iter()
        .map(|x| x.embedding)
        .filter(|e| e.iter().all(|v| v.is_finite()) && e.iter().any(|v| *v != 0.0))
        .collect();
    if embeddings.len() < total {
        eprintln!(
            "train memory: {} of {total} articles have no embedding (no text?) and were skipped",
            total - embeddings.len()
        );
    }
    let file = a
        .unlabelled
        .file_name()
        .map_or_else(|| "corpus".into(), |f| f.to_string_lossy().into_owned());
    let name = a
        .name
        .unwrap_or_else(|| format!("{file} ({:?} rows)", a.rows).to_lowercase());
    let built = format!(
        "tidings {} train memory: {} articles of {file}, rows {:?}",
        env!("CARGO_PKG_VERSION"),
        embeddings.len(),
        a.rows
    );
    let sha256 = tidings::pipeline::topic_memory::save(&a.out, &name, &built, &embeddings, &probe)?;
    println!(
        "topic memory {:?}: {} articles written to {} (sha256 {sha256}, {:.1} MB, {:.0}s)",
        name,
        embeddings.len(),
        a.out.display(),
        std::fs::metadata(&a.out)?.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
