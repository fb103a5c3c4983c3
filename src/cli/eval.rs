//! `tidings eval ner FILE` and `tidings eval topics FILE`: scores through the serving
//! pipeline.

use super::{LimitArgs, ModelArgs};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use tidings::model::ModelDir;
use tidings::pipeline::topics::Taxonomy;
use tidings::train::{conll, ner};

/// What to score.
#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Strict entity-level P/R/F1 per type on a CoNLL file.
    Ner {
        /// CoNLL file.
        #[arg(default_value = "../shared/data/conll2003/valid.txt")]
        file: PathBuf,
        #[command(flatten)]
        models: ModelArgs,
    },
    /// Topic accuracy on a CSV of `label,title,description` (AG News layout), with the
    /// labels of a taxonomy file passed as request-time labels (label i+1 = entry i).
    Topics {
        /// CSV file.
        #[arg(default_value = "../shared/data/ag_news/dev.csv")]
        file: PathBuf,
        /// Taxonomy whose labels, in order, are the CSV's classes 1..N.
        #[arg(long, default_value = "models/topics/ag_news.json")]
        labels: PathBuf,
        /// Use only the first N rows (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[command(flatten)]
        models: ModelArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Raw logits (`--task ner`) or embeddings (`--task embed`) of the sentences in a
    /// tools/parity.py JSON file, as JSON in the same format.
    Parity {
        /// `ner` or `embed`.
        #[arg(long)]
        task: String,
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// JSON written by tools/parity.py (its sentences are recomputed).
        #[arg(long)]
        sentences: PathBuf,
    },
}

/// Runs an evaluation and prints its table.
///
/// `Parity` prints Tidings' raw outputs for the sentences of a `tools/parity.py` JSON file, in
/// the same format, so that the script can diff them against PyTorch.
pub fn run(c: EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Ner { file, models } => {
            let started = std::time::Instant::now();
            let docs = conll::read(&file)?;
            let m = ModelArgs {
                topic_model: "none".into(),
                ..models
            }
            .load()?;
            let ner_model = m.ner.as_ref().context("no NER model loaded")?;
            let dir: &ModelDir = &ner_model.dir;
            let scorer = ner::evaluate(&ner_model.model, dir, &docs, ner_model.window, &m.device)?;
            println!("{}", file.display());
            print!("{}", scorer.table());
            println!("({:.1}s)", started.elapsed().as_secs_f64());
            Ok(())
        }
        EvalCommand::Parity {
            task,
            model,
            sentences,
        } => parity(&task, &model, &sentences),
        EvalCommand::Topics {
            file,
            labels,
            limit,
            models,
            limits,
        } => {
            let tax: Taxonomy = serde_json::from_slice(
                &std::fs::read(&labels).with_context(|| format!("reading {}", labels.display()))?,
            )?;
            let mut rows = Vec::new();
            for ex in tidings::train::topics::read_examples(&file)? {
                let label: usize = ex.label.parse().context("label column must be 1..N")?;
                if label == 0 || label > tax.labels.len() {
                    anyhow::bail!("label {label} has no entry in {}", labels.display());
                }
                rows.push((label, ex.title, ex.text));
                if limit > 0 && rows.len() >= limit {
                    break;
                }
            }
            let m = ModelArgs {
                ner_model: "none".into(),
                ..models
            }
            .load()?;
            let engine = limits.engine(m);
            let rt = super::runtime()?;
            let started = std::time::Instant::now();
            let articles: Vec<(String, String)> = rows
                .iter()
                .map(|(_, t, d)| (t.clone(), d.clone()))
                .collect();
            let results = super::analyze_topics(&rt, &engine, &articles, Some(&tax.labels))?;
            let n = tax.labels.len();
            let mut confusion = vec![vec![0usize; n]; n];
            let mut correct = 0;
            let mut nll = 0f64;
            for ((gold, _, _), a) in rows.iter().zip(results) {
                let best = &a.topics[0].label;
                let pred = tax.labels.iter().position(|l| &l.name == best).unwrap_or(0);
                let gold_i = gold - 1;
                confusion[gold_i][pred] += 1;
                correct += usize::from(pred == gold_i);
                let p = a
                    .topics
                    .iter()
                    .find(|t| t.label == tax.labels[gold_i].name)
                    .map_or(1e-9, |t| t.score);
                nll -= (p.max(1e-9) as f64).ln();
            }
            println!(
                "{} ({} rows), labels from {}",
                file.display(),
                rows.len(),
                labels.display()
            );
            println!(
                "accuracy {:.4}  mean NLL {:.4}  ({:.1}s)",
                correct as f64 / rows.len() as f64,
                nll / rows.len() as f64,
                started.elapsed().as_secs_f64()
            );
            println!(
                "confusion (rows gold, columns predicted): {}",
                tax.labels
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (l, row) in tax.labels.iter().zip(&confusion) {
                println!("{:>10} {:?}", l.name, row);
            }
            Ok(())
        }
    }
}

fn parity(task: &str, model: &std::path::Path, sentences: &std::path::Path) -> Result<()> {
    use tidings::model::{SentenceEmbedder, TokenClassifier};
    use tidings::pipeline::{batch, tokens};
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sentences).with_context(|| format!("reading {}", sentences.display()))?,
    )?;
    let dir = ModelDir::open(model)?;
    let (cls, sep) = dir.special_ids()?;
    let pad = dir.config.pad_token_id as u32;
    let device = candle_core::Device::Cpu;
    let ner_model = (task == "ner")
        .then(|| TokenClassifier::load(&dir, &device))
        .transpose()?;
    let embedder = (task == "embed")
        .then(|| SentenceEmbedder::load(&dir, &device))
        .transpose()?;
    if ner_model.is_none() && embedder.is_none() {
        anyhow::bail!("--task must be ner or embed");
    }
    let mut out = Vec::new();
    for s in reference["sentences"]
        .as_array()
        .context("no sentences array")?
    {
        let text = s["text"].as_str().context("sentence without text")?;
        let toks = tokens::tokenize(&dir.tokenizer, text)?;
        let row = batch::Row {
            ids: &toks.ids,
            casing: &toks.casing,
        };
        let input = batch::encode_rows(&[row], cls, sep, pad, &device)?;
        let ids: Vec<u32> = input.input_ids.squeeze(0)?.to_vec1()?;
        let casing: Vec<u32> = input
            .casing
            .as_ref()
            .context("casing")?
            .squeeze(0)?
            .to_vec1()?;
        let mut item = serde_json::json!({"text": text, "ids": ids, "casing": casing});
        if let Some(m) = &ner_model {
            let logits: Vec<Vec<f32>> = m
                .forward(&input, tidings::model::Mode::INFERENCE)?
                .squeeze(0)?
                .to_vec2()?;
            item["logits"] = serde_json::json!(logits);
        }
        if let Some(e) = &embedder {
            let v: Vec<f32> = e.forward(&input)?.squeeze(0)?.to_vec1()?;
            item["embedding"] = serde_json::json!(v);
        }
        out.push(item);
    }
    let doc =
        serde_json::json!({"model": model.display().to_string(), "task": task, "sentences": out});
    println!("{}", serde_json::to_string(&doc)?);
    Ok(())
}
