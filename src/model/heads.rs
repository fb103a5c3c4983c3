//! Heads on the encoder: token classification for entities and mean-pooled sentence embeddings
//! for topics.

use super::config::ModelConfig;
use super::encoder::{Encoder, EncoderInput, Mode, Precision};
use super::files::{ModelDir, ModelError};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

/// An encoder with a linear layer over each token's hidden state, as in HF's
/// `*ForTokenClassification` (tensors `<prefix>.*` and `classifier.{weight,bias}`).
#[derive(Debug, Clone)]
pub struct TokenClassifier {
    encoder: Encoder,
    classifier: Linear,
    labels: Vec<String>,
}

impl TokenClassifier {
    /// Builds the model from a var builder rooted at the checkpoint's top level, with the
    /// encoder under `prefix`. Training uses this with a `VarMap`-backed builder.
    pub fn from_var_builder(vb: VarBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        Self::from_var_builder_with(vb, prefix, cfg, Precision::F32)
    }

    /// [`TokenClassifier::from_var_builder`] with the products in `precision`.
    fn from_var_builder_with(
        vb: VarBuilder,
        prefix: &str,
        cfg: &ModelConfig,
        precision: Precision,
    ) -> Result<Self> {
        let labels = cfg.labels();
        if labels.is_empty() {
            candle_core::bail!("config.json has no id2label: not a token-classification model");
        }
        let enc_vb = if prefix.is_empty() {
            vb.clone()
        } else {
            vb.pp(prefix)
        };
        Ok(Self {
            encoder: Encoder::load_with(enc_vb, cfg, precision)?,
            classifier: linear(cfg.hidden_size, labels.len(), vb.pp("classifier"))?,
            labels,
        })
    }

    /// Loads a token-classification model directory (e.g. Tidings' NER model, or
    /// dslim/bert-base-NER).
    pub fn load(dir: &ModelDir, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// [`TokenClassifier::load`] with the products in `precision`
    /// ([`Encoder::load_with`] says when int8 applies).
    pub fn load_with(
        dir: &ModelDir,
        device: &Device,
        precision: Precision,
    ) -> std::result::Result<Self, ModelError> {
        if dir.config.labels().is_empty() {
            return Err(ModelError::Unfit {
                dir: dir.dir.clone(),
                message: "config.json has no id2label: not a token-classification model".into(),
            });
        }
        let vb = dir.var_builder(DType::F32, device)?;
        let prefix = dir.encoder_prefix(&vb)?;
        Self::from_var_builder_with(vb, &prefix, &dir.config, precision)
            .map_err(|e| dir.weights_error(e))
    }

    /// The precision of the encoder's matrix products.
    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }

    /// Tag names by output index (e.g. `O`, `B-PER`, ...).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Logits `[batch, seq, labels]`.
    pub fn forward(&self, input: &EncoderInput, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_with_hidden(input, mode)?.0)
    }

    /// Logits `[batch, seq, labels]` and the encoder's hidden states `[batch, seq, hidden]`
    /// they were computed from (before the head's dropout): one forward pass for a model whose
    /// pooled states also serve as sentence embeddings (see [`mean_pool`]).
    pub fn forward_with_hidden(
        &self,
        input: &EncoderInput,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self.encoder.forward(input, mode)?;
        let logits = self.classifier.forward(&mode.drop(hidden.clone())?)?;
        Ok((logits, hidden))
    }

    /// The encoder, for a [`SentenceEmbedder`] that shares it.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

/// Unit-length mean of `hidden` (`[batch, seq, dim]`) over the tokens `attention_mask`
/// (`[batch, seq]`, 1 for tokens, 0 for padding) keeps, special tokens included, as
/// sentence-transformers pools all-MiniLM-L6-v2: `[batch, dim]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)
}

/// An encoder whose token states are mean-pooled over the attention mask and L2-normalised,
/// as sentence-transformers does for all-MiniLM-L6-v2.
#[derive(Debug, Clone)]
pub struct SentenceEmbedder {
    encoder: Encoder,
}

impl SentenceEmbedder {
    /// Loads the encoder of any supported model directory (a head, if present, is ignored).
    pub fn load(dir: &ModelDir, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// [`SentenceEmbedder::load`] with the products in `precision`
    /// ([`Encoder::load_with`] says when int8 applies).
    pub fn load_with(
        dir: &ModelDir,
        device: &Device,
        precision: Precision,
    ) -> std::result::Result<Self, ModelError> {
        let vb = dir.var_builder(DType::F32, device)?;
        let prefix = dir.encoder_prefix(&vb)?;
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        let encoder =
            Encoder::load_with(vb, &dir.config, precision).map_err(|e| dir.weights_error(e))?;
        Ok(Self { encoder })
    }

    /// The precision of the encoder's matrix products.
    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// The embedder of an encoder already loaded (e.g. a [`TokenClassifier`]'s, for a model
    /// trained to serve both, so the weights are held once).
    pub fn from_encoder(encoder: Encoder) -> Self {
        Self { encoder }
    }

    /// Unit-length embeddings `[batch, hidden]`.
    pub fn forward(&self, input: &EncoderInput) -> Result<Tensor> {
        let hidden = self.encoder.forward(input, Mode::INFERENCE)?;
        mean_pool(&hidden, &input.attention_mask)
    }
}
