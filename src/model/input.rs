//! What an encoder reads: its own module, so that Tidings' encoder and the
//! candle-transformers ones it wraps ([`super::external`]) share it without importing each
//! other.

use candle_core::Tensor;

/// A batch of token windows, all tensors `[batch, seq]` on the model's device.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    /// Token ids (u32).
    pub input_ids: Tensor,
    /// Segment ids (u32); zeros when absent.
    pub type_ids: Option<Tensor>,
    /// Word-shape classes (u32), read only by models with a casing embedding.
    pub casing: Option<Tensor>,
    /// 1 for real tokens, 0 for padding, in the model's float dtype.
    pub attention_mask: Tensor,
}
