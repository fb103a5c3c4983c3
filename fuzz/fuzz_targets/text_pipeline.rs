//! Fuzz target: the text pipeline of entity extraction; see `checks::text_pipeline`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use tidings::model::ModelDir;
use tidings::pipeline::entities::TagSet;

static MODEL: LazyLock<(ModelDir, TagSet)> = LazyLock::new(|| {
    let dir = std::env::var("TIDINGS_FUZZ_MODEL")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../models/ner").into());
    checks::ner_model(dir.as_ref())
});

fuzz_target!(|data: &[u8]| {
    let (md, tags) = &*MODEL;
    checks::text_pipeline(md, tags, data);
});
