//! The int8 path: weights quantized once at load (symmetric, one scale per output column),
//! activations quantized per call (symmetric, one scale per row), products in integers.
//!
//! `c[i, j] += sa[i] sb[j] sum_k qa[i, k] qb[k, j]` where `qa = round(a / sa)` lies in
//! `[-127, 127]` (`sa` = the row's largest magnitude / 127) and `qb = round(b / sb)` in
//! `[-63, 63]` (`sb` = the column's largest magnitude / 63). AVX2's `vpmaddubsw` multiplies
//! unsigned by signed bytes and adds pairs into saturating 16-bit lanes; it gets the
//! activations as `qa + 128` (in `[1, 255]`) and the weights, so a pair sums to at most
//! `2 * 255 * 63 = 32130` and never saturates: the integer sums are exact, and `128 x` each
//! column's weight sum (kept from load) takes the offset back out. `vpmaddwd` then widens four
//! products of a column into one 32-bit lane; the 32-bit sums cannot overflow below
//! `k = 2^18`, and each is converted to f32 once, at the end. (8-bit weights would need the signs moved onto
//! the activations with `vpsignb` first: measured, that was 15-30% slower, for no
//! accuracy: CoNLL dev F1 93.15 vs 93.14 here, AG dev 0.8132 vs 0.8147.) A 4-row x 16-column
//! tile keeps eight accumulators. A tile's quantized rows stay in L1 while it walks a block
//! of column panels (`k` 4-byte groups each, 6-24 KiB at the encoder's widths) held in L2,
//! left to right, its output rows prefetched when it starts. On the encoder's 2048-row
//! products (`cargo bench --bench kernels`, 2 threads, 2-core AMD EPYC) that ran at 235-287
//! GOP/s against 183-225 for panels held in L1 with every row passing down them (which
//! misses the cache on each output line).
//!
//! It runs on any x86-64 CPU with AVX2, AVX-512 ones included, and needs no FMA
//! ([`QuantizedWeights::quantize`] returns `None` elsewhere, and the caller keeps f32). CPUs with AVX-512 VNNI would do
//! better with `vpdpbusd`; that kernel is not written, since no such machine was at hand to
//! measure it.

use super::sgemm::{over_column_groups, panel_blocks, SharedMut};
use multiversion::multiversion;
use rayon::prelude::*;

/// Columns per panel (two `ymm` registers of eight 32-bit sums).
const NR: usize = 16;
/// Rows per tile: 8 accumulators, 4 weight registers, a broadcast and temporaries fit the 16
/// `ymm` registers.
const MR: usize = 4;
/// Weights are quantized to `[-63, 63]`: with activations as `q + 128` in `[1, 255]`,
/// `vpmaddubsw`'s pair sums stay within `2 * 255 * 63 = 32130` and never saturate.
const WEIGHT_LEVELS: f32 = 63.0;
/// Bytes of one panel line: 16 columns x 4 consecutive `k`.
const LINE: usize = NR * 4;

/// One line of a panel: for columns 0..16, four consecutive weights of that column.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; LINE]);

impl Default for Line {
    fn default() -> Self {
        Self([0; LINE])
    }
}

/// A `[k, n]` row-major matrix (`W^T`) quantized per column to int8 and packed in panels of
/// 16 columns, `k` rounded up to a multiple of 4 (zeros).
#[derive(Debug, Clone)]
pub struct QuantizedWeights {
    lines: Vec<Line>,
    /// Per column, padded with zeros to whole panels.
    scales: Vec<f32>,
    /// Per column (padded likewise): the sum of its quantized weights, to take the
    /// activations' offset of 128 back out of the integer sums.
    colsums: Vec<i32>,
    k: usize,
    n: usize,
}

/// Rows of activations quantized for [`QuantizedWeights::matmul_acc`], reused between calls.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    /// `q + 128` for activations `q` in `[-127, 127]`.
    values: Vec<u8>,
    scales: Vec<f32>,
}

impl QuantizedWeights {
    /// Quantizes and packs `b: [k, n]` (row-major) when this CPU runs the kernel (x86-64 with
    /// AVX2), `None` otherwise.
    pub fn quantize(b: &[f32], k: usize, n: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        Some(Self::quantize_always(b, k, n))
    }

    fn quantize_always(b: &[f32], k: usize, n: usize) -> Self {
        assert!(k < 1 << 18, "k = {k}: the 32-bit sums could overflow");
        assert_eq!(b.len(), k * n, "matrix is not k x n");
        let panels = n.div_ceil(NR);
        let groups = k.div_ceil(4);
        let mut scales = vec![0f32; panels * NR];
        for (j, s) in scales.iter_mut().enumerate().take(n) {
            // A column holding NaN or infinity gets a NaN scale: its outputs are NaN, as in f32.
            let max = (0..k).map(|t| b[t * n + j].abs()).fold(0f32, |m, v| {
                if v.is_nan() {
                    v
                } else {
                    m.max(v)
                }
            });
            *s = if max.is_finite() {
                max / WEIGHT_LEVELS
            } else {
                f32::NAN
            };
        }
        let mut lines = vec![Line::default(); panels * groups];
        for p in 0..panels {
            for g in 0..groups {
                let line = &mut lines[p * groups + g].0;
                for c in 0..NR {
                    let j = p * NR + c;
                    if j >= n || scales[j] == 0.0 || scales[j].is_nan() {
                        continue;
                    }
                    let inv = 1.0 / scales[j];
                    for t in 0..4 {
                        let kk = g * 4 + t;
                        if kk < k {
                            line[c * 4 + t] = quantize(b[kk * n + j], inv, WEIGHT_LEVELS);
                        }
                    }
                }
            }
        }
        let mut colsums = vec![0i32; panels * NR];
        for (j, sum) in colsums.iter_mut().enumerate() {
            let (p, c) = (j / NR, j % NR);
            *sum = (0..groups)
                .flat_map(|g| lines[p * groups + g].0[c * 4..c * 4 + 4].iter())
                .map(|&v| v as i32)
                .sum();
        }
        Self {
            lines,
            scales,
            colsums,
            k,
            n,
        }
    }

    /// `c[m, n] += a[m, k] B`, with `a` and `c` row-major and contiguous; `a` is quantized
    /// into `rows` first. Spread over `threads` rayon tasks (1: the calling thread).
    pub fn matmul_acc(
        &self,
        a: &[f32],
        m: usize,
        c: &mut [f32],
        threads: usize,
        rows: &mut QuantizedRows,
    ) {
        let (k, n) = (self.k, self.n);
        let holds = |len: usize, cols: usize| m.checked_mul(cols).is_some_and(|x| len >= x);
        assert!(holds(a.len(), k) && holds(c.len(), n), "buffers too small");
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        let kp = k.div_ceil(4) * 4;
        rows.quantize(&a[..m * k], m, k, kp, threads);
        let out = SharedMut(c.as_mut_ptr());
        let rows = &*rows;
        over_column_groups(n.div_ceil(NR), threads, |panels| {
            // SAFETY: AVX2 held when these weights were quantized; `panels` are this task's
            // own output columns; `rows` holds m x kp bytes and m scales, `c` m x n floats
            // (asserted above).
            unsafe { self.run_panels(rows, m, out, panels) };
        });
    }

    /// # Safety
    /// AVX2; `rows` holds `m` quantized rows of this matrix's padded depth; `c` `m x n`
    /// floats; no other thread writes the columns of `panels`.
    unsafe fn run_panels(
        &self,
        rows: &QuantizedRows,
        m: usize,
        c: SharedMut,
        panels: std::ops::Range<usize>,
    ) {
        let (k, n) = (self.k, self.n);
        let groups = k.div_ceil(4);
        let kp = groups * 4;
        // Panels in blocks that stay in L2 while every row tile passes over them; a tile's
        // quantized rows stay in L1 while it walks the block's panels, and its output rows
        // are written left to right.
        for block in panel_blocks(panels, groups * LINE) {
            let mut r = 0;
            while r < m {
                let tile_rows = MR.min(m - r);
                let a = rows.values.as_ptr().add(r * kp);
                let sa = rows.scales.as_ptr().add(r);
                for p in block.clone() {
                    let cols = (n - p * NR).min(NR);
                    let b = self.lines.as_ptr().add(p * groups) as *const i8;
                    let sb = self.scales.as_ptr().add(p * NR);
                    let cs = self.colsums.as_ptr().add(p * NR);
                    let c_tile = c.ptr().add(r * n + p * NR);
                    avx2::tile(tile_rows, groups, a, kp, sa, b, sb, cs, c_tile, n, cols);
                }
                r += tile_rows;
            }
        }
    }
}

impl QuantizedRows {
    /// Quantizes the `m` rows of `a: [m, k]` to `kp` bytes each (zeros past `k`).
    fn quantize(&mut self, a: &[f32], m: usize, k: usize, kp: usize, threads: usize) {
        self.values.resize(m * kp, 0);
        self.scales.resize(m, 0.0);
        let work = |((row, dst), scale): ((&[f32], &mut [u8]), &mut f32)| {
            *scale = quantize_row(row, &mut dst[..k]);
            dst[k..].fill(128);
        };
        if threads > 1 && m * k >= 1 << 16 {
            a.par_chunks_exact(k)
                .zip(self.values.par_chunks_exact_mut(kp))
                .zip(self.scales.par_iter_mut())
                .for_each(work);
        } else {
            a.chunks_exact(k)
                .zip(self.values.chunks_exact_mut(kp))
                .zip(self.scales.iter_mut())
                .for_each(work);
        }
    }
}

/// `round(x * inv)` as a byte, clamped to `[-levels, levels]`; NaN gives 0.
fn quantize(x: f32, inv: f32, levels: f32) -> i8 {
    (x * inv).round().clamp(-levels, levels) as i8
}

/// Lanes of the manual max reduction (spelled out so that the compiler vectorises it).
const LANES: usize = 16;

/// The largest magnitude in `x`, or NaN when `x` holds NaN or an infinity.
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    // x * 0 is 0 for finite x and NaN otherwise: one vectorised pass finds both.
    let mut poison = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for ((l, p), v) in lanes.iter_mut().zip(&mut poison).zip(c) {
            *l = l.max(v.abs());
            *p += v * 0.0;
        }
    }
    let rest = tail.iter().fold(0f32, |m, v| m.max(v.abs()));
    let bad: f32 = poison.iter().sum::<f32>() + tail.iter().map(|v| v * 0.0).sum::<f32>();
    lanes.iter().fold(rest, |m, v| m.max(*v)) + bad
}

/// Quantizes `src` into `dst` as `q + 128` with `q = round(src / scale)` in `[-127, 127]`
/// and `scale = max |src| / 127`, which it returns: 0 for a row of zeros, NaN for a row
/// holding NaN or an infinity (so that its outputs are NaN, as in f32); the values of both
/// are then all 0 (stored as 128).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn quantize_row(src: &[f32], dst: &mut [u8]) -> f32 {
    let max = max_abs(src);
    if !(max.is_finite() && max > 0.0) {
        dst.fill(128);
        return if max.is_nan() { f32::NAN } else { 0.0 };
    }
    let inv = 127.0 / max;
    for (d, s) in dst.iter_mut().zip(src) {
        // `round()` is not vectorised; adding and subtracting 1.5 * 2^23 rounds to nearest
        // (ties to even) in f32 for |v| <= 2^22, which the clamp guarantees first.
        // `max`/`min` (unlike `clamp`) also turn NaN into a bound, which the conversion
        // below needs.
        #[allow(clippy::manual_clamp)]
        let v = (s * inv).max(-127.0).min(127.0);
        let r = (v + 12_582_912.0) - 12_582_912.0;
        // SAFETY: `r` is a whole number in [-127, 127]; unlike `as`, the conversion then
        // needs no saturation and NaN checks, and vectorises.
        *d = (unsafe { r.to_int_unchecked::<i32>() } + 128) as u8;
    }
    max / 127.0
}

/// Whether the int8 kernel runs here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LINE, MR};
    use crate::model::sgemm::avx2::add_to_row;
    use std::arch::x86_64::*;

    /// `c[rows, cols] += sa[i] sb[j] (qa qb)[i, j]` for one tile of at most [`MR`] rows.
    ///
    /// # Safety
    /// AVX2; `a` addresses `rows` rows of `4 * groups` bytes with stride `lda`, `sa` `rows`
    /// scales, `b` `groups` 64-byte lines, `sb` 16 scales and `cs` 16 column sums, `c` `rows`
    /// rows of `cols` floats with stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile(
        rows: usize,
        groups: usize,
        a: *const u8,
        lda: usize,
        sa: *const f32,
        b: *const i8,
        sb: *const f32,
        cs: *const i32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        match rows {
            4 => tile_m::<4>(groups, a, lda, sa, b, sb, cs, c, ldc, cols),
            3 => tile_m::<3>(groups, a, lda, sa, b, sb, cs, c, ldc, cols),
            2 => tile_m::<2>(groups, a, lda, sa, b, sb, cs, c, ldc, cols),
            1 => tile_m::<1>(groups, a, lda, sa, b, sb, cs, c, ldc, cols),
            _ => debug_assert_eq!(rows, 0, "tiles have at most {MR} rows"),
        }
    }

    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    unsafe fn tile_m<const M: usize>(
        groups: usize,
        a: *const u8,
        lda: usize,
        sa: *const f32,
        b: *const i8,
        sb: *const f32,
        cs: *const i32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        // The tile's output rows are read at the end; start fetching them now.
        for i in 0..M {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        }
        let mut acc = [[_mm256_setzero_si256(); 2]; M];
        for g in 0..groups {
            let b0 = _mm256_load_si256(b.add(g * LINE) as *const __m256i);
            let b1 = _mm256_load_si256(b.add(g * LINE + 32) as *const __m256i);
            for (i, acc) in acc.iter_mut().enumerate() {
                let four = std::ptr::read_unaligned(a.add(i * lda + g * 4) as *const i32);
                let ai = _mm256_set1_epi32(four);
                let p0 = _mm256_maddubs_epi16(ai, b0);
                let p1 = _mm256_maddubs_epi16(ai, b1);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p0, ones));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(p1, ones));
            }
        }
        let s0 = _mm256_loadu_ps(sb);
        let s1 = _mm256_loadu_ps(sb.add(8));
        // 128 x the column sums: the activations' offset, taken back out.
        let o0 = _mm256_slli_epi32::<7>(_mm256_loadu_si256(cs as *const __m256i));
        let o1 = _mm256_slli_epi32::<7>(_mm256_loadu_si256(cs.add(8) as *const __m256i));
        for (i, acc) in acc.iter().enumerate() {
            let si = _mm256_set1_ps(*sa.add(i));
            let d0 = _mm256_sub_epi32(acc[0], o0);
            let d1 = _mm256_sub_epi32(acc[1], o1);
            let v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, si));
            let v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, si));
            add_to_row(c.add(i * ldc), v0, v1, cols);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    /// Never called: [`super::available`] is false off x86-64.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        _: usize,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const f32,
        _: *const i8,
        _: *const f32,
        _: *const i32,
        _: *mut f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("the int8 kernel runs only on x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sgemm::tests::values;

    #[test]
    fn integer_product_is_exact_for_the_quantized_values() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 17), (9, 384, 48), (13, 130, 33)] {
            let a = values(m * k, 4);
            let b = values(k * n, 5);
            let start = values(m * n, 6);
            let w = QuantizedWeights::quantize_always(&b, k, n);
            for threads in [1, 2, 3] {
                let mut rows = QuantizedRows::default();
                let mut c = start.clone();
                w.matmul_acc(&a, m, &mut c, threads, &mut rows);
                let kp = k.div_ceil(4) * 4;
                for i in 0..m {
                    for j in 0..n {
                        // The same maths in f64 from the quantized values: only the final
                        // f32 scaling may differ.
                        let (sa, sb) = (rows.scales[i] as f64, w.scales[j] as f64);
                        let dot: i64 = (0..k)
                            .map(|t| {
                                let qa = rows.values[i * kp + t] as i64 - 128;
                                let (p, g, c4) = (j / NR, t / 4, (j % NR) * 4 + t % 4);
                                let qb = w.lines[p * k.div_ceil(4) + g].0[c4] as i64;
                                qa * qb
                            })
                            .sum();
                        let want = start[i * n + j] as f64 + sa * sb * dot as f64;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{k}x{n} threads {threads} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_product_is_close_to_the_float_product() {
        if !available() {
            return;
        }
        let (m, k, n) = (8, 384, 64);
        let a = values(m * k, 7);
        let b = values(k * n, 8);
        let w = QuantizedWeights::quantize_always(&b, k, n);
        let mut c = vec![0f32; m * n];
        w.matmul_acc(&a, m, &mut c, 1, &mut QuantizedRows::default());
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                    .sum();
                worst = worst.max((c[i * n + j] as f64 - exact).abs());
            }
        }
        // Rounding moves each factor by at most half a step (1/254 here), so a term moves by
        // about (|a| + |b|) / 254 <= 1/127; over 384 terms of random sign the sum moves by
        // ~0.05 (one standard deviation), against sums of |a b| near 96.
        assert!(worst < 0.3, "worst error {worst}");
    }

    #[test]
    fn quantization_keeps_the_extremes_and_zeroes_empty_rows() {
        let row = [0.5f32, -1.0, 0.25, 0.0, f32::NAN];
        assert_eq!(max_abs(&row[..4]), 1.0);
        let mut q = [0u8; 5];
        assert!(quantize_row(&row, &mut q).is_nan(), "a NaN poisons the row");
        assert_eq!(quantize_row(&row[..4], &mut q[..4]), 1.0 / 127.0);
        assert_eq!(q[..4], [128 + 64, 1, 128 + 32, 128]);
        assert!(quantize_row(&[1.0, f32::INFINITY], &mut q[..2]).is_nan());
        assert_eq!(q[..2], [128, 128]);
        let long: Vec<f32> = (0..40)
            .map(|i| if i == 33 { f32::NAN } else { 0.5 })
            .collect();
        assert!(max_abs(&long).is_nan() && max_abs(&long[..32]) == 0.5);
        let mut rows = QuantizedRows::default();
        rows.quantize(&[0.0; 6], 2, 3, 4, 1);
        assert_eq!(rows.scales, [0.0, 0.0]);
        assert!(rows.values.iter().all(|&v| v == 128));
    }
}
