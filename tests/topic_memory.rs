//! Topic memories (issue #28): `tidings train memory` builds one from unlabelled articles,
//! `serve --topic-memory` loads it, and then every replica that loaded the same file, and
//! the same server after a restart, gives bit-identical topic scores for the same request,
//! for the default taxonomy and for request labels alike. Checked with real servers and a
//! real client. The unlabelled articles are the project's own (models/topics/corpus, 513
//! short news items written for Tidings), so the test runs from a fresh clone.

mod common;

use common::process;
use tidings::proto::{AnalyzeRequest, GetInfoRequest, TopicLabel};

/// The request: the summit article against the default taxonomy, or against `labels`.
fn request(labels: &[&str]) -> AnalyzeRequest {
    let mut r = common::request("summit", &common::summit_article());
    r.tasks = vec![tidings::proto::Task::Topics as i32];
    r.labels = labels
        .iter()
        .map(|n| TopicLabel {
            name: n.to_string(),
            ..Default::default()
        })
        .collect();
    r
}

/// Each request's topic scores, as bits, from the server on `port`.
fn scores(port: u16) -> Vec<Vec<(String, u32)>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = process::connect(port).await;
        let mut out = Vec::new();
        for labels in [&[][..], &["diplomacy", "sport", "economy", "weather"][..]] {
            let resp = client.analyze(request(labels)).await.unwrap().into_inner();
            out.push(
                resp.topics
                    .iter()
                    .map(|t| (t.label.clone(), t.score.to_bits()))
                    .collect(),
            );
        }
        out
    })
}

fn info(port: u16) -> tidings::proto::GetInfoResponse {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = process::connect(port).await;
        client
            .get_info(GetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn replicas_with_one_memory_file_score_alike() {
    let dir = tempfile::tempdir().unwrap();
    let memory = dir.path().join("memory.safetensors");
    let out = process::run_ok([
        "train".as_ref(),
        "memory".as_ref(),
        "--unlabelled".as_ref(),
        common::root()
            .join("models/topics/corpus/own-news.jsonl")
            .as_os_str(),
        "--name".as_ref(),
        "own texts".as_ref(),
        "--out".as_ref(),
        memory.as_os_str(),
        "--ner-model".as_ref(),
        "none".as_ref(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("articles written"), "{said}");
    let flag = memory.to_str().unwrap();
    let (a, b) = (process::free_port(), process::free_port());
    let first = process::serve(a, &["--topic-memory", flag]);
    let second = process::serve(b, &["--topic-memory", flag]);
    let from_first = scores(a);
    assert_eq!(from_first, scores(b), "two replicas, one memory file");
    let reported = info(a).topic_memory.expect("GetInfo reports the memory");
    assert_eq!(reported.name, "own texts");
    assert_eq!(reported.articles, 513, "{reported:?}");
    assert_eq!(reported, info(b).topic_memory.unwrap());
    assert!(said.contains(&reported.sha256), "{said}");
    // Traffic changes nothing: the same request again, after others.
    assert_eq!(from_first, scores(a));
    process::stop(first);
    // After a restart.
    let again = process::serve(a, &["--topic-memory", flag]);
    assert_eq!(from_first, scores(a), "after a restart");
    process::stop(again);
    process::stop(second);
    // Without the memory the scores differ (the memory is in effect), and GetInfo says so.
    let plain = process::serve(a, &[]);
    let without = scores(a);
    assert!(info(a).topic_memory.is_none());
    process::stop(plain);
    for (with, without) in from_first.iter().zip(&without) {
        assert_eq!(with.len(), without.len(), "the same labels are scored");
        assert_ne!(with, without, "the memory is in effect for each label set");
    }
}

#[test]
fn a_memory_from_another_encoder_or_a_bad_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a memory").unwrap();
    let out = std::process::Command::new(process::BIN)
        .current_dir(common::root())
        .args(["serve", "--addr", "127.0.0.1:0", "--topic-memory"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a tidings-topic-memory/1 file"),
        "{err}"
    );
}
