//! The `tidings` command: `serve`, `analyze`, `batch`, `train`, `eval`.

mod cli;

use anyhow::Result;
use clap::Parser;

/// mimalloc: glibc malloc page-faults heavily on the large short-lived tensors of each
/// forward pass (measured in issue #4's notes); mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.log_json);
    cli.run()
}
