//! Loading a model saved as a low-rank adapter over a base model ([`AdapterConfig`]): the
//! base's weights, renamed under the model's prefix, with the model's own tensors (biases,
//! layer norms, head, casing embedding) in place of the base's, and each adapted dense weight
//! merged, `W + scale B A`. The result is an ordinary set of weights: the fused f32 and int8
//! kernels run it as they run any model, at the same cost as the base.

use super::config::AdapterConfig;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Suffixes of an adapter's two factors.
const LORA_A: &str = "lora_A";
const LORA_B: &str = "lora_B";

/// The directory of the base `adapter` names, for a model in `model_dir`.
pub fn base_dir(model_dir: &Path, adapter: &AdapterConfig) -> PathBuf {
    let base = PathBuf::from(&adapter.base);
    if base.is_absolute() {
        base
    } else {
        model_dir.join(base)
    }
}

/// The base's encoder tensors (`base`, by their names without the base's prefix) under
/// `adapter.prefix`, replaced by `own`'s where it has them, with the adapters merged into
/// their weights; then `own`'s other tensors (the head). All in f32.
pub fn merge(
    base: HashMap<String, Tensor>,
    mut own: HashMap<String, Tensor>,
    adapter: &AdapterConfig,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (bare, w) in base {
        let target = format!("{}.{bare}", adapter.prefix);
        let tensor = match own.remove(&target) {
            Some(t) => t.to_dtype(DType::F32)?,
            None => {
                let w = w.to_dtype(DType::F32)?;
                match target.strip_suffix(".weight") {
                    Some(stem) => merge_one(w, stem, &mut own, adapter.scale())?,
                    None => w,
                }
            }
        };
        out.insert(target, tensor);
    }
    if let Some(left) = own
        .keys()
        .find(|k| k.ends_with(LORA_A) || k.ends_with(LORA_B))
    {
        candle_core::bail!("adapter {left} has no weight in the base model");
    }
    out.extend(own);
    Ok(out)
}

/// `w + scale B A` when `own` holds the adapter of `stem` (taking it out), else `w`.
fn merge_one(
    w: Tensor,
    stem: &str,
    own: &mut HashMap<String, Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (a, b) = (format!("{stem}.{LORA_A}"), format!("{stem}.{LORA_B}"));
    match (own.remove(&a), own.remove(&b)) {
        (Some(a), Some(b)) => {
            let delta = b
                .to_dtype(DType::F32)?
                .matmul(&a.to_dtype(DType::F32)?)?
                .affine(scale, 0.0)?;
            w + delta
        }
        (None, None) => Ok(w),
        _ => candle_core::bail!("{stem}: an adapter needs both {LORA_A} and {LORA_B}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_adapter_merges_as_the_layer_computes_it() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [2., 2.]], &dev)?; // [out 3, in 2]
        let a = Tensor::new(&[[1f32, 2.]], &dev)?; // [rank 1, in 2]
        let b = Tensor::new(&[[1f32], [0.], [-1.]], &dev)?; // [out 3, rank 1]
        let mut own = HashMap::from([
            ("l.lora_A".to_string(), a.clone()),
            ("l.lora_B".to_string(), b.clone()),
        ]);
        let merged = merge_one(w.clone(), "l", &mut own, 2.0)?;
        assert!(own.is_empty());
        let x = Tensor::new(&[[3f32, -1.]], &dev)?;
        let layer = (x.matmul(&w.t()?)? + x.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(2.0, 0.0)?)?;
        let diff = (x.matmul(&merged.t()?)? - layer)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-6);
        let mut half = HashMap::from([("l.lora_A".to_string(), a)]);
        assert!(merge_one(w, "l", &mut half, 2.0).is_err());
        Ok(())
    }
}
