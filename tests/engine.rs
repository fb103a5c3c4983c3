//! The engine's queue with the real models: work whose caller has gone away is dropped before
//! it costs a forward pass, and the rest is still answered.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;
use tidings::engine::{Admission, Engine, EngineConfig};
use tidings::pipeline::analysis::{Article, Options};

fn article(id: &str, text: &str) -> Article {
    Article {
        id: id.into(),
        text: text.into(),
        title: String::new(),
        options: Options::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_are_dropped_before_their_forward_pass() {
    // A long batching window, never cut short by the batch budget: the first jobs sit in
    // the batcher for two seconds, which is when their callers give up.
    let engine = Engine::start(
        common::models(),
        EngineConfig {
            max_wait: Duration::from_secs(2),
            max_batch_tokens: 1 << 20,
            ..EngineConfig::default()
        },
    );
    let cost = common::models()
        .prepare(article("one", &common::summit_article()))
        .unwrap()
        .cost();
    // The default taxonomy's prototypes, computed before anything is timed.
    engine.default_label_set().await.unwrap();
    let rows_before = engine.stats().rows_run.load(Ordering::Relaxed);

    let calls: Vec<_> = (0..10)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move {
                e.analyze(
                    article(&format!("gone{i}"), &common::summit_article()),
                    None,
                    Admission::FailFast,
                )
                .await
            })
        })
        .collect();
    // Wait until all ten are queued (their tokens are admitted), then cancel them.
    let t = std::time::Instant::now();
    while engine.queued_tokens() < 10 * cost {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the calls never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in &calls {
        c.abort();
    }
    // One caller that stays: answered, alone.
    let (kept, _) = engine
        .analyze(
            article("kept", "Angela Merkel met Emmanuel Macron in Paris."),
            None,
            Admission::FailFast,
        )
        .await
        .unwrap();
    assert!(kept.entities.iter().any(|e| e.text == "Angela Merkel"));
    assert_eq!(engine.stats().dropped_jobs.load(Ordering::Relaxed), 10);
    // Only the kept article's rows ran: one NER window and one topic window.
    assert_eq!(
        engine.stats().rows_run.load(Ordering::Relaxed) - rows_before,
        2
    );
    // Their queue room came back.
    assert_eq!(engine.queued_tokens(), 0);
}
