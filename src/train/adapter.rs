//! `tidings train ner --adapter-rank R`: fine-tuning a base encoder through low-rank adapters
//! (LoRA) instead of all its weights. The base's large matrices (dense weights, embedding
//! tables) stay frozen as plain tensors; what trains is an adapter pair on each dense layer
//! (see `encoder::adaptable_layers`), the biases and layer norms, the casing embedding and the
//! head. A run saves only those (a few megabytes instead of the whole encoder), with an
//! [`AdapterConfig`] naming the base they belong to; `model::adapter` merges them at load.

use crate::model::config::AdapterConfig;
use crate::model::encoder::adaptable_layers;
use crate::model::{ModelConfig, ModelDir};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use sha2::Digest;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Base tensors this large or larger (and of two or more dimensions) stay frozen: every dense
/// weight and embedding table; biases, layer norms and MPNet's small relative-position table
/// train.
const FROZEN_MIN_ELEMENTS: usize = 65_536;

/// The adapter a run with `rank` (> 0) and `alpha` (0 = twice the rank) trains on `base`,
/// saved to `out`: the base named relative to `out` when both sit in one directory (as
/// `models/mpnet` and `models/ner-accurate` do), else by its absolute path.
pub fn config_for(
    base: &ModelDir,
    out: &Path,
    prefix: &str,
    rank: usize,
    alpha: f64,
) -> Result<AdapterConfig> {
    let weights = base.weights_path();
    let (sha256, bytes) = sha256_of(&weights)?;
    let base_dir = base
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", base.dir.display()))?;
    let out_parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .ok();
    let name = base_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let base_name = match (out_parent, base_dir.parent(), name) {
        (Some(op), Some(bp), Some(name)) if op == bp => format!("../{name}"),
        _ => base_dir.to_string_lossy().into_owned(),
    };
    Ok(AdapterConfig {
        base: base_name,
        base_sha256: sha256,
        base_bytes: bytes,
        prefix: prefix.to_string(),
        rank,
        alpha: if alpha > 0.0 {
            alpha
        } else {
            2.0 * rank as f64
        },
    })
}

/// sha256 (hex) and size of a file.
fn sha256_of(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, bytes))
}

/// The frozen part of an adapter run: `base`'s large tensors, named as the trained model
/// names them (under `prefix`), on `device` in f32.
pub fn frozen_base(
    base: &ModelDir,
    prefix: &str,
    device: &Device,
) -> Result<Arc<HashMap<String, Tensor>>> {
    let mut frozen = HashMap::new();
    for (bare, t) in base.encoder_tensors(device)? {
        if t.rank() < 2 || t.elem_count() < FROZEN_MIN_ELEMENTS {
            continue;
        }
        frozen.insert(format!("{prefix}.{bare}"), t.to_dtype(DType::F32)?);
    }
    Ok(Arc::new(frozen))
}

/// Adds an adapter pair to `varmap` for each adaptable dense layer of `cfg` under `prefix`:
/// `lora_A` drawn uniformly from `±1/sqrt(in)` (seeded), `lora_B` zero, so training starts
/// from the base's own function. Returns how many tensors it added.
pub fn add_adapters(
    varmap: &mut VarMap,
    cfg: &ModelConfig,
    prefix: &str,
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10_7a);
    let mut added = 0;
    for (name, d_in, d_out) in adaptable_layers(cfg)? {
        let a_name = format!("{prefix}.{name}.lora_A");
        let b_name = format!("{prefix}.{name}.lora_B");
        varmap.get((rank, d_in), &a_name, Init::Const(0.), DType::F32, device)?;
        varmap.get((d_out, rank), &b_name, Init::Const(0.), DType::F32, device)?;
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..rank * d_in)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
            .collect();
        varmap.set_one(&a_name, Tensor::from_vec(a, (rank, d_in), device)?)?;
        added += 2;
    }
    Ok(added)
}

/// Whether `name` is an adapter factor.
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_A") || name.ends_with(".lora_B")
}

/// A builder over `varmap`'s trainable vars (creating those it lacks) and the `frozen`
/// tensors (plain tensors: no gradient is kept for them).
pub fn var_builder(
    varmap: &VarMap,
    frozen: &Arc<HashMap<String, Tensor>>,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = PartlyFrozen {
        frozen: frozen.clone(),
        vars: varmap.clone(),
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// Frozen tensors first, then the trainable vars.
struct PartlyFrozen {
    frozen: Arc<HashMap<String, Tensor>>,
    vars: VarMap,
}

impl SimpleBackend for PartlyFrozen {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.frozen.get(name) {
            Some(t) if t.shape() == &s => Ok(t.clone()),
            Some(t) => candle_core::bail!(
                "frozen {name}: shape {:?}, the model expects {s:?}",
                t.shape()
            ),
            None => self.vars.get(s, name, h, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.frozen.get(name) {
            Some(t) => Ok(t.clone()),
            None => SimpleBackend::get_unchecked(&self.vars, name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.frozen.contains_key(name) || SimpleBackend::contains_tensor(&self.vars, name)
    }
}
