//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`: seeds, and any input a fuzzing
//! run found and we kept) through the same checks the cargo-fuzz targets run, so a regression
//! in the text pipeline fails CI without a nightly toolchain.

#[path = "../fuzz/checks.rs"]
mod checks;
mod common;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = common::root().join("fuzz/corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn text_pipeline_corpus_holds_its_invariants() {
    let (md, tags) = checks::ner_model(&common::root().join("models/ner"));
    for (name, data) in corpus("text_pipeline") {
        eprintln!("{name}");
        checks::text_pipeline(&md, &tags, &data);
    }
}

#[test]
fn bio_decode_corpus_holds_its_invariants() {
    for (name, data) in corpus("bio_decode") {
        eprintln!("{name}");
        checks::bio_decode(&data);
    }
}
