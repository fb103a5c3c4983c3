//! `tidings analyze FILE|-`: the server's answer for one text, computed in-process.

use super::{LimitArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Read;
use std::path::PathBuf;
use tidings::engine::Class;
use tidings::pipeline::analysis::{Article, Options};
use tidings::pipeline::topics::Label;

/// Flags of `tidings analyze`.
#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// The article: a file path, or `-` for stdin.
    input: PathBuf,
    /// Headline (read for topics).
    #[arg(long, default_value = "")]
    title: String,
    /// A topic label, `name` or `name: description`; repeat for several. Default: the taxonomy.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Only these tasks: `topics`, `entities`.
    #[arg(long = "task")]
    tasks: Vec<String>,
    /// Topics to keep (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Score each topic on its own (independent probabilities) instead of a softmax.
    #[arg(long)]
    multi_label: bool,
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Prints the analysis as JSON.
pub fn run(a: AnalyzeArgs) -> Result<()> {
    let mut text = String::new();
    if a.input.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text = std::fs::read_to_string(&a.input)
            .with_context(|| format!("reading {}", a.input.display()))?;
    }
    if text.trim().is_empty() {
        bail!("the input is empty");
    }
    let limits = a.limits.limits();
    if text.chars().count() > limits.max_text_chars {
        bail!(
            "the input is longer than --max-text-chars {}",
            limits.max_text_chars
        );
    }
    let mut options = Options {
        top_k: a.top_k,
        multi_label: a.multi_label,
        ..Options::default()
    };
    if !a.tasks.is_empty() {
        options.topics = a.tasks.iter().any(|t| t == "topics");
        options.entities = a.tasks.iter().any(|t| t == "entities");
        if let Some(bad) = a.tasks.iter().find(|t| *t != "topics" && *t != "entities") {
            bail!("unknown task {bad:?}: use topics or entities");
        }
    }
    let labels: Vec<Label> = a
        .labels
        .iter()
        .map(|l| {
            let (name, description) = l.split_once(':').unwrap_or((l, ""));
            Label {
                name: name.trim().to_string(),
                description: description.trim().to_string(),
                ..Label::default()
            }
        })
        .collect();
    let models = a.models.load()?;
    let rt = super::runtime()?;
    let engine = a.limits.engine(models);
    let article = Article {
        id: a.input.display().to_string(),
        text,
        title: a.title,
        options,
    };
    let (analysis, _) = rt
        .block_on(engine.analyze(
            article,
            (!labels.is_empty()).then_some(&labels[..]),
            engine.caller(Class::Batch),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&analysis)?);
    Ok(())
}
