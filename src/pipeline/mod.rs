//! The text pipeline: text -> pieces -> windows -> model rows; model outputs -> entities and
//! topics. Nothing here knows about gRPC or queues.
//!
//! - [`casing`] — word shape of a piece.
//! - [`tokens`] — tokenization with byte offsets.
//! - [`windows`] — overlapping windows and which window speaks for each piece.
//! - [`analysis`] — one article end to end: prepare, model outputs, finish.
//! - [`assembly`] — which models to load ([`assembly::ModelPlan`]) and loading them.
//! - [`batch`] — padded tensors from rows.
//! - [`entities`] — BIO decoding, offsets, grouping.
//! - [`topic_memory`] — memory files of unlabelled article embeddings (`--topic-memory`).
//! - [`topics`] — zero-shot scoring of an article embedding against label embeddings.

pub mod analysis;
pub mod assembly;
pub mod batch;
pub mod casing;
pub mod entities;
pub mod tokens;
pub mod topic_memory;
pub mod topics;
pub mod windows;

use crate::model::{Mode, SentenceEmbedder, TokenClassifier};
use batch::Row;
use candle_core::{Device, Result};

/// Special-token ids a model's rows are wrapped in.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    /// Opens a row (`[CLS]`).
    pub cls: u32,
    /// Closes a row (`[SEP]`).
    pub sep: u32,
    /// Pads a row.
    pub pad: u32,
}

impl Specials {
    /// The special tokens of the model in `dir`: its tokenizer's `[CLS]`/`[SEP]` (or `<s>`,
    /// `</s>`) and its config's pad id.
    pub fn of(dir: &crate::model::ModelDir) -> std::result::Result<Self, crate::model::ModelError> {
        let (cls, sep) = dir.special_ids()?;
        Ok(Self {
            cls,
            sep,
            pad: dir.config.pad_token_id as u32,
        })
    }
}

/// The padded input of `rows`, or `None` when there are none.
fn encode(
    rows: &[Row<'_>],
    sp: Specials,
    device: &Device,
) -> Result<Option<crate::model::EncoderInput>> {
    if rows.is_empty() {
        return Ok(None);
    }
    batch::encode_rows(rows, sp.cls, sp.sep, sp.pad, device).map(Some)
}

/// Tag probabilities of each row's pieces (special tokens and padding removed):
/// one `[len, labels]` row-major vector per row.
pub fn token_probs(
    model: &TokenClassifier,
    rows: &[Row<'_>],
    sp: Specials,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let Some(input) = encode(rows, sp, device)? else {
        return Ok(Vec::new());
    };
    let logits = model.forward(&input, Mode::INFERENCE)?;
    probs_of_rows(&logits, rows)
}

/// [`token_probs`] and the unit-length mean-pooled embedding of each row, from one forward
/// pass: for a model whose encoder also serves topics
/// ([`crate::model::ModelConfig::tidings_shared_encoder`]).
pub fn token_probs_and_embeddings(
    model: &TokenClassifier,
    rows: &[Row<'_>],
    sp: Specials,
    device: &Device,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let Some(input) = encode(rows, sp, device)? else {
        return Ok(Vec::new());
    };
    let (logits, hidden) = model.forward_with_hidden(&input, Mode::INFERENCE)?;
    let pooled = model.pool(&hidden, &input.attention_mask)?;
    let probs = probs_of_rows(&logits, rows)?;
    Ok(probs.into_iter().zip(pooled.to_vec2::<f32>()?).collect())
}

/// Per-row tag probabilities from logits `[rows, seq, labels]`, specials and padding cut.
fn probs_of_rows(logits: &candle_core::Tensor, rows: &[Row<'_>]) -> Result<Vec<Vec<f32>>> {
    let probs = candle_nn::ops::softmax_last_dim(logits)?;
    let (_, seq, n) = probs.dims3()?;
    let flat = probs.flatten_all()?.to_vec1::<f32>()?;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let base = (r * seq + 1) * n;
            flat[base..base + row.ids.len() * n].to_vec()
        })
        .collect())
}

/// Unit-length embeddings of each row, `[rows][dim]`.
pub fn embeddings(
    model: &SentenceEmbedder,
    rows: &[Row<'_>],
    sp: Specials,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let Some(input) = encode(rows, sp, device)? else {
        return Ok(Vec::new());
    };
    model.forward(&input)?.to_vec2::<f32>()
}

/// Assembles per-piece probabilities of a whole text from its windows' outputs, each piece
/// taken from the window that reads it with the most context.
pub fn merge_windows(
    len: usize,
    wins: &[windows::Window],
    window_probs: &[Vec<f32>],
    labels: usize,
) -> Vec<f32> {
    let owners = windows::owners(len, wins);
    let mut out = Vec::with_capacity(len * labels);
    for (t, &w) in owners.iter().enumerate() {
        let local = t - wins[w].start;
        out.extend_from_slice(&window_probs[w][local * labels..(local + 1) * labels]);
    }
    out
}

/// How texts are cut into model windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// Pieces per window, special tokens excluded.
    pub size: usize,
    /// Pieces shared by consecutive windows.
    pub overlap: usize,
}

impl Default for WindowSpec {
    /// 254 pieces (256 with `[CLS]`/`[SEP]`, MiniLM's training length), 64 shared.
    fn default() -> Self {
        Self {
            size: 254,
            overlap: 64,
        }
    }
}

impl WindowSpec {
    /// Shrinks the window to what a model reading `max_tokens` (specials included) can take.
    pub fn fit(self, max_tokens: usize) -> Self {
        let size = self.size.min(max_tokens.saturating_sub(2)).max(1);
        Self {
            size,
            overlap: self.overlap.min(size / 2),
        }
    }
}

/// Rows of a tokenized text's windows.
pub fn window_rows<'a>(tokens: &'a tokens::Tokens, wins: &[windows::Window]) -> Vec<Row<'a>> {
    wins.iter()
        .map(|w| Row {
            ids: &tokens.ids[w.start..w.end],
            casing: &tokens.casing[w.start..w.end],
        })
        .collect()
}

/// Entities of one text, end to end, without a queue: the path `tidings eval` and training
/// measure. The server runs the same steps, batching windows of many requests.
pub fn entities_of_text(
    model: &TokenClassifier,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    tags: &entities::TagSet,
    sp: Specials,
    window: WindowSpec,
    device: &Device,
) -> anyhow::Result<Vec<entities::Mention>> {
    let toks = tokens::tokenize(tokenizer, text)?;
    let wins = windows::plan(toks.len(), window.size, window.overlap);
    let rows = window_rows(&toks, &wins);
    let mut probs = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(16) {
        probs.extend(token_probs(model, chunk, sp, device)?);
    }
    let merged = merge_windows(toks.len(), &wins, &probs, model.labels().len());
    Ok(entities::decode(text, &toks, &merged, tags))
}
