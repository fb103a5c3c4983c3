//! The accurate tier (`models/ner-accurate`: adapters over all-mpnet-base-v2, merged at load)
//! served as `serve --ner-model models/ner-accurate` serves it, read through a real gRPC
//! client: the golden reading of the summit fixture, as the fast tier's test in grpc.rs
//! checks it. Needs `models/fetch mpnet` (the README's test command runs it).

mod common;

use common::{
    assert_groups_contain, assert_offsets_slice, client, request, root, summit_article,
    SUMMIT_ENTITIES,
};
use std::sync::Arc;
use tidings::engine::EngineConfig;
use tidings::pipeline::assembly::{ModelPlan, TopicSource};
use tidings::server::ServerConfig;

/// The accurate tagger, with the default topic encoder and taxonomy.
fn accurate_plan() -> ModelPlan {
    let r = root();
    assert!(
        r.join("models/mpnet/model.safetensors").is_file(),
        "models/mpnet is missing: run `models/fetch mpnet` (the README's test command does)"
    );
    ModelPlan {
        ner: Some(r.join("models/ner-accurate")),
        topics: TopicSource::Dir(r.join("models/minilm")),
        taxonomy: Some(r.join("models/topics/news.json")),
        ..ModelPlan::default()
    }
}

#[tokio::test]
async fn the_accurate_tier_reads_the_summit_article() {
    let plan = accurate_plan();
    let models = Arc::new(plan.load().unwrap_or_else(|e| panic!("{plan:?}: {e:#}")));
    let srv = common::start_with(models, EngineConfig::default(), ServerConfig::default());
    let mut c = client(&srv).await;
    let info = c
        .get_info(tidings::proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let ner = info
        .models
        .iter()
        .find(|m| m.task == "entities")
        .expect("an entity model");
    assert!(ner.path.ends_with("ner-accurate"), "{ner:?}");
    assert_eq!(ner.architecture, "mpnet", "{ner:?}");
    assert_eq!(ner.engine, "fused", "{ner:?}");
    let int8 = tidings::model::qgemm::available();
    assert_eq!(ner.dtype, if int8 { "int8" } else { "f32" }, "{ner:?}");

    let text = summit_article();
    let resp = c
        .analyze(request("summit", &text))
        .await
        .expect("analyze")
        .into_inner();
    assert_offsets_slice(&text, &resp);
    assert_groups_contain(&resp, SUMMIT_ENTITIES);
    assert_eq!(resp.topics[0].label, "world", "{:?}", resp.topics);
}
