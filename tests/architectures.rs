//! Architectures against transformers itself: tiny, randomly initialised models that
//! `tools/tiny_models.py` saved with transformers, with the outputs transformers computed for a
//! right-padded batch (`expected.safetensors`). Tidings' graph and fused paths (f32) must give
//! the same hidden states and logits for every real token; int8 must point the same way.

mod common;

use candle_core::{DType, Device, Tensor};
use tidings::model::{Encoder, EncoderInput, Mode, ModelDir, Precision, TokenClassifier};

/// A fixture model and its expected outputs.
struct Fixture {
    dir: ModelDir,
    input: EncoderInput,
    lens: Vec<usize>,
    hidden: Tensor,
    logits: Tensor,
}

fn fixture(name: &str) -> Fixture {
    let path = common::fixture(name);
    let dir = ModelDir::open(&path).unwrap();
    let expected =
        candle_core::safetensors::load(path.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = expected["attention_mask"].to_dtype(DType::F32).unwrap();
    let lens = mask
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|n| n as usize)
        .collect();
    Fixture {
        dir,
        input: EncoderInput {
            input_ids: ids,
            type_ids: None,
            casing: None,
            attention_mask: mask,
        },
        lens,
        hidden: expected["hidden"].clone(),
        logits: expected["logits"].clone(),
    }
}

/// Largest difference over the real tokens of every row.
fn max_diff(a: &Tensor, b: &Tensor, lens: &[usize]) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let mut worst = 0f32;
    for (r, &len) in lens.iter().enumerate() {
        let row = |t: &Tensor| -> Vec<f32> {
            let t = t.get(r).unwrap().narrow(0, 0, len).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (x, y) = (row(a), row(b));
        assert!(x.iter().all(|v| v.is_finite()));
        worst = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(worst, f32::max);
    }
    worst
}

fn encoders(f: &Fixture, precision: Precision) -> (Encoder, Encoder) {
    let vb = f.dir.var_builder(DType::F32, &Device::Cpu).unwrap();
    let prefix = f.dir.encoder_prefix(&vb).unwrap();
    let vb = vb.pp(prefix);
    let graph = Encoder::load_graph(vb.clone(), &f.dir.config).unwrap();
    let fused = Encoder::load_with(vb, &f.dir.config, precision).unwrap();
    (graph, fused)
}

/// The fixture `name` through Tidings: hidden states on both of its paths and the
/// token-classification logits as served, against transformers' (f32, real tokens).
fn check(name: &str, engine: &str) {
    let f = fixture(name);
    let (graph, served) = encoders(&f, Precision::F32);
    assert_eq!(served.engine(), engine, "{name}");
    for enc in [&graph, &served] {
        let x = enc.forward(&f.input, Mode::INFERENCE).unwrap();
        let d = max_diff(&x, &f.hidden, &f.lens);
        eprintln!("{name}: {} path, max |diff| {d:.2e}", enc.engine());
        assert!(
            d < 1e-4,
            "{name}: {} path differs from transformers by {d}",
            enc.engine()
        );
    }
    let tc = TokenClassifier::load(&f.dir, &Device::Cpu).unwrap();
    assert_eq!(tc.labels(), ["O", "B-PER", "I-PER"]);
    assert_eq!(tc.engine(), engine);
    let logits = tc.forward(&f.input, Mode::INFERENCE).unwrap();
    let d = max_diff(&logits, &f.logits, &f.lens);
    assert!(
        d < 1e-4,
        "{name}: token-classification logits differ by {d}"
    );
}

#[test]
fn mpnet_matches_transformers() {
    let f = fixture("tiny-mpnet");
    assert_eq!(f.dir.special_ids().unwrap(), (0, 2), "<s> ... </s>");
    check("tiny-mpnet", "fused");
}

#[test]
fn xlm_roberta_matches_transformers() {
    check("tiny-xlm-roberta", "fused");
}

#[test]
fn deberta_v2_matches_transformers() {
    check("tiny-deberta-v2", "candle-transformers");
}

#[test]
fn modernbert_matches_transformers() {
    check("tiny-modernbert", "candle-transformers");
}

#[test]
fn the_layout_follows_model_type_and_unknown_ones_are_refused() {
    let f = fixture("tiny-mpnet");
    let vb = f.dir.var_builder(DType::F32, &Device::Cpu).unwrap();
    let mut cfg = f.dir.config.clone();
    // Read as BERT, MPNet's tensors are not found: the layout comes from model_type.
    cfg.model_type = "bert".into();
    assert!(Encoder::load_graph(vb.pp("mpnet"), &cfg).is_err());
    cfg.model_type = "funnel".into();
    let err = Encoder::load_graph(vb.pp("mpnet"), &cfg).unwrap_err();
    assert!(
        err.to_string().contains("\"funnel\" is not supported"),
        "{err}"
    );
}

#[test]
fn mpnet_int8_follows_transformers() {
    if !tidings::model::qgemm::available() {
        eprintln!("no AVX2: the int8 path is not available on this CPU, nothing to check");
        return;
    }
    let f = fixture("tiny-mpnet");
    let (_, int8) = encoders(&f, Precision::Int8);
    assert_eq!(int8.precision(), Precision::Int8);
    assert_eq!(int8.engine(), "fused");
    let x = int8.forward(&f.input, Mode::INFERENCE).unwrap();
    let h = int8.hidden_size();
    let mut worst = 1f32;
    for (r, &len) in f.lens.iter().enumerate() {
        let row = |t: &Tensor| -> Vec<f32> {
            let t = t.get(r).unwrap().narrow(0, 0, len).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (a, b) = (row(&x), row(&f.hidden));
        for (p, q) in a.chunks_exact(h).zip(b.chunks_exact(h)) {
            let dot: f32 = p.iter().zip(q).map(|(u, v)| u * v).sum();
            let n = |v: &[f32]| v.iter().map(|u| u * u).sum::<f32>().sqrt();
            worst = worst.min(dot / (n(p) * n(q)));
        }
    }
    eprintln!("tiny-mpnet: int8 vs transformers, smallest per-token cosine {worst:.5}");
    assert!(worst > 0.98, "int8 drifts: cosine {worst}");
}
