//! The fused, unpadded CPU inference path against candle's op-by-op graph, on the real
//! models and real sentences of different lengths batched with padding: same hidden states
//! for every real token, whatever the batch around it.

mod common;

use candle_core::{DType, Device, Tensor};
use tidings::model::{Encoder, EncoderInput, Mode, ModelDir, Precision};
use tidings::pipeline::batch::{encode_rows, Row};
use tidings::pipeline::tokens::tokenize;

const SENTENCES: &[&str] = &[
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "Shares of APPLE Inc. fell 3% in New York, while iPhone sales in China rose.",
    "Rain.",
    "“We will act,” said Ursula von der Leyen… according to the European Commission in \
     Brussels, which oversees trade policy for the 27 member states of the union.",
];

/// The graph encoder of `dir`, the fused one with products in `precision`, and the padded
/// batch of [`SENTENCES`].
fn load(dir: &str, precision: Precision) -> (Encoder, Encoder, EncoderInput, Vec<usize>) {
    let md = ModelDir::open(common::root().join(dir)).unwrap();
    let vb = md.var_builder(DType::F32, &Device::Cpu).unwrap();
    let prefix = md.encoder_prefix(&vb).unwrap();
    let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
    let graph = Encoder::load_graph(vb.clone(), &md.config).unwrap();
    let fused = Encoder::load_with(vb, &md.config, precision).unwrap();
    assert!(fused.is_fused() && !graph.is_fused());
    let toks: Vec<_> = SENTENCES
        .iter()
        .map(|s| tokenize(&md.tokenizer, s).unwrap())
        .collect();
    let rows: Vec<Row> = toks.iter().map(Row::from).collect();
    let (cls, sep) = md.special_ids().unwrap();
    let input = encode_rows(&rows, cls, sep, 0, &Device::Cpu).unwrap();
    let lens = toks.iter().map(|t| t.ids.len() + 2).collect();
    (graph, fused, input, lens)
}

/// Hidden states of row `r`'s real tokens.
fn real(hidden: &Tensor, r: usize, len: usize) -> Vec<f32> {
    hidden
        .get(r)
        .unwrap()
        .narrow(0, 0, len)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(dir: &str) {
    let (graph, fused, input, lens) = load(dir, Precision::F32);
    assert_eq!(fused.precision(), Precision::F32);
    let g = graph.forward(&input, Mode::INFERENCE).unwrap();
    let f = fused.forward(&input, Mode::INFERENCE).unwrap();
    assert_eq!(g.dims(), f.dims());
    for (r, &len) in lens.iter().enumerate() {
        let (gr, fr) = (real(&g, r, len), real(&f, r, len));
        assert!(fr.iter().all(|v| v.is_finite()));
        let d = max_diff(&gr, &fr);
        assert!(d < 1e-4, "{dir}: row {r}: fused differs from graph by {d}");
        // Alone, without the padding and neighbours of the batch.
        let one = EncoderInput {
            input_ids: input
                .input_ids
                .get(r)
                .unwrap()
                .narrow(0, 0, len)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            type_ids: None,
            casing: input.casing.as_ref().map(|c| {
                c.get(r)
                    .unwrap()
                    .narrow(0, 0, len)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            }),
            attention_mask: Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap(),
        };
        let alone = real(&fused.forward(&one, Mode::INFERENCE).unwrap(), 0, len);
        let d = max_diff(&alone, &fr);
        assert!(
            d < 1e-4,
            "{dir}: row {r}: batched differs from alone by {d}"
        );
    }
    // Padding positions come back as zeros, never NaN.
    let last = f
        .get(2)
        .unwrap()
        .get(lens[2])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(last.iter().all(|&v| v == 0.0));
    // A fused encoder refuses to train.
    let train = Mode {
        train: true,
        dropout: 0.0,
    };
    assert!(fused.forward(&input, train).is_err());
}

#[test]
fn fused_matches_graph_on_the_ner_model() {
    check("models/ner");
}

#[test]
fn fused_matches_graph_on_minilm() {
    check("models/minilm");
}

/// Smallest cosine similarity between corresponding rows of `[n, h]` hidden states.
fn min_cosine(a: &[f32], b: &[f32], h: usize) -> f32 {
    a.chunks_exact(h)
        .zip(b.chunks_exact(h))
        .map(|(x, y)| {
            let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let nx: f32 = x.iter().map(|p| p * p).sum::<f32>().sqrt();
            let ny: f32 = y.iter().map(|q| q * q).sum::<f32>().sqrt();
            dot / (nx * ny)
        })
        .fold(1.0, f32::min)
}

/// The int8 path against the f32 graph: every real token's hidden state points the same
/// way (the accuracy of whole tasks is in the models' REPORT.md), and a row's result does
/// not depend on the batch around it (activation scales are per token).
fn check_int8(dir: &str) {
    if !tidings::model::qgemm::available() {
        eprintln!("no AVX2: the int8 path is not available on this CPU, nothing to check");
        return;
    }
    let (graph, int8, input, lens) = load(dir, Precision::Int8);
    assert_eq!(int8.precision(), Precision::Int8);
    let h = int8.hidden_size();
    let g = graph.forward(&input, Mode::INFERENCE).unwrap();
    let q = int8.forward(&input, Mode::INFERENCE).unwrap();
    let mut worst = 1f32;
    for (r, &len) in lens.iter().enumerate() {
        let (gr, qr) = (real(&g, r, len), real(&q, r, len));
        assert!(qr.iter().all(|v| v.is_finite()));
        worst = worst.min(min_cosine(&gr, &qr, h));
        assert!(
            max_diff(&gr, &qr) > 0.0,
            "{dir}: int8 gave the f32 result exactly"
        );
    }
    eprintln!("{dir}: int8 vs f32, smallest per-token cosine {worst:.5}");
    assert!(worst > 0.98, "{dir}: int8 drifts from f32: cosine {worst}");
    let single = EncoderInput {
        input_ids: input
            .input_ids
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(1, 0, lens[0])
            .unwrap(),
        type_ids: None,
        casing: input
            .casing
            .as_ref()
            .map(|c| c.narrow(0, 0, 1).unwrap().narrow(1, 0, lens[0]).unwrap()),
        attention_mask: Tensor::ones((1, lens[0]), DType::F32, &Device::Cpu).unwrap(),
    };
    let alone = real(&int8.forward(&single, Mode::INFERENCE).unwrap(), 0, lens[0]);
    let d = max_diff(&alone, &real(&q, 0, lens[0]));
    assert!(d < 1e-4, "{dir}: int8 batched differs from alone by {d}");
}

#[test]
fn int8_follows_f32_on_the_ner_model() {
    check_int8("models/ner");
}

#[test]
fn int8_follows_f32_on_minilm() {
    check_int8("models/minilm");
}
