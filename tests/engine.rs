//! The engine's queue with the real models: work whose caller has gone away is dropped before
//! it costs a forward pass, and the rest is still answered.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;
use tidings::engine::{Class, Engine, EngineConfig};
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
                    e.caller(Class::Interactive),
                )
                .await
            })
        })
        .collect();
    // Wait until all ten are queued (tokenized, and holding exactly their cost: admission
    // holds an estimate until then), then cancel them.
    let t = std::time::Instant::now();
    while engine.stats().articles_tokenized.load(Ordering::Relaxed) < 10
        || engine.queued_tokens() != 10 * cost
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the calls never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The last step, from holding room to the batcher's queue, takes microseconds.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for c in &calls {
        c.abort();
    }
    // One caller that stays: answered, alone.
    let (kept, _) = engine
        .analyze(
            article("kept", "Angela Merkel met Emmanuel Macron in Paris."),
            None,
            engine.caller(Class::Interactive),
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

/// Issue #9, defect 4: a request's labels were embedded and its text tokenized before the
/// queue was asked whether it could take the article. Now admission comes first: a request
/// the queue cannot take is refused before any of its work is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_queue_cannot_take_costs_no_work() {
    // Jobs sit in the batcher for two seconds, holding their queue room meanwhile.
    let engine = Engine::start(
        common::models(),
        EngineConfig {
            max_wait: Duration::from_secs(2),
            max_batch_tokens: 1 << 20,
            max_queue_tokens: 20_000,
            ..EngineConfig::default()
        },
    );
    engine.default_label_set().await.unwrap();
    let long: String = (0..150)
        .map(|i| format!("Sentence {i}: officials in Berlin discussed trade with Madrid. "))
        .collect();
    let fillers: Vec<_> = (0..2)
        .map(|i| {
            let e = engine.clone();
            let text = long.clone();
            tokio::spawn(async move {
                e.analyze(
                    article(&format!("fill{i}"), &text),
                    None,
                    e.caller(Class::Interactive),
                )
                .await
            })
        })
        .collect();
    let t = std::time::Instant::now();
    while engine.stats().articles_tokenized.load(Ordering::Relaxed) < 2
        || engine.queued_tokens() < 8_000
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the fillers never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tokenized = engine.stats().articles_tokenized.load(Ordering::Relaxed);
    let embedded = engine.stats().label_texts_embedded.load(Ordering::Relaxed);
    let labels = vec![
        tidings::pipeline::topics::Label {
            name: "Trade talks".into(),
            description: "Negotiations between governments about tariffs".into(),
            ..Default::default()
        },
        tidings::pipeline::topics::Label {
            name: "Football".into(),
            ..Default::default()
        },
    ];
    let refused = engine
        .analyze(
            // Twice a filler's text: more than the room the fillers left.
            article("probe", &long.repeat(2)),
            Some(&labels),
            engine.caller(Class::Interactive),
        )
        .await;
    assert!(
        matches!(refused, Err(tidings::engine::EngineError::QueueFull { .. })),
        "{:?}",
        refused.map(|_| ())
    );
    assert_eq!(
        engine.stats().articles_tokenized.load(Ordering::Relaxed),
        tokenized,
        "the refused article was tokenized"
    );
    assert_eq!(
        engine.stats().label_texts_embedded.load(Ordering::Relaxed),
        embedded,
        "the refused request's labels were embedded"
    );
    for f in fillers {
        f.await.unwrap().unwrap();
    }
    assert_eq!(engine.queued_tokens(), 0);
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forward_pass_per_window_serves_entities_and_topics() {
    let models = common::shared_models();
    assert!(
        models.shared_encoder,
        "models/multitask should be a model trained for both tasks (tidings_shared_encoder)"
    );
    let engine = Engine::start(models.clone(), EngineConfig::default());
    engine.default_label_set().await.unwrap();
    // Three windows or more, and a title (a row of its own).
    let text = [
        common::summit_article(),
        common::summit_article(),
        common::summit_article(),
    ]
    .join("\n\n");
    let mut both = article("both", &text);
    both.title = "Kim Jong Un arrives in Russia for talks with Vladimir Putin".into();
    let windows = models.prepare(both.clone()).unwrap().ner_windows.len();
    assert!(windows >= 3, "{windows} windows");
    let rows = || engine.stats().rows_run.load(Ordering::Relaxed);
    let caller = engine.caller(Class::Interactive);

    let before = rows();
    let (shared, _) = engine.analyze(both.clone(), None, caller).await.unwrap();
    assert_eq!(
        rows() - before,
        windows as u64 + 1,
        "entities and topics should take one pass per window, plus the title"
    );

    // Each task alone: the topic rows run through the same encoder on their own.
    let mut topics_only = both.clone();
    topics_only.options.entities = false;
    let before = rows();
    let (topics, _) = engine.analyze(topics_only, None, caller).await.unwrap();
    assert_eq!(rows() - before, windows as u64 + 1);
    let mut entities_only = both.clone();
    entities_only.options.topics = false;
    let (entities, _) = engine.analyze(entities_only, None, caller).await.unwrap();

    // The article embedding from the NER pass is the topic path's, window for window.
    assert!(!shared.topics.is_empty() && !shared.embedding.is_empty());
    let c = cosine(&shared.embedding, &topics.embedding);
    assert!(c > 0.9999, "embeddings differ: cosine {c}");
    let labels = |a: &tidings::pipeline::analysis::Analysis| {
        a.topics.iter().map(|t| t.label.clone()).collect::<Vec<_>>()
    };
    assert_eq!(labels(&shared), labels(&topics));
    let spans = |a: &tidings::pipeline::analysis::Analysis| {
        a.entities
            .iter()
            .map(|e| (e.byte_start, e.byte_end, e.label.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(spans(&shared), spans(&entities));
    assert!(shared.entities.iter().any(|e| e.text == "Vladimir Putin"));
}
