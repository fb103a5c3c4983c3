//! `tidings train ner`: fine-tune the NER model.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use tidings::train::ner::{self, NerTrainConfig};

/// What to train.
#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Fine-tune an encoder + token-classification head on CoNLL data.
    Ner(TrainNerArgs),
}

/// Flags of `tidings train ner` (defaults: the shipped model's recipe).
#[derive(clap::Args, Debug)]
pub struct TrainNerArgs {
    /// Base encoder (HF model directory).
    #[arg(long, default_value = "models/minilm")]
    base: PathBuf,
    /// CoNLL training file.
    #[arg(long, default_value = "../shared/data/conll2003/train.txt")]
    train: PathBuf,
    /// CoNLL dev file (scored each epoch; the best epoch is kept). "none" to skip.
    #[arg(long, default_value = "../shared/data/conll2003/valid.txt")]
    dev: PathBuf,
    /// Output model directory.
    #[arg(long, default_value = "models/ner")]
    out: PathBuf,
    /// Passes over the training data.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Chunks (of up to --max-pieces pieces) per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Peak learning rate of the encoder.
    #[arg(long, default_value_t = 1.5e-4)]
    lr: f64,
    /// Peak learning rate of the new head and casing embedding.
    #[arg(long, default_value_t = 1e-3)]
    head_lr: f64,
    /// Fraction of steps spent warming up.
    #[arg(long, default_value_t = 0.06)]
    warmup: f64,
    /// Dropout on hidden states.
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Seed of everything random.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// Longest training chunk, in pieces.
    #[arg(long, default_value_t = 254)]
    max_pieces: usize,
    /// Stop after N steps (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Train on the first N documents only (0 = all).
    #[arg(long, default_value_t = 0)]
    limit_docs: usize,
    /// Do not add the word-shape (casing) embedding.
    #[arg(long)]
    no_casing: bool,
    /// Continue from OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    /// Save weights in f32 instead of f16.
    #[arg(long)]
    f32: bool,
}

/// Runs a training command.
pub fn run(c: TrainCommand) -> Result<()> {
    match c {
        TrainCommand::Ner(a) => {
            let cfg = NerTrainConfig {
                base: a.base,
                train: a.train,
                dev: (a.dev.as_os_str() != "none").then_some(a.dev),
                out: a.out,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                head_lr: a.head_lr,
                warmup: a.warmup,
                dropout: a.dropout,
                clip: a.clip,
                weight_decay: a.weight_decay,
                seed: a.seed,
                max_pieces: a.max_pieces,
                max_steps: a.max_steps,
                limit_docs: a.limit_docs,
                casing: !a.no_casing,
                resume: a.resume,
                f16: !a.f32,
            };
            let report = ner::train(&cfg)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
