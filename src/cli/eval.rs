//! `tidings eval ner FILE` and `tidings eval topics FILE`: scores through the serving
//! pipeline.

use super::{LimitArgs, ModelArgs};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tidings::model::ModelDir;
use tidings::pipeline::analysis::Analysis;
use tidings::pipeline::topics::{self, Taxonomy};
use tidings::train::{calibration, conll, few_shot, ner};

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
    Topics(TopicsEval),
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
        /// Arithmetic of the products: `f32` (the parity reference) or `int8` (compare with
        /// `tools/parity.py --min-cosine`).
        #[arg(long, default_value = "f32")]
        precision: tidings::model::Precision,
    },
}

/// Runs an evaluation and prints its table.
///
/// `Parity` prints Tidings' raw outputs for the sentences of a `tools/parity.py` JSON file, in
/// the same format, so that the script can diff them against PyTorch.
pub fn run(c: EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Ner { file, models } => eval_ner(&file, models),
        EvalCommand::Parity {
            task,
            model,
            sentences,
            precision,
        } => parity(&task, &model, &sentences, precision),
        EvalCommand::Topics(e) => eval_topics(e),
    }
}

/// `tidings eval ner`: strict entity-level scores of the NER model on the CoNLL `file`.
fn eval_ner(file: &std::path::Path, models: ModelArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let docs = conll::read(file)?;
    let m = ModelArgs {
        topic_model: "none".into(),
        extra_ner_model: Vec::new(),
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

/// The flags of `tidings eval topics` (see [`EvalCommand::Topics`]).
#[derive(Args, Debug)]
pub struct TopicsEval {
    /// CSV file.
    #[arg(default_value = "../shared/data/ag_news/dev.csv")]
    file: PathBuf,
    /// Taxonomy whose labels, in order, are the CSV's classes 1..N.
    #[arg(long, default_value = "models/topics/ag_news.json")]
    labels: PathBuf,
    /// Use only the first N rows (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Score only these rows (of the first `--limit`): `odd` measures a topic memory
    /// built with `tidings train memory --rows even` on rows it was not built from.
    #[arg(long, value_enum, default_value_t = super::memory::Rows::All)]
    rows: super::memory::Rows,
    /// Also fit the multi-label calibration (Platt scaling of the cosines, one-vs-rest)
    /// on the even rows and report its reliability on the odd rows, next to the shipped
    /// calibration's.
    #[arg(long)]
    fit_multi_label: bool,
    /// More wordings of the same classes (taxonomy files, same order) to fit the
    /// multi-label calibration on, pooled with `--labels`; each is reported on its own.
    #[arg(long = "calibration-labels")]
    calibration_labels: Vec<PathBuf>,
    /// Also score `--labels` and every `--calibration-labels` wording on the odd rows:
    /// zero-shot, with prototypes refined with the even rows' articles as unlabelled text
    /// (their labels are not read), and with a memory of those articles (what `serve
    /// --refine-topics` serves).
    #[arg(long)]
    refine: bool,
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// A labelled row of `tidings eval topics`: its class (1..N), title and text.
type Row = (usize, String, String);

/// `tidings eval topics`: accuracy, NLL and confusion of the topics served for the rows of
/// `e.file` with the labels of `e.labels`, after the refinement and calibration reports
/// asked for.
fn eval_topics(e: TopicsEval) -> Result<()> {
    if e.limits.refine_topics > 0 {
        anyhow::bail!(
            "online refinement (--refine-topics) adapts only the default taxonomy, and eval \
             topics scores request labels: to measure memory-backed topics, build a memory \
             from the even rows (`tidings train memory --unlabelled FILE --rows even`) and \
             pass it with --topic-memory --rows odd"
        );
    }
    let tax = Taxonomy::read(&e.labels)?;
    let rows: Vec<Row> = read_rows(&e.file, &tax, &e.labels, e.limit)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| e.rows.keeps(*i))
        .map(|(_, r)| r)
        .collect();
    // The topic encoder serving would use (`auto` resolved against the NER model).
    let models = ModelArgs {
        topic_model: e.models.topic_dir().unwrap_or_else(|| "none".into()),
        ner_model: "none".into(),
        extra_ner_model: Vec::new(),
        ..e.models
    };
    let m = models.load()?;
    let memory = models.topic_memory(&m)?;
    let engine = e.limits.engine(m);
    let engine = match memory {
        Some(memory) => engine.with_topic_memory(memory),
        None => engine,
    };
    let rt = super::runtime()?;
    let started = std::time::Instant::now();
    let articles: Vec<(String, String)> = rows
        .iter()
        .map(|(_, t, d)| (t.clone(), d.clone()))
        .collect();
    let results = super::analyze_topics(&rt, &engine, &articles, Some(&tax.labels))?;
    if e.refine || e.fit_multi_label {
        let paths: Vec<&PathBuf> = std::iter::once(&e.labels)
            .chain(&e.calibration_labels)
            .collect();
        let sets = wordings(&rt, &engine, &paths, tax.labels.len())?;
        let golds: Vec<usize> = rows.iter().map(|(g, _, _)| g - 1).collect();
        let embeddings: Vec<&[f32]> = results.iter().map(|a| a.embedding.as_slice()).collect();
        if e.refine {
            let names: Vec<String> = tax.labels.iter().map(|l| l.name.clone()).collect();
            refine_report(&names, &sets, &embeddings, &golds);
        }
        if e.fit_multi_label {
            multi_label_report(&sets, &embeddings, &golds);
        }
    }
    print_scores(&e.file, &e.labels, &tax, &rows, results, started);
    Ok(())
}

/// The rows of `file` (the first `limit`, 0 for all), whose labels must be 1..N for the N
/// labels of `tax` (read from `labels`).
fn read_rows(
    file: &std::path::Path,
    tax: &Taxonomy,
    labels: &std::path::Path,
    limit: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for ex in tidings::train::topics::read_examples(file)? {
        let label: usize = ex.label.parse().context("label column must be 1..N")?;
        if label == 0 || label > tax.labels.len() {
            anyhow::bail!("label {label} has no entry in {}", labels.display());
        }
        rows.push((label, ex.title, ex.text));
        if limit > 0 && rows.len() >= limit {
            break;
        }
    }
    Ok(rows)
}

/// The prototypes of each label wording in `paths` (taxonomy files of `classes` labels each),
/// named by the path.
fn wordings(
    rt: &tokio::runtime::Runtime,
    engine: &tidings::engine::Engine,
    paths: &[&PathBuf],
    classes: usize,
) -> Result<Vec<(String, Vec<Vec<f32>>)>> {
    let mut sets = Vec::new();
    for path in paths {
        let t = Taxonomy::read(path)?;
        if t.labels.len() != classes {
            anyhow::bail!(
                "{} has {} labels, not {}",
                path.display(),
                t.labels.len(),
                classes
            );
        }
        let weights = super::train::label_weights(rt, engine, &t.labels)?;
        sets.push((path.display().to_string(), weights));
    }
    Ok(sets)
}

/// Prints the accuracy, mean NLL of the gold label and the confusion matrix of `results`
/// against `rows` (labels of `tax`).
fn print_scores(
    file: &std::path::Path,
    labels: &std::path::Path,
    tax: &Taxonomy,
    rows: &[Row],
    results: Vec<Analysis>,
    started: std::time::Instant,
) {
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
}

fn parity(
    task: &str,
    model: &std::path::Path,
    sentences: &std::path::Path,
    precision: tidings::model::Precision,
) -> Result<()> {
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
        .then(|| TokenClassifier::load_with(&dir, &device, precision))
        .transpose()?;
    let embedder = (task == "embed")
        .then(|| SentenceEmbedder::load_with(&dir, &device, precision))
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
        let row = batch::Row::from(&toks);
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

/// Prints the accuracy of each label wording in `sets` (labels `names`) on the odd rows,
/// before and after refining its prototypes with the even rows' articles as unlabelled text,
/// and with a memory of those articles labelled by the refined prototypes (what `serve
/// --refine-topics` serves).
fn refine_report(
    names: &[String],
    sets: &[(String, Vec<Vec<f32>>)],
    embeddings: &[&[f32]],
    golds: &[usize],
) {
    let pool: Vec<&[f32]> = embeddings.iter().step_by(2).copied().collect();
    let (odd_x, odd_y) = few_shot::odd_rows(embeddings, golds);
    println!(
        "refinement: {} unlabelled articles (even rows), accuracy on the {} odd rows",
        pool.len(),
        odd_x.len()
    );
    let pooled = std::sync::Arc::new(pool.iter().map(|v| v.to_vec()).collect::<Vec<_>>());
    for (path, weights) in sets {
        let s = few_shot::refinement_scores(names, weights, &pool, pooled.clone(), &odd_x, &odd_y);
        println!(
            "  {path}: {:.4} -> {:.4} refined -> {:.4} with the memory",
            s.zero_shot, s.refined, s.memory
        );
    }
}

/// Fits the multi-label calibration on the even rows, pooled over the label wordings `sets`,
/// and prints its reliability, and the shipped one's, on the odd rows of each wording.
fn multi_label_report(sets: &[(String, Vec<Vec<f32>>)], embeddings: &[&[f32]], golds: &[usize]) {
    let shipped = (
        f64::from(topics::MULTI_LABEL_SLOPE),
        f64::from(topics::MULTI_LABEL_OFFSET),
    );
    let cal = calibration::multi_label_calibration(sets, embeddings, golds, shipped);
    let (a, b) = (cal.slope, cal.offset);
    println!(
        "multi-label calibration fitted on the even rows ({} article-label pairs over {} wordings): slope {a:.3} offset {b:.3}",
        cal.pairs,
        sets.len()
    );
    for w in &cal.wordings {
        let path = &w.name;
        for (name, (s, o), r) in [
            ("fitted", (a, b), w.fitted),
            ("shipped", shipped, w.shipped),
        ] {
            println!(
                "  {path}: {name:>7} (slope {s:.2}, offset {o:.2}) on the {} odd rows: ECE {:.4}  Brier {:.4}  precision@0.5 {:.3}  recall@0.5 {:.3}",
                w.rows, r.ece, r.brier, r.precision, r.recall
            );
        }
    }
}
