//! `tidings bench`: the model path alone, in-process, with no gRPC: three FP32 peaks (candle's
//! own matmul, the machine's best SGEMM as measured by a BLAS when given, and the theoretical
//! FMA peak where the CPU makes it computable), then encoder forward throughput on full
//! windows (`--batch` x `--seq`) or an article mix's (`--mix`) and what fraction of each peak
//! it reaches. The forward passes run on a worker of a pool built as the server's
//! ([`tidings::engine::model_pool`]), as serving runs them; the peaks are taken from the main
//! thread. (End-to-end server benchmarks: `bench/run.sh`.)

use super::ModelArgs;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use std::time::Instant;
use tidings::pipeline::analysis::Models;
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
    /// An article mix to time instead of `--batch` x `--seq`: forward passes separated by
    /// `;`, each a comma-separated list of window lengths (tokens, special tokens included),
    /// e.g. `'256,256,256,256;131,62,60'` (quoted: `;` ends a shell command), as
    /// `bench/ort_encoder.py` cuts real articles' windows. One timed run is the whole mix;
    /// tokens/s counts the windows' own tokens (on the CPU, padding is never computed). The
    /// row reads `mix` for seq and the window count for batch.
    #[arg(long, value_parser = parse_mix, conflicts_with_all = ["batch", "seq"])]
    mix: Option<Mix>,
    /// The machine's best f32 SGEMM in GFLOP/s, as measured by the fastest BLAS at hand with
    /// the same number of threads (`bench/sgemm_peak.py` measures OpenBLAS through numpy).
    /// "Of peak" is then also given against it.
    #[arg(long, env = "TIDINGS_BLAS_GFLOPS")]
    blas_gflops: Option<f64>,
    #[command(flatten)]
    models: ModelArgs,
}

/// Window lengths of the forward passes of an article mix (`--mix`).
#[derive(Debug, Clone)]
struct Mix(Vec<Vec<usize>>);

fn parse_mix(text: &str) -> Result<Mix, String> {
    let passes = text
        .split(';')
        .map(|pass| {
            pass.split(',')
                .map(|len| match len.trim().parse::<usize>() {
                    Ok(n) if n >= 3 => Ok(n),
                    _ => Err(format!(
                        "{len:?}: a window length is a whole number of tokens, at least 3 \
                         ([CLS], a piece, [SEP])"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Mix(passes))
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

/// Best-of-3 rates of Tidings' own kernels on an n x n x n product with `threads` tasks:
/// the packed f32 microkernel (GFLOP/s) and the int8 one (GOP/s, the activations' per-call
/// quantization included); `None` for a kernel this CPU does not run.
fn kernel_peaks(n: usize, threads: usize) -> (Option<f64>, Option<f64>) {
    use tidings::model::qgemm::{QuantizedRows, QuantizedWeights};
    use tidings::model::sgemm::PackedWeights;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut c = vec![0f32; n * n];
    let ops = 2.0 * (n * n * n) as f64;
    let best = |run: &mut dyn FnMut()| {
        run();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let f32_rate = PackedWeights::pack(&b, n, n)
        .map(|p| ops / best(&mut || p.matmul_acc(&a, n, &mut c, threads)) / 1e9);
    let mut rows = QuantizedRows::default();
    let int8_rate = QuantizedWeights::quantize(&b, n, n)
        .map(|q| ops / best(&mut || q.matmul_acc(&a, n, &mut c, threads, &mut rows)) / 1e9);
    (f32_rate, int8_rate)
}

/// The theoretical f32 FMA peak of `threads` cores in GFLOP/s, and how it was computed:
/// clock (MHz, from /proc/cpuinfo: the nominal or current clock, not a boost clock) x f32
/// lanes of the widest FMA (16 with AVX-512, 8 with AVX2) x 2 FMA units x 2 FLOPs per FMA.
/// Two FMA units is what Intel since Haswell (server parts with AVX-512) and AMD since Zen 2
/// have; Zen 1 and some AVX-512 parts have less, so this is an upper bound. `None` when
/// /proc/cpuinfo says neither.
fn fma_peak(threads: usize) -> Option<(f64, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    let flags = field("flags")?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let (lanes, isa) = if has("avx512f") {
        (16.0, "AVX-512")
    } else if has("avx2") && has("fma") {
        (8.0, "AVX2+FMA")
    } else {
        return None;
    };
    let gflops = threads as f64 * mhz / 1e3 * lanes * 2.0 * 2.0;
    Some((
        gflops,
        format!(
            "{threads} cores x {mhz:.0} MHz x {lanes} f32 lanes ({isa}) x 2 FMA units x 2; {}",
            field("model name").unwrap_or_default()
        ),
    ))
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
    if !models.device.is_cpu() {
        // The CPU's peaks say nothing of a GPU's pass: time the models alone.
        println!(
            "device: {} (candle's CUDA ops, f32; the CPU's peaks are not measured)",
            a.models.device
        );
        return time_models(&a, &models, Peaks::default());
    }
    let threads = candle_core::utils::get_num_threads();
    let peak = matmul_peak(2048)?;
    println!("candle f32 matmul (2048^3, best of 3, {threads} threads): {peak:.1} GFLOP/s");
    let blas = a.blas_gflops.filter(|g| *g > 0.0);
    match blas {
        Some(g) => println!(
            "machine's best SGEMM (--blas-gflops): {g:.1} GFLOP/s; candle reaches {:.0}% of it",
            100.0 * peak / g
        ),
        None => println!(
            "machine's best SGEMM: not given (measure it with bench/sgemm_peak.py, pass --blas-gflops)"
        ),
    }
    let (own_f32, own_int8) = print_kernel_peaks(threads, blas);
    let precision = [
        models.ner.as_ref().map(|n| n.model.precision()),
        models.topics.as_ref().map(|t| t.model.precision()),
    ];
    println!(
        "precision of the products below: ner {}, topics {}",
        precision[0].map_or("-".into(), |p| p.to_string()),
        precision[1].map_or("-".into(), |p| p.to_string())
    );
    let fma = fma_peak(threads);
    match &fma {
        Some((g, how)) => println!("theoretical FMA peak: {g:.1} GFLOP/s ({how})"),
        None => println!("theoretical FMA peak: not computable from /proc/cpuinfo"),
    }
    // The rate of the kernel the products run on, for "of kernel".
    let kernel = match precision.iter().flatten().next() {
        Some(tidings::model::Precision::Int8) => own_int8,
        _ => own_f32,
    };
    let peaks = Peaks {
        candle: Some(peak),
        blas,
        fma: fma.map(|f| f.0),
        kernel,
    };
    time_models(&a, &models, peaks)
}

/// Measures Tidings' own kernels ([`kernel_peaks`] at 2048^3 with `threads` tasks) and prints
/// their rates, as shares of the machine's best SGEMM `blas` when given; returns them.
fn print_kernel_peaks(threads: usize, blas: Option<f64>) -> (Option<f64>, Option<f64>) {
    let (own_f32, own_int8) = kernel_peaks(2048, threads);
    let of_blas = |g: f64| {
        blas.map_or(String::new(), |b| {
            format!("; {:.0}% of the machine's best SGEMM", 100.0 * g / b)
        })
    };
    match own_f32 {
        Some(g) => {
            let kernel = tidings::model::sgemm::kernel().expect("measured, so it runs");
            println!(
                "Tidings f32 kernel ({}; weights packed at load, 2048^3, best of 3): \
                 {g:.1} GFLOP/s{}",
                kernel.name(),
                of_blas(g)
            )
        }
        None => println!(
            "Tidings f32 kernel: not used (no AVX2 and FMA here, an Intel CPU with AVX-512, \
             or TIDINGS_SGEMM=gemm): candle's gemm instead"
        ),
    }
    match own_int8 {
        Some(g) => println!(
            "Tidings int8 kernel ({}; 2048^3, activation quantization included, best of 3): {g:.1} GOP/s{}",
            tidings::model::qgemm::kernel().expect("measured, so it runs").name(),
            of_blas(g).replace("% of", "% (int8 ops) of")
        ),
        None => println!("Tidings int8 kernel: not available on this CPU"),
    }
    (own_f32, own_int8)
}

/// The rates a model's GFLOP/s is given as a share of (`None`: not measured).
#[derive(Clone, Copy, Default)]
struct Peaks {
    /// candle's own f32 matmul.
    candle: Option<f64>,
    /// The machine's best SGEMM (`--blas-gflops`).
    blas: Option<f64>,
    /// The theoretical FMA peak.
    fma: Option<f64>,
    /// Tidings' kernel that the products run on.
    kernel: Option<f64>,
}

/// What one timed run computes: forward passes of windows of given lengths.
struct Workload {
    /// Window lengths per forward pass, special tokens included.
    passes: Vec<Vec<usize>>,
    /// The table's seq column: `--seq`, or `mix`.
    seq: String,
}

impl Workload {
    /// `a`'s article mix, or its `--batch` windows of `--seq` tokens.
    fn of(a: &BenchArgs) -> Self {
        match &a.mix {
            Some(Mix(passes)) => Self {
                passes: passes.clone(),
                seq: "mix".to_string(),
            },
            None => Self {
                passes: vec![vec![a.seq.max(3); a.batch]],
                seq: a.seq.to_string(),
            },
        }
    }

    /// Windows in all the passes.
    fn windows(&self) -> usize {
        self.passes.iter().map(Vec::len).sum()
    }

    /// Tokens in all the windows.
    fn tokens(&self) -> usize {
        self.passes.iter().flatten().sum()
    }

    /// Matmul FLOPs of all the passes through a model of config `cfg`.
    fn flops(&self, cfg: &tidings::model::ModelConfig) -> f64 {
        self.passes
            .iter()
            .flatten()
            .map(|&len| {
                len as f64
                    * flops_per_token(
                        cfg.hidden_size,
                        cfg.intermediate_size,
                        cfg.num_hidden_layers,
                        len,
                    )
            })
            .sum()
    }
}

/// Times each loaded model's forward passes on `a`'s batch (or mix) and prints a row per
/// model, its GFLOP/s as a share of each peak given (candle's, the machine's best SGEMM,
/// FMA's).
fn time_models(a: &BenchArgs, models: &Models, peaks: Peaks) -> Result<()> {
    let work = Workload::of(a);
    let longest = work.passes.iter().flatten().copied().max().unwrap_or(3);
    let ids: Vec<u32> = (0..longest - 2)
        .map(|k| 1000 + (k as u32 * 7919) % 20000)
        .collect();
    let casing = vec![1u32; longest - 2];
    let batches: Vec<Vec<Row>> = work
        .passes
        .iter()
        .map(|lens| {
            lens.iter()
                .map(|&len| Row {
                    ids: &ids[..len - 2],
                    casing: &casing[..len - 2],
                })
                .collect()
        })
        .collect();
    print_header();
    // The passes run on a worker of a pool built as the server's, as the batcher runs them.
    let pool = tidings::engine::model_pool();
    if let Some(n) = &models.ner {
        let times = time_passes(&pool, a.iters, &|| {
            for rows in &batches {
                token_probs(&n.model, rows, n.specials, &models.device).context("ner forward")?;
            }
            Ok(())
        })?;
        report("ner", &n.dir.config, times, &work, &peaks);
    }
    if let Some(t) = &models.topics {
        let times = time_passes(&pool, a.iters, &|| {
            for rows in &batches {
                embeddings(&t.model, rows, t.specials, &models.device).context("topic forward")?;
            }
            Ok(())
        })?;
        report("topics", &t.dir.config, times, &work, &peaks);
    }
    println!("peak RSS {:.0} MB", peak_rss_mb());
    Ok(())
}

/// The table's header.
fn print_header() {
    println!(
        "{:<8} {:>6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "model",
        "batch",
        "seq",
        "p50 ms",
        "p99 ms",
        "tokens/s",
        "GFLOP/s",
        "of candle",
        "of BLAS",
        "of FMA",
        "of kernel"
    );
}

/// Seconds of each of `iters` timed runs of `run` on a worker of `pool`, after one untimed
/// run (whose profile is dropped).
fn time_passes(
    pool: &rayon::ThreadPool,
    iters: usize,
    run: &(dyn Fn() -> Result<()> + Sync),
) -> Result<Vec<f64>> {
    pool.install(|| -> Result<Vec<f64>> {
        run()?;
        tidings::model::profile::take();
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    })
}

/// Prints model `name`'s row (config `cfg`) from the `times` of its runs of `work`, and its
/// profile when profiling.
fn report(
    name: &str,
    cfg: &tidings::model::ModelConfig,
    mut times: Vec<f64>,
    work: &Workload,
    peaks: &Peaks,
) {
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    let p99 = times[((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
    let tps = work.tokens() as f64 / p50;
    let gflops = work.flops(cfg) / p50 / 1e9;
    let share =
        |of: Option<f64>| of.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * gflops / p));
    println!(
        "{:<8} {:>6} {:>6} {:>10.1} {:>10.1} {:>10.0} {:>9.1} {:>9} {:>9} {:>9} {:>9}",
        name,
        work.windows(),
        work.seq,
        p50 * 1e3,
        p99 * 1e3,
        tps,
        gflops,
        share(peaks.candle),
        share(peaks.blas),
        share(peaks.fma),
        share(peaks.kernel)
    );
    if tidings::model::profile::enabled() {
        print_profile(name, times.iter().sum());
    }
}

/// With `TIDINGS_PROFILE` set: each phase of the fused layers as a share of `total` seconds of
/// timed passes of model `name`, and what the layers leave.
fn print_profile(name: &str, total: f64) {
    let phases = tidings::model::profile::take();
    let layers: f64 = phases.iter().sum();
    for (phase, secs) in tidings::model::profile::PHASES.iter().zip(phases) {
        println!(
            "  {name}: {phase:<38} {:>5.1}% of the passes",
            100.0 * secs / total
        );
    }
    println!(
        "  {name}: {:<38} {:>5.1}% of the passes",
        "outside the layers (embeddings, pooling, copies)",
        100.0 * (total - layers).max(0.0) / total
    );
}

#[cfg(test)]
mod tests {
    use super::parse_mix;

    #[test]
    fn a_mix_is_passes_of_window_lengths() {
        let Ok(mix) = parse_mix("256,256, 131;62") else {
            panic!("a valid mix was refused");
        };
        assert_eq!(mix.0, [vec![256, 256, 131], vec![62]]);
        for bad in ["", "256,,3", "256;2", "x", "3;-4"] {
            assert!(parse_mix(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
