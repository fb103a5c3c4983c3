//! The `tidings` binary as a process: `serve` on a free port, waiting until it answers, and
//! signals. Shared by the tests that run the command line as users do.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidings::proto::tidings_client::TidingsClient;

/// The `tidings` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tidings");

/// A loopback port nobody listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `tidings serve` on `port` with `extra` flags and waits until it answers GetInfo.
pub fn serve(port: u16, extra: &[&str]) -> Child {
    super::models();
    let mut child = Command::new(BIN)
        .current_dir(super::root())
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

/// A gRPC client of the server on `port`.
pub async fn connect(port: u16) -> TidingsClient<tonic::transport::Channel> {
    TidingsClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to tidings serve")
}

/// Runs `tidings ARGS` in the project root, asserts that it succeeded (else shows its
/// stderr) and returns its output.
pub fn run_ok<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(BIN)
        .current_dir(super::root())
        .args(args)
        .output()
        .expect("run tidings");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// Stops a server started by [`serve`] and waits for it.
pub fn stop(mut child: Child) {
    sigterm(&child);
    let _ = child.wait();
}
