//! Architectures without a fused implementation, run as candle-transformers' own models:
//! DeBERTa-v2/v3 (`model_type: deberta-v2`) and ModernBERT (`modernbert`). They run as candle
//! ops in f32 on any device (no int8, no training); the BERT family (BERT, RoBERTa, XLM-R,
//! DistilBERT) and MPNet keep Tidings' own encoder ([`super::encoder`]) and its fused kernels.
//!
//! Each is checked against transformers' outputs on a tiny random model
//! (`tests/architectures.rs`, fixtures written by `tools/tiny_models.py`).

use super::config::ModelConfig;
use super::input::EncoderInput;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::{debertav2, modernbert};

/// A candle-transformers encoder body.
pub(super) enum External {
    DebertaV2(Box<debertav2::DebertaV2Model>),
    ModernBert(modernbert::ModernBert),
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The config.json fields candle-transformers' structs read, from Tidings' parsed config
/// (known fields and every other field it kept). ModernBERT's names are mapped to the ones
/// candle-transformers reads: `norm_eps` is its layer norms' epsilon, and configs written by
/// transformers 5 keep the two RoPE bases in `rope_parameters` (`full_attention`,
/// `sliding_attention`) instead of `global_rope_theta` / `local_rope_theta`.
fn config_json(cfg: &ModelConfig) -> Result<serde_json::Value> {
    let mut json = serde_json::to_value(cfg).map_err(candle_core::Error::wrap)?;
    if cfg.model_type == "modernbert" {
        if let Some(eps) = json.get("norm_eps").cloned() {
            json["layer_norm_eps"] = eps;
        }
        for (key, kind) in [
            ("global_rope_theta", "full_attention"),
            ("local_rope_theta", "sliding_attention"),
        ] {
            let theta = json
                .pointer(&format!("/rope_parameters/{kind}/rope_theta"))
                .cloned();
            if let (None, Some(theta)) = (json.get(key), theta) {
                json[key] = theta;
            }
        }
    }
    Ok(json)
}

impl External {
    /// Whether `model_type` runs on this path.
    pub(super) fn handles(model_type: &str) -> bool {
        matches!(model_type, "deberta-v2" | "modernbert")
    }

    /// Loads the body whose tensors sit under `vb` (narrowed to the checkpoint's encoder
    /// prefix, as for [`super::Encoder::load`]).
    pub(super) fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let json = config_json(cfg)?;
        match cfg.model_type.as_str() {
            "deberta-v2" => {
                let c: debertav2::Config =
                    serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
                Ok(Self::DebertaV2(Box::new(debertav2::DebertaV2Model::load(
                    vb, &c,
                )?)))
            }
            "modernbert" => {
                let c: modernbert::Config =
                    serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
                // candle-transformers asks for `model.*` from the checkpoint's top level; the
                // builder here is already narrowed to the encoder (`model` in a
                // `*ForTokenClassification`, nothing in a bare `ModernBertModel`). A renamed
                // builder sees the whole path (its prefix, then `model.`) and hands the inner
                // one, which adds its prefix again, the rest.
                let asked = match vb.prefix() {
                    p if p.is_empty() => "model.".to_string(),
                    p => format!("{p}.model."),
                };
                let vb = vb.rename_f(move |name: &str| {
                    name.strip_prefix(&asked).unwrap_or(name).to_string()
                });
                Ok(Self::ModernBert(modernbert::ModernBert::load(vb, &c)?))
            }
            other => candle_core::bail!("model_type {other:?} has no candle-transformers path"),
        }
    }

    /// The architecture's name, as GetInfo reports it.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::DebertaV2(_) => "deberta-v2",
            Self::ModernBert(_) => "modernbert",
        }
    }

    /// Last hidden states `[batch, seq, hidden]`.
    pub(super) fn forward(&self, input: &EncoderInput) -> Result<Tensor> {
        match self {
            Self::DebertaV2(m) => {
                let mask = input.attention_mask.to_dtype(DType::I64)?;
                m.forward(&input.input_ids, input.type_ids.clone(), Some(mask))
            }
            Self::ModernBert(m) => {
                let mask = input.attention_mask.to_dtype(DType::F32)?;
                m.forward(&input.input_ids, &mask)
            }
        }
    }
}

/// ModernBERT's token-classification head before its classifier (`head.dense`, GELU,
/// `head.norm`; no biases), as in transformers' `ModernBertForTokenClassification`.
#[derive(Debug, Clone)]
pub(super) struct PredictionHead {
    dense: Linear,
    norm: LayerNorm,
}

impl PredictionHead {
    /// The head under `vb` (`head`), when the checkpoint has one.
    pub(super) fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Option<Self>> {
        if !vb.contains_tensor("dense.weight") {
            return Ok(None);
        }
        let h = cfg.hidden_size;
        let flag = |key: &str| cfg.extra.get(key).and_then(serde_json::Value::as_bool);
        match cfg
            .extra
            .get("classifier_activation")
            .and_then(|v| v.as_str())
        {
            None | Some("gelu") => {}
            Some(other) => {
                candle_core::bail!("classifier_activation {other:?} is not supported (gelu)")
            }
        }
        let dense = if flag("classifier_bias") == Some(true) {
            candle_nn::linear(h, h, vb.pp("dense"))?
        } else {
            candle_nn::linear_no_bias(h, h, vb.pp("dense"))?
        };
        // ModernBERT's epsilon is `norm_eps`.
        let eps = cfg
            .extra
            .get("norm_eps")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(cfg.layer_norm_eps);
        let norm = if flag("norm_bias") == Some(true) {
            candle_nn::layer_norm(h, eps, vb.pp("norm"))?
        } else {
            candle_nn::layer_norm_no_bias(h, eps, vb.pp("norm"))?
        };
        Ok(Some(Self { dense, norm }))
    }

    /// The transformed states.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.dense.forward(x)?.gelu_erf()?)
    }
}
