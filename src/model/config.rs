//! `config.json` of a Hugging Face-format model directory, reduced to what Tidings reads.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The fields of an HF `config.json` that the encoders and heads need.
///
/// Unknown fields are ignored, so any BERT-family config parses; missing optional fields take
/// the values HF's own defaults give.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family, e.g. `bert`, `roberta`, `xlm-roberta`, `distilbert`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Word-piece vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states (`dim` in DistilBERT configs).
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    /// Number of transformer layers (`n_layers` in DistilBERT configs).
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`n_heads` in DistilBERT configs).
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (`hidden_dim` in DistilBERT configs).
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu`, `gelu_new`, `relu`, ...).
    #[serde(default = "default_act", alias = "activation")]
    pub hidden_act: String,
    /// Longest sequence the position embeddings cover.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Number of token types (segment ids); 0 when the model has none.
    #[serde(default)]
    pub type_vocab_size: usize,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: usize,
    /// MPNet: buckets of the relative position bias (HF's default, 32).
    #[serde(default = "default_relative_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Output labels of a classification head, by index.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    /// Tidings' extension: the model adds a learned word-shape (casing) embedding to its input
    /// embeddings, so an uncased encoder can still see capitals. Absent in other models.
    #[serde(default)]
    pub tidings_casing: bool,
    /// Tidings' extension, on a token-classification model: its encoder was also trained to
    /// give sentence embeddings when its states are mean-pooled (distilled from the sentence
    /// encoder it started from), so one forward pass per window serves both entities and
    /// topics. Absent (false) in other models.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tidings_shared_encoder: bool,
    /// Tidings' extension, with `tidings_shared_encoder`: the pooled states go through a
    /// linear map (`tidings_topic_projection.{weight,bias}`) fitted by `tidings train
    /// projection` to match the base sentence encoder's embeddings, then to unit length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tidings_topic_projection: bool,
    /// Tidings' extension: the weights file holds a low-rank adapter over another model's
    /// weights (see [`AdapterConfig`]), merged into them as the model loads. Absent in other
    /// models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tidings_adapter: Option<AdapterConfig>,
    /// Everything else in the file, kept so that a config written back stays complete.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A model saved as what training changed in a base model it does not ship: low-rank
/// adapters (LoRA) on the dense layers, the biases and layer norms, and its own head, in a
/// few megabytes; the base's weights come from their own directory (fetched by
/// `models/fetch`, sha256-checked).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterConfig {
    /// The base model's directory, relative to this model's directory (or absolute).
    pub base: String,
    /// sha256 of the base's `model.safetensors`, as trained on.
    pub base_sha256: String,
    /// Size in bytes of the base's `model.safetensors`: checked at every load, a cheap guard
    /// against merging into other weights.
    pub base_bytes: u64,
    /// Prefix of this model's encoder tensors (e.g. `mpnet`); the base's own prefix is found
    /// in its file.
    pub prefix: String,
    /// Rank of the adapters.
    pub rank: usize,
    /// LoRA's alpha: the adapters' products are scaled by `alpha / rank`.
    pub alpha: f64,
}

impl AdapterConfig {
    /// The factor on the adapters' products, `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_eps() -> f64 {
    1e-12
}
fn default_relative_buckets() -> usize {
    32
}

impl ModelConfig {
    /// Labels of the classification head in index order, or an empty list when there is none
    /// or `id2label` has gaps.
    pub fn labels(&self) -> Vec<String> {
        let mut pairs: Vec<(usize, &String)> = self
            .id2label
            .iter()
            .filter_map(|(k, v)| k.parse::<usize>().ok().map(|i| (i, v)))
            .collect();
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
            return Vec::new();
        }
        pairs.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Position ids start here: RoBERTa-style models (and MPNet) skip `pad_token_id + 1`
    /// positions.
    pub fn position_offset(&self) -> usize {
        match self.model_type.as_str() {
            "roberta" | "xlm-roberta" | "camembert" | "mpnet" => self.pad_token_id + 1,
            _ => 0,
        }
    }

    /// Longest input (special tokens included) the position embeddings allow.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bert_and_distilbert_names() {
        let bert: ModelConfig = serde_json::from_str(
            r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"id2label":{"1":"B-PER","0":"O"}}"#,
        )
        .unwrap();
        assert_eq!(bert.labels(), vec!["O", "B-PER"]);
        assert_eq!(bert.max_tokens(), 512);
        let distil: ModelConfig = serde_json::from_str(
            r#"{"model_type":"distilbert","vocab_size":10,"dim":8,"n_layers":1,"n_heads":2,
            "hidden_dim":16,"activation":"gelu"}"#,
        )
        .unwrap();
        assert_eq!(distil.hidden_size, 8);
        assert_eq!(distil.intermediate_size, 16);
    }

    #[test]
    fn roberta_positions_are_offset() {
        let c: ModelConfig = serde_json::from_str(
            r#"{"model_type":"xlm-roberta","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"pad_token_id":1,
            "max_position_embeddings":514}"#,
        )
        .unwrap();
        assert_eq!(c.position_offset(), 2);
        assert_eq!(c.max_tokens(), 512);
    }

    #[test]
    fn mpnet_positions_are_offset_and_buckets_default() {
        let c: ModelConfig = serde_json::from_str(
            r#"{"model_type":"mpnet","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"pad_token_id":1,
            "max_position_embeddings":514}"#,
        )
        .unwrap();
        assert_eq!(c.position_offset(), 2);
        assert_eq!(c.max_tokens(), 512);
        assert_eq!(c.relative_attention_num_buckets, 32);
    }

    #[test]
    fn labels_with_gaps_are_rejected() {
        let c: ModelConfig = serde_json::from_str(
            r#"{"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"id2label":{"0":"O","2":"X"}}"#,
        )
        .unwrap();
        assert!(c.labels().is_empty());
    }
}
