//! A tiny real training run: a few steps of the real MiniLM on a few sentences, through the
//! same code as `tidings train ner`. Proves the loss goes down, the output loads in the
//! serving loader, and a checkpoint resumes.

mod common;

use tidings::model::{ModelDir, TokenClassifier};
use tidings::train::ner::{self, NerTrainConfig};

const TINY: &str = "\
Angela NNP B-NP B-PER
Merkel NNP I-NP I-PER
visited VBD B-VP O
Paris NNP B-NP B-LOC
. . O O

Reuters NNP B-NP B-ORG
reported VBD B-VP O
from IN B-PP O
Berlin NNP B-NP B-LOC
. . O O

German JJ B-NP B-MISC
officials NNS I-NP O
met VBD B-VP O
Barack NNP B-NP B-PER
Obama NNP I-NP I-PER
in IN B-PP O
Washington NNP B-NP B-LOC
. . O O
";

fn config(dir: &std::path::Path, epochs: usize, resume: bool) -> NerTrainConfig {
    let data = dir.join("tiny.txt");
    std::fs::write(&data, TINY).unwrap();
    NerTrainConfig {
        base: common::root().join("models/minilm"),
        train: data.clone(),
        dev: Some(data),
        out: dir.join("model"),
        epochs,
        batch: 1,
        lr: 1e-4,
        head_lr: 3e-3,
        warmup: 0.0,
        dropout: 0.0,
        clip: 1.0,
        weight_decay: 0.0,
        seed: 7,
        max_pieces: 8,
        max_steps: 0,
        limit_docs: 0,
        casing: true,
        resume,
        checkpoint_minutes: 0.0,
        f16: false,
        distill: 1.0,
        case_augment: 0.5,
        entity_replace: 0.5,
        ema: 0.9,
        adapter_rank: 0,
        adapter_alpha: 0.0,
    }
}

#[test]
fn loss_goes_down_output_loads_and_checkpoint_resumes() {
    common::models(); // clear message if models/fetch was not run
    let tmp = tempfile::tempdir().unwrap();
    let first = ner::train(&config(tmp.path(), 2, false)).expect("training");
    assert_eq!(first.epochs.len(), 2);
    let (l1, l2) = (first.epochs[0].loss, first.epochs[1].loss);
    assert!(l2 < l1 * 0.8, "loss did not go down: {l1} -> {l2}");

    // The output is an HF-format directory the serving loader reads unchanged.
    let dir = ModelDir::open(tmp.path().join("model")).expect("output dir");
    assert!(dir.config.tidings_casing);
    assert!(dir.config.tidings_shared_encoder);
    let cosine = first.epochs[1].distill_cosine.expect("distillation ran");
    assert!(
        cosine > 0.8,
        "pooled states drifted from the base encoder's: {cosine}"
    );
    let model = TokenClassifier::load(&dir, &candle_core::Device::Cpu).expect("serving loader");
    assert_eq!(model.labels().len(), 9);

    // Resuming continues from the checkpoint instead of starting over.
    let resumed = ner::train(&config(tmp.path(), 3, true)).expect("resumed training");
    assert_eq!(resumed.epochs.len(), 3);
    assert_eq!(
        resumed.epochs[..2]
            .iter()
            .map(|e| e.loss)
            .collect::<Vec<_>>(),
        vec![l1, l2]
    );
    assert!(resumed.epochs[2].loss < l1);
    // The moving average was scored every epoch, and carried across the resume.
    assert!(resumed.epochs.iter().all(|e| e.ema_dev_f1.is_some()));
    assert!(tmp
        .path()
        .join("model/checkpoints/current/ema.safetensors")
        .is_file());

    // An average kept with another decay is not silently carried on.
    let mut other = config(tmp.path(), 4, true);
    other.ema = 0.5;
    let err = ner::train(&other).expect_err("a resume with another --ema");
    assert!(err.to_string().contains("--ema"), "{err:#}");
}

#[test]
fn an_adapter_run_saves_only_what_it_trained_and_loads_over_its_base() {
    common::models(); // clear message if models/fetch was not run
    let base = common::root().join("models/minilm");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), 3, false);
    cfg.adapter_rank = 4;
    cfg.lr = 3e-3;
    cfg.distill = 0.0;
    cfg.ema = 0.0;
    cfg.entity_replace = 0.0;
    cfg.case_augment = 0.0;
    let report = ner::train(&cfg).expect("adapter training");
    let (l1, l3) = (report.epochs[0].loss, report.epochs[2].loss);
    assert!(l3 < l1 * 0.8, "loss did not go down: {l1} -> {l3}");

    // The file holds the adapters, biases, norms and head: a few percent of the base.
    let out = tmp.path().join("model");
    let own = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let full = std::fs::metadata(base.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(own * 20 < full, "{own} bytes saved for a {full}-byte base");
    let dir = ModelDir::open(&out).expect("output dir");
    let adapter = dir
        .config
        .tidings_adapter
        .clone()
        .expect("an adapter config");
    assert_eq!(
        (adapter.rank, adapter.alpha, adapter.base_bytes),
        (4, 8.0, full)
    );
    assert_eq!(
        std::path::Path::new(&adapter.base),
        base.canonicalize().unwrap()
    );

    // Merged over the base as it loads, on the fused serving path, the model tags the dev
    // data exactly as the training graph (adapters unmerged) did.
    let model = TokenClassifier::load(&dir, &candle_core::Device::Cpu).expect("serving loader");
    let docs = tidings::train::conll::parse(TINY).unwrap();
    let window = tidings::pipeline::WindowSpec::default().fit(dir.config.max_tokens());
    let scored = ner::evaluate(&model, &dir, &docs, window, &candle_core::Device::Cpu).unwrap();
    let f1 = scored.overall().f1();
    assert!(f1 > 0.5, "the adapters did not learn the tiny set: F1 {f1}");
    assert_eq!(Some(f1), report.epochs[report.best_epoch - 1].dev_f1);

    // Other weights of the same architecture are refused, not merged into.
    let mut moved = dir.config.clone();
    if let Some(a) = moved.tidings_adapter.as_mut() {
        a.base_bytes += 1;
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string(&moved).unwrap(),
    )
    .unwrap();
    let err = TokenClassifier::load(&ModelDir::open(&out).unwrap(), &candle_core::Device::Cpu)
        .expect_err("a base of another size");
    assert!(err.to_string().contains("other weights"), "{err:#}");
}
