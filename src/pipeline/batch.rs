//! Packs token windows into padded tensors for one forward pass.

use crate::model::EncoderInput;
use candle_core::{DType, Device, Result, Tensor};

/// One model input row: the pieces of a window, before special tokens are added.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// Vocabulary ids.
    pub ids: &'a [u32],
    /// Word shapes.
    pub casing: &'a [u32],
}

impl<'a> From<&'a super::tokens::Tokens> for Row<'a> {
    /// All of a tokenized text's pieces as one row.
    fn from(t: &'a super::tokens::Tokens) -> Self {
        Self {
            ids: &t.ids,
            casing: &t.casing,
        }
    }
}

/// Builds `[batch, 2 + longest]` tensors: `cls` + pieces + `sep`, right-padded with `pad`.
pub fn encode_rows(
    rows: &[Row<'_>],
    cls: u32,
    sep: u32,
    pad: u32,
    device: &Device,
) -> Result<EncoderInput> {
    let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0) + 2;
    let b = rows.len();
    let mut ids = vec![pad; b * seq];
    let mut casing = vec![0u32; b * seq];
    let mut mask = vec![0f32; b * seq];
    for (r, row) in rows.iter().enumerate() {
        let base = r * seq;
        ids[base] = cls;
        ids[base + 1..base + 1 + row.ids.len()].copy_from_slice(row.ids);
        ids[base + 1 + row.ids.len()] = sep;
        casing[base + 1..base + 1 + row.casing.len()].copy_from_slice(row.casing);
        mask[base..base + row.ids.len() + 2].fill(1.0);
    }
    Ok(EncoderInput {
        input_ids: Tensor::from_vec(ids, (b, seq), device)?,
        type_ids: None,
        casing: Some(Tensor::from_vec(casing, (b, seq), device)?),
        attention_mask: Tensor::from_vec(mask, (b, seq), device)?.to_dtype(DType::F32)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_wrapped_and_padded() {
        let rows = [
            Row {
                ids: &[7, 8, 9],
                casing: &[1, 2, 3],
            },
            Row {
                ids: &[5],
                casing: &[4],
            },
        ];
        let x = encode_rows(&rows, 101, 102, 0, &Device::Cpu).unwrap();
        assert_eq!(
            x.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![101, 7, 8, 9, 102], vec![101, 5, 102, 0, 0]]
        );
        assert_eq!(
            x.attention_mask.to_vec2::<f32>().unwrap()[1],
            vec![1.0, 1.0, 1.0, 0.0, 0.0]
        );
        assert_eq!(
            x.casing.unwrap().to_vec2::<u32>().unwrap()[0],
            vec![0, 1, 2, 3, 0]
        );
    }
}
