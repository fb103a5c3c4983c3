//! Running beyond one process (issue #10): `tidings batch` across several replicas while one
//! dies and another drains and comes back, and a queue gauge an autoscaler can trust.

mod common;

use common::process::{free_port, serve, sigterm, stop, BIN};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn output_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn wait_for_lines(p: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while output_lines(p) < n {
        assert!(Instant::now() < deadline, "the job made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three replicas; one is SIGKILLed, another SIGTERMed (drained) and restarted while the job
/// runs. Every id comes out exactly once, and no valid item becomes an error line.
#[test]
fn a_batch_job_survives_replicas_dying_and_draining() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let n = 1500;
    let mut lines = String::new();
    for i in 0..n {
        let text = format!(
            "Report {i}: Angela Merkel met Emmanuel Macron in Paris. {}",
            "Talks went on. ".repeat(i % 7)
        );
        lines.push_str(&serde_json::json!({"id": format!("r{i}"), "text": text}).to_string());
        lines.push('\n');
    }
    std::fs::write(&input, lines).unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut servers: Vec<_> = ports
        .iter()
        .map(|p| Some(serve(*p, &["--grace-s", "20"])))
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut job = Command::new(BIN)
        .args(["batch", "--input", input.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap()])
        .args([
            "--server",
            &urls.join(","),
            "--concurrency",
            "16",
            "--retries",
            "30",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&output, n / 5);
    let mut killed = servers[0].take().unwrap();
    killed.kill().unwrap();
    killed.wait().unwrap();
    let at_kill = output_lines(&output);
    wait_for_lines(&output, at_kill + n / 5);
    let drained = servers[1].take().unwrap();
    let at_drain = output_lines(&output);
    stop(drained);
    servers[1] = Some(serve(ports[1], &["--grace-s", "20"]));
    let status = job.wait().unwrap();
    let mut err = String::new();
    job.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    for s in servers.into_iter().flatten() {
        stop(s);
    }
    assert!(status.success(), "batch failed: {err}");
    assert!(at_drain < n, "the drain came too late to test anything");
    let text = std::fs::read_to_string(&output).unwrap();
    let mut ids: Vec<String> = Vec::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v.get("error").is_none(), "a valid item failed: {v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every id exactly once");
}

/// `tidings_queue_tokens` was set only at admission, so it kept its last value while the
/// server sat idle: an autoscaler on it would never scale down. It must read 0 once every
/// call has returned.
#[test]
fn the_queue_gauge_returns_to_zero_when_idle() {
    let port = free_port();
    let metrics_port = free_port();
    let server = serve(
        port,
        &["--metrics-addr", &format!("127.0.0.1:{metrics_port}")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = tidings::proto::tidings_client::TidingsClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))
        .await
        .unwrap();
        for i in 0..5 {
            c.analyze(common::request(
                &format!("g{i}"),
                "Angela Merkel visited Paris.",
            ))
            .await
            .unwrap();
        }
    });
    let scrape = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let body = scrape();
    sigterm(&server);
    let mut server = server;
    server.wait().unwrap();
    let gauge = body
        .lines()
        .find(|l| l.starts_with("tidings_queue_tokens "))
        .unwrap_or_else(|| panic!("no tidings_queue_tokens in:\n{body}"));
    assert_eq!(gauge.split_whitespace().nth(1), Some("0"), "{gauge}");
    assert!(
        body.contains("tidings_requests_total"),
        "the calls were not counted:\n{body}"
    );
}
