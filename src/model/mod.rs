//! The model layer: Hugging Face-format model directories loaded into candle.
//!
//! - [`adapter`] — a model saved as low-rank adapters over a base model, merged at load.
//! - [`choices`] — kernel and profiling choices given as flags.
//! - [`config`] — `config.json`.
//! - [`encoder`] — the transformer body: Tidings' own for the BERT family (BERT, RoBERTa/XLM-R,
//!   DistilBERT) and MPNet; candle-transformers' for DeBERTa-v2 and ModernBERT (`external`).
//! - [`fused`] and [`kernels`] — the fused, unpadded f32 CPU inference path of the layers.
//! - [`sgemm`] — weights packed once at load for an AVX2+FMA microkernel (the fused path's
//!   linear layers).
//! - [`qgemm`] — the int8 path: weights quantized at load, activations per call.
//! - [`train_ops`] — layer norm, softmax and GELU with fused backward passes, for training.
//! - [`device`] — where the models run (`--device cpu|cuda[:N]`).
//! - [`files`] — a model directory on disk (config, tokenizer, weights) and its loading errors.
//! - [`heads`] — what sits on the encoder: token classification (NER) and mean-pooled
//!   sentence embeddings (topics).

pub mod adapter;
pub mod choices;
pub mod config;
pub mod device;
pub mod encoder;
mod external;
pub mod files;
mod fused;
pub mod heads;
pub mod input;
mod kernels;
pub mod precision;
pub mod qgemm;
pub mod sgemm;
pub mod train_ops;

pub use config::ModelConfig;
pub use device::{DeviceError, DeviceSpec};
pub use encoder::{Encoder, EncoderInput, Mode, Precision};
pub use files::{ModelDir, ModelError};
pub use fused::profile;
pub use heads::{SentenceEmbedder, TokenClassifier};
