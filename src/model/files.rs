//! A model directory in Hugging Face layout: `config.json`, `tokenizer.json` and
//! `model.safetensors`, opened and checked before any weight is read.

use super::config::{AdapterConfig, ModelConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Why a model directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A required file is missing.
    #[error("model directory {dir}: missing {file} (run `models/fetch`, or point the flag at an HF-format model directory)")]
    Missing {
        /// The directory.
        dir: PathBuf,
        /// The file name.
        file: &'static str,
    },
    /// `config.json` does not parse.
    #[error("{path}: invalid config: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// `tokenizer.json` does not load.
    #[error("{path}: invalid tokenizer: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },
    /// The weights are corrupt or do not fit the config.
    #[error("{dir}: cannot load weights: {source}")]
    Weights {
        /// The directory.
        dir: PathBuf,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The model is readable but unfit for the role it was given.
    #[error("{dir}: {message}")]
    Unfit {
        /// The directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// An opened model directory: parsed config and tokenizer, weights not yet read.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// Where it lies.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: ModelConfig,
    /// Its tokenizer, with padding and truncation switched off (Tidings windows texts itself).
    pub tokenizer: Tokenizer,
    /// Raw bytes of `tokenizer.json`, to tell whether two models share a tokenizer.
    pub tokenizer_json: Vec<u8>,
}

impl ModelDir {
    /// Opens `dir`, parsing `config.json` and `tokenizer.json` and checking that
    /// `model.safetensors` exists.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let need = |file: &'static str| -> Result<PathBuf, ModelError> {
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::Missing {
                    dir: dir.clone(),
                    file,
                })
            }
        };
        let config_path = need("config.json")?;
        let tokenizer_path = need("tokenizer.json")?;
        need("model.safetensors")?;
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ModelError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let config: ModelConfig =
            serde_json::from_slice(&read(&config_path)?).map_err(|source| ModelError::Config {
                path: config_path.clone(),
                source,
            })?;
        let tokenizer_json = read(&tokenizer_path)?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer_json).map_err(|e| ModelError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            dir,
            config,
            tokenizer,
            tokenizer_json,
        })
    }

    /// Path of the weights file.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// Memory-maps the weights, converting them to `dtype`; a model saved as an adapter over
    /// a base gets the merged weights (see [`super::adapter`]).
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        if let Some(adapter) = &self.config.tidings_adapter {
            return self.merged_var_builder(adapter, dtype, device);
        }
        // SAFETY: the file is memory-mapped read-only; Tidings never writes to a model it
        // serves. A file truncated by someone else under a running server is outside what any
        // mmap-based loader (candle's examples, TEI) can guard against.
        unsafe { VarBuilder::from_mmaped_safetensors(&[self.weights_path()], dtype, device) }
            .map_err(|source| self.weights_error(source))
    }

    /// The weights of this model, an adapter over the base `adapter` names, merged into the
    /// base's ([`super::adapter::merge`]), as a builder in `dtype` on `device`. A base of
    /// another size than the one trained on is refused.
    fn merged_var_builder(
        &self,
        adapter: &AdapterConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        let unfit = |message: String| ModelError::Unfit {
            dir: self.dir.clone(),
            message,
        };
        let base = ModelDir::open(super::adapter::base_dir(&self.dir, adapter)).map_err(|e| {
            unfit(format!(
                "an adapter over {}, which does not open: {e}",
                adapter.base
            ))
        })?;
        let bytes = std::fs::metadata(base.weights_path())
            .map_err(|source| ModelError::Io {
                path: base.weights_path(),
                source,
            })?
            .len();
        if bytes != adapter.base_bytes {
            return Err(unfit(format!(
                "an adapter over {} ({} bytes, sha256 {}), but {} holds {bytes} bytes: other \
                 weights",
                adapter.base,
                adapter.base_bytes,
                adapter.base_sha256,
                base.weights_path().display()
            )));
        }
        let own = candle_core::safetensors::load(self.weights_path(), &Device::Cpu)
            .map_err(|e| self.weights_error(e))?;
        let merged = super::adapter::merge(base.encoder_tensors(&Device::Cpu)?, own, adapter)
            .and_then(|m| {
                m.into_iter()
                    .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(device)?)))
                    .collect::<candle_core::Result<HashMap<_, _>>>()
            })
            .map_err(|e| self.weights_error(e))?;
        Ok(VarBuilder::from_tensors(merged, dtype, device))
    }

    /// The encoder's tensors of this model's file, read whole onto `device`, named without
    /// the encoder's prefix ([`ModelDir::encoder_prefix`]; tensors outside it are left out):
    /// what training starts from and what an adapter is merged into.
    pub fn encoder_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
        let prefix = self.encoder_prefix(&self.var_builder(DType::F32, device)?)?;
        let all = candle_core::safetensors::load(self.weights_path(), device)
            .map_err(|e| self.weights_error(e))?;
        Ok(all
            .into_iter()
            .filter_map(|(name, t)| {
                let bare = if prefix.is_empty() {
                    name
                } else {
                    name.strip_prefix(&format!("{prefix}."))?.to_string()
                };
                Some((bare, t))
            })
            .collect())
    }

    /// Wraps a candle error from loading this model's weights.
    pub fn weights_error(&self, source: candle_core::Error) -> ModelError {
        ModelError::Weights {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The prefix under which the encoder's tensors sit (`bert`, `roberta`, `distilbert`,
    /// `mpnet`, or none for a bare encoder such as all-MiniLM-L6-v2).
    pub fn encoder_prefix(&self, vb: &VarBuilder) -> Result<String, ModelError> {
        let prefixes = [
            "",
            "bert",
            "roberta",
            "distilbert",
            "mpnet",
            "deberta",
            "model",
        ];
        for prefix in prefixes {
            // ModernBERT calls its word embedding `tok_embeddings`.
            for table in ["word_embeddings", "tok_embeddings"] {
                let name = if prefix.is_empty() {
                    format!("embeddings.{table}.weight")
                } else {
                    format!("{prefix}.embeddings.{table}.weight")
                };
                if vb.contains_tensor(&name) {
                    return Ok(prefix.to_string());
                }
            }
        }
        Err(ModelError::Unfit {
            dir: self.dir.clone(),
            message: "no encoder found: no tensor named [prefix.]embeddings.word_embeddings.weight"
                .into(),
        })
    }

    /// Id of the token that opens a window (`[CLS]` or `<s>`) and of the one that closes it.
    ///
    /// The tokenizer's own post-processor decides where it has one (MPNet's vocabulary holds
    /// BERT's `[CLS]` and `[SEP]` too, but wraps sequences in `<s>` ... `</s>`); otherwise the
    /// names, in the order the architecture uses them.
    pub fn special_ids(&self) -> Result<(u32, u32), ModelError> {
        if let Ok(enc) = self.tokenizer.encode("", true) {
            if let [cls, sep] = enc.get_ids() {
                return Ok((*cls, *sep));
            }
        }
        let find = |names: &[&str]| names.iter().find_map(|n| self.tokenizer.token_to_id(n));
        let (open, close) = match self.config.model_type.as_str() {
            "bert" | "distilbert" => (["[CLS]", "<s>"], ["[SEP]", "</s>"]),
            _ => (["<s>", "[CLS]"], ["</s>", "[SEP]"]),
        };
        match (find(&open), find(&close)) {
            (Some(cls), Some(sep)) => Ok((cls, sep)),
            _ => Err(ModelError::Unfit {
                dir: self.dir.clone(),
                message: "tokenizer has no [CLS]/<s> or [SEP]/</s> token".into(),
            }),
        }
    }
}
