//! `tidings train topics`: a linear classification head over the topic encoder's article
//! embeddings, for users with their own labelled data and taxonomy.
//!
//! The encoder stays frozen: articles are embedded once (exactly as serving embeds them),
//! then a softmax regression is fitted with AdamW on the cached vectors, which takes seconds.
//! Accuracy is estimated by k-fold cross-validation before the final fit on all rows.

use crate::pipeline::analysis::LabelSet;
use crate::pipeline::topics;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// One labelled article.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Class name (for AG-style CSV, the label column as written, e.g. `3`).
    pub label: String,
    /// Headline, possibly empty.
    pub title: String,
    /// Body.
    pub text: String,
}

/// Reads labelled articles: CSV with columns `label,title,description` and a header (the AG
/// News layout), or JSONL of `{"label", "text", "title"?}` (by the `.jsonl` extension).
pub fn read_examples(path: &std::path::Path) -> Result<Vec<Example>> {
    use anyhow::Context;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = Vec::new();
    if is_jsonl {
        #[derive(serde::Deserialize)]
        struct Line {
            #[serde(default)]
            label: String,
            text: String,
            #[serde(default)]
            title: String,
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let l: Line =
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            out.push(Example {
                label: l.label,
                title: l.title,
                text: l.text,
            });
        }
    } else {
        let mut rdr =
            csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
            let field = |k: usize| rec.get(k).unwrap_or("").trim().to_string();
            out.push(Example {
                label: field(0),
                title: field(1),
                text: field(2),
            });
        }
    }
    Ok(out)
}

/// Settings of the head fit.
#[derive(Debug, Clone, Copy)]
pub struct HeadConfig {
    /// Full-batch optimizer steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the fold split.
    pub seed: u64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            lr: 0.05,
            weight_decay: 1e-4,
            seed: 13,
        }
    }
}

/// Fits `softmax(W x + b)` on embeddings `x` with class indices `y` (< `names.len()`).
pub fn fit(x: &[Vec<f32>], y: &[usize], names: &[String], cfg: HeadConfig) -> Result<LabelSet> {
    fit_from(x, y, names, cfg, None)
}

/// Steps and learning rate of a head that starts from zero-shot prototypes: few and small, so
/// that a handful of examples adjusts the prototypes rather than replacing them (AdamW moves
/// each weight by at most about `lr` per step: 100 x 0.01 = 1, the size of a prototype's
/// coordinates times the scale).
pub const PRIOR_STEPS: usize = 100;
/// See [`PRIOR_STEPS`].
pub const PRIOR_LR: f64 = 0.01;

/// [`fit`], starting from `prior` (one unit-length zero-shot prototype per class, scaled by
/// [`crate::pipeline::topics::DEFAULT_SCALE`]) instead of zeros when given.
pub fn fit_from(
    x: &[Vec<f32>],
    y: &[usize],
    names: &[String],
    cfg: HeadConfig,
    prior: Option<&[Vec<f32>]>,
) -> Result<LabelSet> {
    let k = names.len();
    let Some(d) = x.first().map(Vec::len) else {
        bail!("no training rows");
    };
    if y.iter().any(|&c| c >= k) {
        bail!("a class index is out of range");
    }
    let dev = Device::Cpu;
    let xs = Tensor::from_vec(x.concat(), (x.len(), d), &dev)?;
    let ys = Tensor::from_vec(
        y.iter().map(|&c| c as u32).collect::<Vec<_>>(),
        y.len(),
        &dev,
    )?;
    let w = match prior {
        Some(p) => {
            if p.len() != k || p.iter().any(|v| v.len() != d) {
                bail!("the prior needs one {d}-dimensional prototype per class");
            }
            let scale = topics::DEFAULT_SCALE;
            let flat: Vec<f32> = p.iter().flatten().map(|v| v * scale).collect();
            Var::from_tensor(&Tensor::from_vec(flat, (k, d), &dev)?)?
        }
        None => Var::zeros((k, d), DType::F32, &dev)?,
    };
    let b = Var::zeros(k, DType::F32, &dev)?;
    let mut opt = AdamW::new(
        vec![w.clone(), b.clone()],
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    for _ in 0..cfg.steps {
        let logits = xs
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
        opt.backward_step(&loss)?;
    }
    Ok(LabelSet {
        names: names.to_vec(),
        weights: w.as_tensor().to_vec2()?,
        bias: b.as_tensor().to_vec1()?,
        scale: 1.0,
        ids: Vec::new(),
        parents: Vec::new(),
        multi_label: None,
        memory: None,
        encoder_probe: Vec::new(),
    })
}

/// A few-shot head that needs no fit: the `prior` prototypes refined with unlabelled
/// articles `pool` and the labelled rows `x`, `y` ([`topics::refine_with_examples`]), and a
/// [`topics::Memory`] of the pool (labelled by the refined prototypes) and the labelled rows,
/// whose nearest neighbours give the scores. With no labelled rows it is the zero-shot
/// labels adapted to the pool.
pub fn memory_head(
    names: &[String],
    prior: &[Vec<f32>],
    pool: std::sync::Arc<Vec<Vec<f32>>>,
    x: &[Vec<f32>],
    y: &[usize],
) -> Result<LabelSet> {
    if prior.len() != names.len() {
        bail!("the prior needs one prototype per class");
    }
    let labelled: Vec<(&[f32], usize)> =
        x.iter().map(Vec::as_slice).zip(y.iter().copied()).collect();
    let refs: Vec<&[f32]> = pool.iter().map(Vec::as_slice).collect();
    let refined = topics::refine_with_examples(prior, &refs, &labelled, topics::REFINE_ROUNDS);
    Ok(memory_head_refined(names, refined, pool, &labelled))
}

/// The head [`memory_head`] builds, from prototypes it has already refined with `pool` and
/// `labelled`.
pub fn memory_head_refined(
    names: &[String],
    refined: Vec<Vec<f32>>,
    pool: std::sync::Arc<Vec<Vec<f32>>>,
    labelled: &[(&[f32], usize)],
) -> LabelSet {
    let memory = topics::Memory::pseudo_labelled(&refined, pool, labelled, topics::DEFAULT_SCALE);
    LabelSet {
        memory: Some(std::sync::Arc::new(memory)),
        ..LabelSet::prototypes(names.to_vec(), refined, topics::DEFAULT_SCALE)
    }
}

/// Accuracy of `head` on rows `x`, `y`.
pub fn accuracy(head: &LabelSet, x: &[Vec<f32>], y: &[usize]) -> f64 {
    let correct = x
        .iter()
        .zip(y)
        .filter(|(v, &c)| {
            let p = head.score(v);
            let best = (0..p.len())
                .max_by(|&a, &b| p[a].total_cmp(&p[b]))
                .unwrap_or(0);
            best == c
        })
        .count();
    correct as f64 / x.len().max(1) as f64
}

/// k-fold cross-validated accuracy (one value per fold) of plain heads ([`fit`]), folds
/// drawn with `cfg.seed`.
pub fn cross_validate(
    x: &[Vec<f32>],
    y: &[usize],
    names: &[String],
    folds: usize,
    cfg: HeadConfig,
) -> Result<Vec<f64>> {
    cross_validate_with(x, y, folds, cfg.seed, |tx, ty| fit(tx, ty, names, cfg))
}

/// k-fold cross-validated accuracy (one value per fold) of the heads `fit_head` makes from
/// the training folds, folds drawn with `seed`.
pub fn cross_validate_with(
    x: &[Vec<f32>],
    y: &[usize],
    folds: usize,
    seed: u64,
    mut fit_head: impl FnMut(&[Vec<f32>], &[usize]) -> Result<LabelSet>,
) -> Result<Vec<f64>> {
    if folds < 2 || folds > x.len() {
        bail!("folds must be between 2 and the number of rows");
    }
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut out = Vec::with_capacity(folds);
    for f in 0..folds {
        let (mut tx, mut ty, mut vx, mut vy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, &r) in order.iter().enumerate() {
            if i % folds == f {
                vx.push(x[r].clone());
                vy.push(y[r]);
            } else {
                tx.push(x[r].clone());
                ty.push(y[r]);
            }
        }
        let head = fit_head(&tx, &ty)?;
        out.push(accuracy(&head, &vx, &vy));
    }
    Ok(out)
}

/// Fails on the first of `examples` (read from `source`) without a label.
pub fn check_labelled(examples: &[Example], source: &std::path::Path) -> Result<()> {
    if let Some(i) = examples.iter().position(|e| e.label.trim().is_empty()) {
        bail!("{}: row {} has no label", source.display(), i + 1);
    }
    Ok(())
}

/// The renames of `--label-names`: comma-separated `value=name` pairs, trimmed (entries
/// without `=` are ignored).
pub fn label_names(spec: Option<&str>) -> std::collections::HashMap<String, String> {
    spec.unwrap_or("")
        .split(',')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The classes of labelled rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Classes {
    /// The distinct label values, sorted: class `i` is `values[i]`.
    pub values: Vec<String>,
    /// The name of each class: its value, or what `--label-names` renames it to.
    pub names: Vec<String>,
    /// Each row's class index.
    pub y: Vec<usize>,
}

impl Classes {
    /// The classes of `examples` (read from `source`), named by the `value=name` pairs of
    /// `label_names` ([`label_names`]); at least two are needed.
    pub fn new(
        examples: &[Example],
        label_names: Option<&str>,
        source: &std::path::Path,
    ) -> Result<Self> {
        let rename = self::label_names(label_names);
        let mut values: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
        values.sort();
        values.dedup();
        if values.len() < 2 {
            bail!("{}: need at least two labels", source.display());
        }
        let names = values
            .iter()
            .map(|v| rename.get(v).cloned().unwrap_or_else(|| v.clone()))
            .collect();
        let y = examples
            .iter()
            .map(|e| values.binary_search(&e.label).unwrap_or(0))
            .collect();
        Ok(Self { values, names, y })
    }
}

/// The head settings of `tidings train topics`: `steps` optimizer steps (by default 300, or
/// [`PRIOR_STEPS`] from a prior) at the default learning rate, or [`PRIOR_LR`] from a prior.
pub fn head_config(steps: Option<usize>, prior: bool) -> HeadConfig {
    HeadConfig {
        steps: steps.unwrap_or(if prior { PRIOR_STEPS } else { 300 }),
        lr: if prior {
            PRIOR_LR
        } else {
            HeadConfig::default().lr
        },
        ..HeadConfig::default()
    }
}

/// The head `tidings train topics` makes of rows `x`, `y`: with a `prior` and unlabelled
/// articles, a [`memory_head`]; otherwise a fitted regression ([`fit_from`]), from the prior
/// when there is one.
pub fn fit_head(
    names: &[String],
    cfg: HeadConfig,
    prior: Option<&[Vec<f32>]>,
    unlabelled: &std::sync::Arc<Vec<Vec<f32>>>,
    x: &[Vec<f32>],
    y: &[usize],
) -> Result<LabelSet> {
    match prior {
        Some(p) if !unlabelled.is_empty() => memory_head(names, p, unlabelled.clone(), x, y),
        p => fit_from(x, y, names, cfg, p),
    }
}

/// A head fitted on all rows, and the cross-validated accuracy of its kind.
#[derive(Debug, Clone)]
pub struct TrainedHead {
    /// The head, fitted on every row.
    pub head: LabelSet,
    /// Accuracy on each held-out fold.
    pub folds: Vec<f64>,
}

impl TrainedHead {
    /// Mean accuracy over the folds.
    pub fn mean_accuracy(&self) -> f64 {
        self.folds.iter().sum::<f64>() / self.folds.len() as f64
    }
}

/// Cross-validates the head [`fit_head`] makes over `folds` folds (drawn with `cfg.seed`),
/// then fits it on all rows.
pub fn train_head(
    x: &[Vec<f32>],
    y: &[usize],
    names: &[String],
    cfg: HeadConfig,
    prior: Option<&[Vec<f32>]>,
    unlabelled: &std::sync::Arc<Vec<Vec<f32>>>,
    folds: usize,
) -> Result<TrainedHead> {
    let make = |tx: &[Vec<f32>], ty: &[usize]| fit_head(names, cfg, prior, unlabelled, tx, ty);
    let folds = cross_validate_with(x, y, folds, cfg.seed, make)?;
    let head = make(x, y)?;
    Ok(TrainedHead { head, folds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_classes_are_learned() {
        let names: Vec<String> = vec!["a".into(), "b".into()];
        let x: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                if i % 2 == 0 {
                    vec![1.0, 0.1 * (i as f32 / 40.0)]
                } else {
                    vec![0.0, 1.0]
                }
            })
            .collect();
        let y: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let head = fit(&x, &y, &names, HeadConfig::default()).unwrap();
        assert_eq!(accuracy(&head, &x, &y), 1.0);
        let cv = cross_validate(&x, &y, &names, 4, HeadConfig::default()).unwrap();
        assert!(cv.iter().all(|&a| a == 1.0), "{cv:?}");
    }

    fn example(label: &str) -> Example {
        Example {
            label: label.into(),
            title: String::new(),
            text: format!("about {label}"),
        }
    }

    #[test]
    fn label_names_are_parsed_and_trimmed() {
        let m = label_names(Some(" 1 = World ,2=Sports,bad,3=Sci/Tech=x"));
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m["1"], "World");
        assert_eq!(m["2"], "Sports");
        assert_eq!(m["3"], "Sci/Tech=x", "split at the first =");
        assert!(label_names(None).is_empty());
        assert!(label_names(Some("")).is_empty());
    }

    #[test]
    fn classes_are_the_sorted_values_renamed() {
        let rows: Vec<Example> = ["2", "1", "3", "2"].iter().map(|l| example(l)).collect();
        let path = std::path::Path::new("data.csv");
        let c = Classes::new(&rows, Some("1=World,3=Sci"), path).unwrap();
        assert_eq!(c.values, ["1", "2", "3"]);
        assert_eq!(c.names, ["World", "2", "Sci"]);
        assert_eq!(c.y, [1, 0, 2, 1]);
        let one = Classes::new(&rows[..1], None, path).unwrap_err();
        assert_eq!(one.to_string(), "data.csv: need at least two labels");
    }

    #[test]
    fn a_row_without_a_label_is_named() {
        let path = std::path::Path::new("d.jsonl");
        let rows = vec![example("a"), example(" "), example("")];
        let err = check_labelled(&rows, path).unwrap_err();
        assert_eq!(err.to_string(), "d.jsonl: row 2 has no label");
        assert!(check_labelled(&rows[..1], path).is_ok());
    }

    #[test]
    fn head_settings_follow_the_prior() {
        let plain = head_config(None, false);
        assert_eq!((plain.steps, plain.lr), (300, HeadConfig::default().lr));
        let prior = head_config(None, true);
        assert_eq!((prior.steps, prior.lr), (PRIOR_STEPS, PRIOR_LR));
        assert_eq!(head_config(Some(7), true).steps, 7);
        assert_eq!(head_config(Some(7), false).steps, 7);
        assert_eq!(prior.seed, HeadConfig::default().seed);
    }

    /// A unit vector of class `c` (0 or 1) in 2 dimensions: near axis `c`, nudged by `i`.
    fn near_axis(c: usize, i: usize) -> Vec<f32> {
        let mut v = [0.03 * (i % 5) as f32; 2];
        v[c] = 1.0;
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter().map(|a| a / norm).collect()
    }

    #[test]
    fn the_head_kind_follows_the_prior_and_the_pool() {
        let names: Vec<String> = vec!["a".into(), "b".into()];
        let x: Vec<Vec<f32>> = (0..24).map(|i| near_axis(i % 2, i)).collect();
        let y: Vec<usize> = (0..24).map(|i| i % 2).collect();
        let prior = vec![vec![1.0f32, 0.0], vec![0.0, 1.0]];
        let none = std::sync::Arc::new(Vec::new());
        let pool = std::sync::Arc::new((0..20).map(|i| near_axis(i % 2, i + 2)).collect());
        let cfg = head_config(None, true);
        let fitted = fit_head(&names, cfg, Some(&prior), &none, &x, &y).unwrap();
        assert!(fitted.memory.is_none(), "no pool: a fitted regression");
        let plain = fit_head(&names, head_config(None, false), None, &pool, &x, &y).unwrap();
        assert!(plain.memory.is_none(), "no prior: the pool is not used");
        assert_eq!(accuracy(&plain, &x, &y), 1.0);
        let memory = fit_head(&names, cfg, Some(&prior), &pool, &x, &y).unwrap();
        let remembered = memory.memory.as_ref().map(|m| m.vectors.len());
        assert_eq!(remembered, Some(20 + 24), "the pool and the labelled rows");
        let trained = train_head(&x, &y, &names, cfg, Some(&prior), &pool, 3).unwrap();
        assert!(trained.head.memory.is_some());
        assert_eq!(trained.folds.len(), 3);
        assert_eq!(trained.mean_accuracy(), 1.0, "{:?}", trained.folds);
        assert_eq!(accuracy(&trained.head, &x, &y), 1.0);
    }
}
