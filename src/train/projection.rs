//! `tidings train projection`: a linear map from a multi-task model's pooled states to its
//! base sentence encoder's embeddings, fitted in closed form (ridge regression) on unlabelled
//! text, and stored in the model directory.
//!
//! Training with distillation keeps the pooled states near the base encoder's, but not on
//! every kind of text: the NER loss moves the states most on short texts, which the chunk-level
//! distillation sees least. A linear map fitted on sentences and short runs of sentences
//! takes them back into the base encoder's space for the cost of one 384x384 product per
//! embedding, so zero-shot labels and heads fitted on the base encoder keep their meaning.

use super::conll;
use crate::model::heads::TOPIC_PROJECTION;
use crate::model::{ModelDir, Precision, SentenceEmbedder};
use crate::pipeline::batch::Row;
use crate::pipeline::{embeddings, tokens, Specials};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// What a fit reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProjectionReport {
    /// Texts fitted on.
    pub fit_texts: usize,
    /// Texts held out to measure the fit.
    pub held_out_texts: usize,
    /// Mean cosine between the model's pooled states and the base encoder's embeddings on
    /// the held-out texts, before the map.
    pub cosine_before: f64,
    /// The same after the map.
    pub cosine_after: f64,
}

/// Texts of a CoNLL file: each sentence alone, and each run of three sentences.
pub fn texts_of(path: &Path) -> Result<Vec<String>> {
    let docs = conll::read(path)?;
    let mut sentences = Vec::new();
    for d in &docs {
        for s in &d.sentences {
            sentences.push(s.words.join(" "));
        }
    }
    let mut out = sentences.clone();
    out.extend(sentences.chunks(3).map(|c| c.join("\n")));
    Ok(out)
}

/// Unit embeddings of `texts` (each cut to one window) by `model`.
fn embed_all(model: &SentenceEmbedder, dir: &ModelDir, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let sp = Specials::of(dir)?;
    let max = dir.config.max_tokens().saturating_sub(2).min(254);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let toks = chunk
            .iter()
            .map(|t| {
                let mut k = tokens::tokenize(&dir.tokenizer, t)?;
                k.truncate(max);
                Ok(k)
            })
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<Row> = toks.iter().map(Row::from).collect();
        out.extend(embeddings(model, &rows, sp, &Device::Cpu)?);
    }
    Ok(out)
}

/// Solves `(A + ridge I) X = B` for symmetric positive definite `A` (`n x n`, row-major) and
/// `B` (`n x m`) by Cholesky factorisation; returns `X` (`n x m`).
fn solve_spd(a: &[f64], b: &[f64], n: usize, m: usize, ridge: f64) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { ridge } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 {
                    bail!("the system is not positive definite (raise --ridge)");
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut x = b.to_vec();
    for c in 0..m {
        // L y = b
        for i in 0..n {
            let mut s = x[i * m + c];
            for k in 0..i {
                s -= l[i * n + k] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * n + i];
        }
        // L^T x = y
        for i in (0..n).rev() {
            let mut s = x[i * m + c];
            for k in i + 1..n {
                s -= l[k * n + i] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * n + i];
        }
    }
    Ok(x)
}

/// The map `y = W x + b` minimising `|W x + b - y|^2 + ridge (|W|^2 + |b|^2)` over the pairs;
/// returns
/// `W` (`[out, in]`, row-major) and `b`.
pub fn fit(xs: &[Vec<f32>], ys: &[Vec<f32>], ridge: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let (Some(x0), Some(y0)) = (xs.first(), ys.first()) else {
        bail!("no texts to fit on");
    };
    let (d, e) = (x0.len() + 1, y0.len());
    let mut ata = vec![0f64; d * d];
    let mut aty = vec![0f64; d * e];
    let mut row = vec![0f64; d];
    for (x, y) in xs.iter().zip(ys) {
        row[..d - 1]
            .iter_mut()
            .zip(x)
            .for_each(|(r, &v)| *r = v as f64);
        row[d - 1] = 1.0;
        for i in 0..d {
            let ri = row[i];
            for j in 0..=i {
                ata[i * d + j] += ri * row[j];
            }
            for (k, &yk) in y.iter().enumerate() {
                aty[i * e + k] += ri * yk as f64;
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            ata[j * d + i] = ata[i * d + j];
        }
    }
    let sol = solve_spd(&ata, &aty, d, e, ridge)?;
    // sol is [in + 1, out]: transpose into [out, in] and the bias row.
    let mut w = vec![0f32; e * (d - 1)];
    for i in 0..d - 1 {
        for k in 0..e {
            w[k * (d - 1) + i] = sol[i * e + k] as f32;
        }
    }
    let b = (0..e).map(|k| sol[(d - 1) * e + k] as f32).collect();
    Ok((w, b))
}

fn apply(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let n = x.len();
    let mut y: Vec<f32> = b
        .iter()
        .enumerate()
        .map(|(k, &bk)| {
            bk + w[k * n..(k + 1) * n]
                .iter()
                .zip(x)
                .map(|(a, v)| a * v)
                .sum::<f32>()
        })
        .collect();
    let norm = y.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    y.iter_mut().for_each(|v| *v /= norm);
    y
}

fn mean_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let total: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum::<f64>())
        .sum();
    total / a.len().max(1) as f64
}

/// Fits the projection of the model in `model_dir` towards `base_dir`'s embeddings on the
/// texts of the CoNLL file `data` (every tenth held out to measure it), and writes it into
/// the model directory (its weights' dtype; `tidings_topic_projection` in its config).
pub fn train(
    model_dir: &Path,
    base_dir: &Path,
    data: &Path,
    ridge: f64,
) -> Result<ProjectionReport> {
    let device = Device::Cpu;
    let dir = ModelDir::open(model_dir)?;
    if !dir.config.tidings_shared_encoder {
        bail!(
            "{}: not a model trained for both tasks (no tidings_shared_encoder in config.json)",
            model_dir.display()
        );
    }
    let base = ModelDir::open(base_dir)?;
    let student = SentenceEmbedder::load_with(&dir, &device, Precision::F32)?.without_projection();
    let teacher = SentenceEmbedder::load_with(&base, &device, Precision::F32)?;
    let texts = texts_of(data)?;
    let xs = embed_all(&student, &dir, &texts)?;
    let ys = embed_all(&teacher, &base, &texts)?;
    let held = |i: &usize| i % 10 == 9;
    let pick = |v: &[Vec<f32>], keep: bool| -> Vec<Vec<f32>> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| held(i) != keep)
            .map(|(_, x)| x.clone())
            .collect()
    };
    let (fx, fy) = (pick(&xs, true), pick(&ys, true));
    let (hx, hy) = (pick(&xs, false), pick(&ys, false));
    let (w, b) = fit(&fx, &fy, ridge)?;
    let mapped: Vec<Vec<f32>> = hx.iter().map(|x| apply(&w, &b, x)).collect();
    let report = ProjectionReport {
        fit_texts: fx.len(),
        held_out_texts: hx.len(),
        cosine_before: mean_cosine(&hx, &hy),
        cosine_after: mean_cosine(&mapped, &hy),
    };

    // Write the tensors beside the model's, in its dtype, and flag them in config.json.
    let weights_path = dir.weights_path();
    let mut tensors = candle_core::safetensors::load(&weights_path, &device)
        .with_context(|| format!("reading {}", weights_path.display()))?;
    // The head's dtype (f16 as Tidings ships its models); some checkpoints also hold integer
    // buffers.
    let dtype = tensors
        .get("classifier.weight")
        .map_or(DType::F32, |t| t.dtype());
    let h = b.len();
    tensors.insert(
        format!("{TOPIC_PROJECTION}.weight"),
        Tensor::from_vec(w, (h, h), &device)?.to_dtype(dtype)?,
    );
    tensors.insert(
        format!("{TOPIC_PROJECTION}.bias"),
        Tensor::from_vec(b, h, &device)?.to_dtype(dtype)?,
    );
    let tmp = weights_path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &weights_path)?;
    let config_path = model_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["tidings_topic_projection"] = serde_json::json!(true);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_linear_map() {
        // y = M x + c exactly; the fit (tiny ridge) finds it.
        let m = [[0.5f32, -1.0, 0.0], [2.0, 0.25, 1.0]];
        let c = [0.1f32, -0.3];
        let xs: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let t = i as f32;
                vec![(t * 0.37).sin(), (t * 0.91).cos(), (t * 0.13).sin() * 2.0]
            })
            .collect();
        let ys: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                (0..2)
                    .map(|k| c[k] + (0..3).map(|i| m[k][i] * x[i]).sum::<f32>())
                    .collect()
            })
            .collect();
        let (w, b) = fit(&xs, &ys, 1e-9).unwrap();
        for k in 0..2 {
            assert!((b[k] - c[k]).abs() < 1e-3, "bias {k}: {} vs {}", b[k], c[k]);
            for i in 0..3 {
                assert!((w[k * 3 + i] - m[k][i]).abs() < 1e-3, "w[{k}][{i}]");
            }
        }
    }
}
