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
    /// A transform between the states and the classifier (ModernBERT's `head`), if any.
    head: Option<super::external::PredictionHead>,
    classifier: Linear,
    labels: Vec<String>,
    pooler: Pooler,
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
            head: super::external::PredictionHead::load(vb.pp("head"), cfg)?,
            classifier: linear(cfg.hidden_size, labels.len(), vb.pp("classifier"))?,
            labels,
            pooler: Pooler::load(&vb, cfg)?,
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

    /// Which implementation runs the encoder ([`Encoder::engine`]).
    pub fn engine(&self) -> &'static str {
        self.encoder.engine()
    }

    /// The kernel of the encoder's products ([`Encoder::kernel`]).
    pub fn kernel(&self) -> &'static str {
        self.encoder.kernel()
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
        let states = match &self.head {
            Some(head) => head.forward(&hidden)?,
            None => hidden.clone(),
        };
        let logits = self.classifier.forward(&mode.drop(states)?)?;
        Ok((logits, hidden))
    }

    /// The sentence embeddings of this model's states (its encoder, shared, and its pooler):
    /// for a model trained to serve topics too
    /// ([`ModelConfig::tidings_shared_encoder`]).
    pub fn topic_embedder(&self) -> SentenceEmbedder {
        SentenceEmbedder {
            encoder: self.encoder.clone(),
            pooler: self.pooler.clone(),
        }
    }

    /// Unit-length sentence embeddings `[batch, hidden]` of hidden states this model
    /// computed ([`TokenClassifier::forward_with_hidden`]).
    pub fn pool(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.pooler.forward(hidden, attention_mask)
    }
}

/// Name of the optional linear map of a model's pooled states
/// ([`ModelConfig::tidings_topic_projection`]): tensors `<name>.weight` `[hidden, hidden]`
/// and `<name>.bias` at the checkpoint's top level.
pub const TOPIC_PROJECTION: &str = "tidings_topic_projection";

/// How hidden states become a sentence embedding: [`mean_pool`], then, for a model that has
/// one, a linear map fitted to match its base sentence encoder's embeddings, and unit length
/// again.
#[derive(Debug, Clone, Default)]
pub struct Pooler {
    projection: Option<Linear>,
}

impl Pooler {
    /// The pooler of the checkpoint under `vb` (its top level).
    fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let projection = if cfg.tidings_topic_projection {
            Some(linear(
                cfg.hidden_size,
                cfg.hidden_size,
                vb.pp(TOPIC_PROJECTION),
            )?)
        } else {
            None
        };
        Ok(Self { projection })
    }

    /// Unit-length embeddings `[batch, hidden]` of `hidden` under `attention_mask`.
    pub fn forward(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let pooled = mean_pool(hidden, attention_mask)?;
        match &self.projection {
            None => Ok(pooled),
            Some(p) => unit(&p.forward(&pooled)?),
        }
    }
}

/// Rows of `x` (`[batch, dim]`) scaled to unit length.
fn unit(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Unit-length mean of `hidden` (`[batch, seq, dim]`) over the tokens `attention_mask`
/// (`[batch, seq]`, 1 for tokens, 0 for padding) keeps, special tokens included, as
/// sentence-transformers pools all-MiniLM-L6-v2: `[batch, dim]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    unit(&summed.broadcast_div(&counts)?)
}

/// An encoder whose token states are mean-pooled over the attention mask and L2-normalised,
/// as sentence-transformers does for all-MiniLM-L6-v2, then (for a multi-task model that has
/// one) put through its topic projection and normalised again ([`Pooler`]).
#[derive(Debug, Clone)]
pub struct SentenceEmbedder {
    encoder: Encoder,
    pooler: Pooler,
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
        let root = dir.var_builder(DType::F32, device)?;
        let prefix = dir.encoder_prefix(&root)?;
        let vb = if prefix.is_empty() {
            root.clone()
        } else {
            root.pp(prefix)
        };
        let encoder =
            Encoder::load_with(vb, &dir.config, precision).map_err(|e| dir.weights_error(e))?;
        let pooler = Pooler::load(&root, &dir.config).map_err(|e| dir.weights_error(e))?;
        Ok(Self { encoder, pooler })
    }

    /// The precision of the encoder's matrix products.
    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }

    /// Which implementation runs the encoder ([`Encoder::engine`]).
    pub fn engine(&self) -> &'static str {
        self.encoder.engine()
    }

    /// The kernel of the encoder's products ([`Encoder::kernel`]).
    pub fn kernel(&self) -> &'static str {
        self.encoder.kernel()
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// The plain mean-pooled states, without the model's projection (if any): what a
    /// projection is fitted on.
    pub fn without_projection(self) -> Self {
        Self {
            pooler: Pooler::default(),
            ..self
        }
    }

    /// Unit-length embeddings `[batch, hidden]`.
    pub fn forward(&self, input: &EncoderInput) -> Result<Tensor> {
        let hidden = self.encoder.forward(input, Mode::INFERENCE)?;
        self.pooler.forward(&hidden, &input.attention_mask)
    }
}
