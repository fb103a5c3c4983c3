//! The encoder's matrix products, one kernel at a time: Tidings' int8 and f32 kernels on the
//! shapes a MiniLM-sized layer runs (`m` tokens x `k` in x `n` out), best of 15 passes each.
//!
//! `cargo bench --bench kernels` (`RAYON_NUM_THREADS` sets the threads). It prints GOP/s
//! (int8; activation quantization included) and GFLOP/s (f32), two operations per
//! multiply-add. The two kernels alternate within each pass, so a slow minute on a shared
//! machine hits both. On CPUs the kernels do not serve (no AVX2 and FMA) it says so;
//! `TIDINGS_QGEMM` and `TIDINGS_SGEMM` pick the int8 and f32 kernels.

use std::time::Instant;
use tidings::model::qgemm::{QuantizedRows, QuantizedWeights};
use tidings::model::sgemm::PackedWeights;

/// Deterministic values in [-1, 1].
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Seconds per call of `run`, timed over `reps` calls.
fn per_call(reps: usize, mut run: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let threads = rayon::current_num_threads();
    // (m, k, n): query/key/value, attention output, feed-forward in and out at 2048 tokens
    // (8 x 256), the same at 64 tokens (1 x 64), and a square reference.
    let shapes = [
        (2048, 384, 1152),
        (2048, 384, 384),
        (2048, 384, 1536),
        (2048, 1536, 384),
        (64, 384, 1152),
        (64, 1536, 384),
        (2048, 2048, 2048),
    ];
    let name = |k: Option<&'static str>| k.unwrap_or("none");
    println!(
        "{threads} threads; best of 15 passes; int8 kernel {}, f32 kernel {}",
        name(tidings::model::qgemm::kernel().map(|k| k.name())),
        name(tidings::model::sgemm::kernel().map(|k| k.name()))
    );
    println!(
        "{:>5} {:>5} {:>5} {:>10} {:>10}",
        "m", "k", "n", "int8 GOP/s", "f32 GFLOP/s"
    );
    for (m, k, n) in shapes {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let mut c = vec![0f32; m * n];
        let int8 = QuantizedWeights::quantize(&b, k, n);
        let f32 = PackedWeights::pack(&b, k, n);
        let mut rows = QuantizedRows::default();
        let ops = 2.0 * (m * k * n) as f64;
        let reps = ((5e8 / ops) as usize).max(2);
        let (mut t_int8, mut t_f32) = (f64::MAX, f64::MAX);
        for _ in 0..15 {
            if let Some(w) = &int8 {
                t_int8 = t_int8.min(per_call(reps, || {
                    w.matmul_acc(&a, m, &mut c, threads, &mut rows)
                }));
            }
            if let Some(w) = &f32 {
                t_f32 = t_f32.min(per_call(reps, || w.matmul_acc(&a, m, &mut c, threads)));
            }
        }
        let show = |t: f64| {
            if t == f64::MAX {
                "not here".to_string()
            } else {
                format!("{:.1}", ops / t / 1e9)
            }
        };
        println!(
            "{m:>5} {k:>5} {n:>5} {:>10} {:>10}",
            show(t_int8),
            show(t_f32)
        );
    }
}
