//! `tidings batch` and `tidings serve` flags as users run them: a resume never destroys
//! results, errors about the server never become an item's answer, any id goes through,
//! `--topic-head` answers with the head's classes, and a drain does not wait for idle
//! streams. Each test is the regression test of a defect of issue #9.

mod common;

use common::process::{free_port, serve, sigterm, stop, BIN};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tidings::proto::tidings_client::TidingsClient;

/// Runs `tidings batch` to completion with `extra` flags.
fn batch(input: &Path, output: &Path, server: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["batch", "--input", input.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap(), "--server", server])
        .args(extra)
        .output()
        .expect("run tidings batch")
}

fn write_jsonl(path: &Path, items: &[(&str, &str)]) {
    let mut s = String::new();
    for (id, text) in items {
        s.push_str(&serde_json::json!({"id": id, "text": text}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// The output's values, once `out` (a batch run) has succeeded.
fn succeeded(out: &Output, output: &Path) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    output_values(output)
}

fn output_values(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
        .collect()
}

/// Defect 5: resume cut the output at the first unparsable line, losing the valid results
/// after it, and an `--output` pointing at some other file was wiped. Only a torn final line
/// of our own may be cut; anything else stops the job before a byte is changed.
#[test]
fn resume_refuses_a_damaged_output_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_jsonl(
        &input,
        &[("a0", "Paris."), ("a1", "Rome."), ("a2", "Oslo.")],
    );
    // Nobody listens here: a job that got past the check would fail to connect instead.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cases: [(&str, &str); 3] = [
        (
            "{\"id\":\"a0\",\"topics\":[]}\nnot json at all\n{\"id\":\"a1\",\"topics\":[]}\n",
            "line 2",
        ),
        ("my thesis, chapter 1\nIt was a dark night.\n", "line 1"),
        ("notes without a newline", "line 1"),
    ];
    for (content, names) in cases {
        let output = dir.path().join("out.jsonl");
        std::fs::write(&output, content).unwrap();
        let out = batch(&input, &output, &dead, &["--retries", "0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {content:?}: {err}");
        assert!(err.contains(names), "{err}");
        assert_eq!(
            std::fs::read_to_string(&output).unwrap(),
            content,
            "the output was changed"
        );
    }
}

/// Defect 6: against a server without a topic model every item was written as an error line,
/// and a resume then skipped them for good. An error about the server stops the job and
/// writes nothing; `--tasks` asks only for what the server has.
#[test]
fn errors_about_the_server_stop_the_job_instead_of_failing_items() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let items: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("a{i}"),
                format!("Angela Merkel met Emmanuel Macron in Paris, day {i}."),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = items
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    write_jsonl(&input, &refs);
    let port = free_port();
    let server = serve(port, &["--topic-model", "none"]);
    let url = format!("http://127.0.0.1:{port}");
    let out = batch(&input, &output, &url, &["--retries", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job claimed success: {err}");
    assert!(err.contains("topic"), "{err}");
    assert!(
        output_values(&output)
            .iter()
            .all(|v| v.get("error").is_none()),
        "server errors were recorded as item answers"
    );
    let out = batch(&input, &output, &url, &["--tasks", "entities"]);
    stop(server);
    let values = succeeded(&out, &output);
    assert_eq!(values.len(), 20);
    assert!(values
        .iter()
        .all(|v| v["entities"].as_array().is_some_and(|e| !e.is_empty())));
}

/// Defect 7: an id that cannot be an HTTP header value (empty, non-ASCII) aborted the whole
/// job: the server named a failed item only in a header, and the client retried it as
/// transient until it gave up. Every id goes through, and a bad item is answered under its
/// own id.
#[test]
fn any_id_goes_through_and_a_bad_item_is_answered_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let ids = [
        "",
        "日本語の記事",
        "tab\tand\nnewline",
        "ascii-1",
        "ünïcödé-bad",
    ];
    let items: Vec<(&str, &str)> = ids
        .iter()
        .map(|id| {
            (
                *id,
                if id.ends_with("bad") {
                    "  "
                } else {
                    "Angela Merkel visited Paris."
                },
            )
        })
        .collect();
    write_jsonl(&input, &items);
    let port = free_port();
    let server = serve(port, &[]);
    let out = batch(
        &input,
        &output,
        &format!("http://127.0.0.1:{port}"),
        &["--retries", "2"],
    );
    stop(server);
    let values = succeeded(&out, &output);
    let mut got: Vec<&str> = values.iter().map(|v| v["id"].as_str().unwrap()).collect();
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want, "every id exactly once");
    for v in &values {
        let bad = v["id"].as_str().unwrap().ends_with("bad");
        assert_eq!(v.get("error").is_some(), bad, "{v}");
        if bad {
            assert_eq!(v["error"]["code"], 3, "{v}");
        }
    }
}

/// Defect 8: `serve --topic-head` was ignored: requests without labels were scored against
/// the default taxonomy while GetInfo advertised the head's labels.
#[test]
fn serve_topic_head_answers_with_the_heads_classes() {
    let port = free_port();
    let server = serve(port, &["--topic-head", "models/topics/ag_news_head.json"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (topics, info) = rt.block_on(async {
        let mut c = TidingsClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let r = c
            .analyze(common::request(
                "f",
                "The striker scored twice as the home side won the cup final 3-1 on Saturday.",
            ))
            .await
            .unwrap()
            .into_inner();
        let info = c
            .get_info(tidings::proto::GetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        (r.topics, info.default_topics)
    });
    stop(server);
    let mut names: Vec<&str> = topics.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(names[0], "Sports", "{topics:?}");
    names.sort();
    assert_eq!(names, ["Business", "Sci/Tech", "Sports", "World"]);
    assert_eq!(info, ["World", "Sports", "Business", "Sci/Tech"]);
}

/// Defect 12: the stream task ignored shutdown, so one idle stream (no deadline, nothing
/// sent) held a drain for the whole grace period. On SIGTERM the stream ends with
/// UNAVAILABLE after its in-flight items are answered, and the server exits.
#[test]
fn a_drain_does_not_wait_for_idle_streams() {
    let port = free_port();
    let mut server = serve(port, &["--grace-s", "60"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = rt.spawn(async move {
        let mut c = TidingsClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let mut out = c
            .analyze_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut answers = 0;
        loop {
            match out.message().await {
                Ok(Some(_)) => answers += 1,
                Ok(None) => return Ok((answers, tonic::Code::Ok)),
                Err(s) => return Ok((answers, s.code())),
            }
        }
    });
    rt.block_on(tx.send(common::request("one", "Angela Merkel visited Paris.")))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    sigterm(&server);
    let status = server.wait().unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(20), "the drain took {took:?}");
    let res: Result<(usize, tonic::Code), tonic::Status> = rt.block_on(call).unwrap();
    let (answers, code) = res.expect("stream opened");
    assert_eq!(answers, 1);
    assert_eq!(code, tonic::Code::Unavailable);
    drop(tx);
}
