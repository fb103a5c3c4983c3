//! `tidings bench`: the model path alone, in-process, with no gRPC: the machine's measured
//! FP32 matmul peak, then encoder forward throughput on full windows and what fraction of
//! that peak it reaches. (End-to-end server benchmarks against PyTorch: `bench/run.sh`.)

use super::ModelArgs;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use std::time::Instant;
use tidings::pipeline::batch::Row;
use tidings::pipeline::{embeddings, token_probs};

/// Flags of `tidings bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per window (special tokens included).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed forward passes per model.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[command(flatten)]
    models: ModelArgs,
}

/// Best-of-3 GFLOP/s of an n x n x n f32 matmul: the peak the encoder's matmuls could reach.
fn matmul_peak(n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.dtype();
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Matmul FLOPs per token of one BERT-style encoder pass at sequence length `seq`.
fn flops_per_token(h: usize, i: usize, layers: usize, seq: usize) -> f64 {
    let linear = 4 * h * h + 2 * h * i;
    let attention = 2 * seq * h;
    (2 * layers * (linear + attention)) as f64
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs the benchmark and prints a table.
pub fn run(a: BenchArgs) -> Result<()> {
    let models = a.models.load()?;
    let peak = matmul_peak(2048)?;
    println!(
        "f32 matmul peak (2048^3, best of 3, {} threads): {peak:.1} GFLOP/s",
        candle_core::utils::get_num_threads()
    );
    let content = a.seq.saturating_sub(2).max(1);
    let ids: Vec<u32> = (0..content)
        .map(|k| 1000 + (k as u32 * 7919) % 20000)
        .collect();
    let casing = vec![1u32; content];
    let rows: Vec<Row> = (0..a.batch)
        .map(|_| Row {
            ids: &ids,
            casing: &casing,
        })
        .collect();
    println!(
        "{:<8} {:>6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "model", "batch", "seq", "p50 ms", "p99 ms", "tokens/s", "GFLOP/s", "of peak"
    );
    let report = |name: &str,
                  cfg: &tidings::model::ModelConfig,
                  run: &dyn Fn() -> Result<()>|
     -> Result<()> {
        run()?;
        let mut times = Vec::with_capacity(a.iters);
        for _ in 0..a.iters {
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let p50 = times[times.len() / 2];
        let p99 = times[((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
        let tokens = (a.batch * a.seq) as f64;
        let tps = tokens / p50;
        let gflops =
            tps * flops_per_token(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                a.seq,
            ) / 1e9;
        println!(
            "{:<8} {:>6} {:>6} {:>10.1} {:>10.1} {:>10.0} {:>9.1} {:>8.0}%",
            name,
            a.batch,
            a.seq,
            p50 * 1e3,
            p99 * 1e3,
            tps,
            gflops,
            100.0 * gflops / peak
        );
        Ok(())
    };
    if let Some(n) = &models.ner {
        report("ner", &n.dir.config, &|| {
            token_probs(&n.model, &rows, n.specials, &models.device)
                .map(|_| ())
                .context("ner forward")
        })?;
    }
    if let Some(t) = &models.topics {
        report("topics", &t.dir.config, &|| {
            embeddings(&t.model, &rows, t.specials, &models.device)
                .map(|_| ())
                .context("topic forward")
        })?;
    }
    println!("peak RSS {:.0} MB", peak_rss_mb());
    Ok(())
}
