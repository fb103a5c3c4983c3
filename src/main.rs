//! The `tidings` command: `serve`, `analyze`, `batch`, `train`, `eval`.

mod cli;

use anyhow::Result;
use clap::Parser;

/// mimalloc: glibc malloc page-faults heavily on the large short-lived tensors of each
/// forward pass (measured in issue #4's notes); mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    limit_threads_to_cpu_quota();
    let cli = cli::Cli::parse();
    // Held to the end: dropping it flushes the last spans to the OTLP endpoint.
    let _export = tidings::trace::init(cli.log_json, cli.otlp_endpoint.as_deref())?;
    cli.run()
}

/// Model threads: no more than the CPUs this process may use. candle counts the machine's
/// cores, so a container limited to 2 CPUs on a 64-core node would run 64 threads on 2 CPUs;
/// `available_parallelism` honours the cgroup quota. `RAYON_NUM_THREADS`, when set, wins.
/// Runs first in `main`, before any thread exists.
fn limit_threads_to_cpu_quota() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    if let Ok(n) = std::thread::available_parallelism() {
        if n.get() < candle_core::utils::get_num_threads() {
            std::env::set_var("RAYON_NUM_THREADS", n.get().to_string());
        }
    }
}
