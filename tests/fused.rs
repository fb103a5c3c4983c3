//! The fused, unpadded CPU inference path against candle's op-by-op graph, on the real
//! models and real sentences of different lengths batched with padding: same hidden states
//! for every real token, whatever the batch around it.

mod common;

use candle_core::{DType, Device, Tensor};
use tidings::model::{Encoder, EncoderInput, Mode, ModelDir};
use tidings::pipeline::batch::{encode_rows, Row};
use tidings::pipeline::tokens::tokenize;

const SENTENCES: &[&str] = &[
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "Shares of APPLE Inc. fell 3% in New York, while iPhone sales in China rose.",
    "Rain.",
    "“We will act,” said Ursula von der Leyen… according to the European Commission in \
     Brussels, which oversees trade policy for the 27 member states of the union.",
];

/// Both encoders of `dir` and the padded batch of [`SENTENCES`].
fn load(dir: &str) -> (Encoder, Encoder, EncoderInput, Vec<usize>) {
    let md = ModelDir::open(common::root().join(dir)).unwrap();
    let vb = md.var_builder(DType::F32, &Device::Cpu).unwrap();
    let prefix = md.encoder_prefix(&vb).unwrap();
    let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
    let graph = Encoder::load_graph(vb.clone(), &md.config).unwrap();
    let fused = Encoder::load(vb, &md.config).unwrap();
    assert!(fused.is_fused() && !graph.is_fused());
    let toks: Vec<_> = SENTENCES
        .iter()
        .map(|s| tokenize(&md.tokenizer, s).unwrap())
        .collect();
    let rows: Vec<Row> = toks
        .iter()
        .map(|t| Row {
            ids: &t.ids,
            casing: &t.casing,
        })
        .collect();
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
    let (graph, fused, input, lens) = load(dir);
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
