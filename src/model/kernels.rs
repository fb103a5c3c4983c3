//! Vectorised CPU kernels of the fused inference path ([`super::fused`]).
//!
//! candle's CPU backend runs GELU and softmax through scalar `libm` calls (`erff`, `expf`) and
//! every element-wise step as a separate pass over memory; in a MiniLM forward pass at batch
//! 9 x 256 those took more time than the matrix products (measured with `perf`: erf 12%,
//! exp 12%, binary maps 11%, gemm 37%). These kernels do the same maths in one pass each,
//! written as plain loops that the compiler vectorises. [`multiversion`] compiles each for
//! AVX-512 and AVX2+FMA and picks the best the CPU has at run time, with a portable fallback.
//!
//! Accuracy: `exp` is Cephes' single-precision polynomial (relative error < 2e-7), `erf` is
//! Eigen's rational approximation (absolute error < 1e-6 on the whole line); the unit tests
//! below check both against `libm`.

use multiversion::multiversion;

/// Lanes of the manual reductions: float sums are not reassociated by the compiler, so a
/// reduction spells out its lanes to be vectorised.
const LANES: usize = 16;

/// `a * b + c`, fused into one rounding where `FMA` says the CPU does that in one instruction
/// (a multi-versioned kernel passes `target_cfg_f!(target_feature = "fma")`); otherwise
/// `mul_add` would be a slow library call, and the two operations stay separate.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for `x` in `[-87, 88]` (clamped outside), Cephes' `expf`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// [`exp`], its polynomial in fused multiply-adds where `FMA` (see [`madd`]).
#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = madd::<FMA>(x, std::f32::consts::LOG2_E, 0.5).floor();
    let r = madd::<FMA>(n, 2.121_944_4e-4, madd::<FMA>(n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p * r, r, r) + 1.0;
    // `max`/`min` (unlike `clamp`) also turn a NaN `x` into a bound; `y` is then NaN, and
    // so is the result.
    #[allow(clippy::manual_clamp)]
    let n = n.max(-126.0).min(127.0);
    // SAFETY: `n` is a whole number in [-126, 127], so the conversion is exact; unlike `as`,
    // it needs no saturation and NaN checks, and vectorises.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    y * f32::from_bits(((n + 127) << 23) as u32)
}

/// The error function, Eigen's `generic_fast_erf_float`: a 13/8 rational approximation on
/// `[-4, 4]`, exactly `±1` (in f32) beyond.
#[inline(always)]
fn erf(x: f32) -> f32 {
    erf_with::<false>(x)
}

/// [`erf`], its polynomials in fused multiply-adds where `FMA` (see [`madd`]).
#[inline(always)]
fn erf_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = madd::<FMA>(p, x2, 2.770_681_4e-8);
    p = madd::<FMA>(p, x2, -2.101_024e-6);
    p = madd::<FMA>(p, x2, -5.692_506_4e-5);
    p = madd::<FMA>(p, x2, -7.349_906_3e-4);
    p = madd::<FMA>(p, x2, -2.954_600_1e-3);
    p = madd::<FMA>(p, x2, -1.609_603_3e-2);
    let p = p * x;
    let mut q = -1.456_607_2e-5_f32;
    q = madd::<FMA>(q, x2, -2.133_740_6e-4);
    q = madd::<FMA>(q, x2, -1.682_827e-3);
    q = madd::<FMA>(q, x2, -7.373_329e-3);
    q = madd::<FMA>(q, x2, -1.426_474e-2);
    p / q
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(rest, |m, &v| m.max(v))
}

/// GELU with the exact (erf) form, in place: `x/2 * (1 + erf(x/sqrt 2))`, as BERT's `gelu`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_erf(x: &mut [f32]) {
    if multiversion::target::target_cfg_f!(target_feature = "fma") {
        gelu_erf_with::<true>(x);
    } else {
        gelu_erf_with::<false>(x);
    }
}

#[inline(always)]
fn gelu_erf_with<const FMA: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf_with::<FMA>(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// The gradient of [`gelu_erf`]: `dx = g * (Φ(x) + x φ(x))`, with `Φ(x) = (1 + erf(x/sqrt 2))/2`
/// and `φ(x) = exp(-x²/2) / sqrt(2 pi)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_erf_grad(x: &[f32], g: &[f32], dx: &mut [f32]) {
    // 1 / sqrt(2 pi)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        *dx = g * (cdf + x * exp(-0.5 * x * x) * INV_SQRT_2PI);
    }
}

/// GELU with the tanh approximation, in place, as `gelu_new` / `gelu_pytorch_tanh`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_tanh(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for v in x.iter_mut() {
        let u = C * (*v + 0.044_715 * *v * *v * *v);
        // tanh(u) = 1 - 2 / (e^{2u} + 1), which saturates cleanly at both ends.
        let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
        *v = 0.5 * *v * (1.0 + t);
    }
}

/// ReLU, in place.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn relu(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = v.max(0.0);
    }
}

/// Softmax of each row of a row-major `[_, cols]` matrix, short of its last step: each
/// value becomes `e^(x - row max)` in place, and `inv_sums[r]` is 1 / row `r`'s sum of those.
/// Attention applies that factor to its output rows (head-dimension wide) rather than to
/// the probabilities (sequence wide), which saves a pass over the scores. `inv_sums` must
/// hold a value per row.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn exp_rows(x: &mut [f32], cols: usize, inv_sums: &mut [f32]) {
    if multiversion::target::target_cfg_f!(target_feature = "fma") {
        exp_rows_with::<true>(x, cols, inv_sums);
    } else {
        exp_rows_with::<false>(x, cols, inv_sums);
    }
}

#[inline(always)]
fn exp_rows_with<const FMA: bool>(x: &mut [f32], cols: usize, inv_sums: &mut [f32]) {
    if cols == 0 {
        return;
    }
    assert!(inv_sums.len() >= x.len() / cols, "a 1/sum per row");
    for (row, inv) in x.chunks_exact_mut(cols).zip(inv_sums) {
        let m = max(row);
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp_with::<FMA>(*v - m);
                *a += *v;
            }
        }
        let mut rest = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_with::<FMA>(*v - m);
            rest += *v;
        }
        *inv = 1.0 / (acc.iter().sum::<f32>() + rest);
    }
}

/// Multiplies each of `rows` rows of `cols` values, `stride` apart, by its factor.
///
/// # Safety
/// `x` must address `rows` rows of `cols` writable floats, `stride` floats apart, that
/// nothing else uses meanwhile; `factors` holds at least `rows` values.
pub unsafe fn scale_rows(x: *mut f32, stride: usize, rows: usize, cols: usize, factors: &[f32]) {
    for (r, f) in factors.iter().enumerate().take(rows) {
        for v in std::slice::from_raw_parts_mut(x.add(r * stride), cols) {
            *v *= f;
        }
    }
}

/// Layer norm of each row of a row-major `[_, gamma.len()]` matrix, in place:
/// `(x - mean) / sqrt(var + eps) * gamma + beta`, with the biased variance (as PyTorch).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let cols = gamma.len();
    if cols == 0 {
        return;
    }
    let inv_n = 1.0 / cols as f32;
    for row in x.chunks_exact_mut(cols) {
        let mean = sum(row) * inv_n;
        for v in row.iter_mut() {
            *v -= mean;
        }
        let mut acc = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        let var = (acc.iter().sum::<f32>() + rest) * inv_n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = *v * inv_std * g + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    #[test]
    fn exp_matches_libm() {
        for x in grid(-87.0, 88.0, 200_003) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            assert!(rel < 3e-7, "exp({x}): relative error {rel}");
            let rel = ((exp_with::<true>(x) as f64 - want) / want).abs();
            assert!(
                rel < 3e-7,
                "exp({x}) with fused multiply-adds: relative error {rel}"
            );
        }
        assert!(exp_with::<true>(f32::NAN).is_nan() && exp_with::<true>(0.0) == 1.0);
        assert_eq!(exp(-1e9), exp(-87.0));
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn erf_and_gelu_match_libm() {
        for x in grid(-10.0, 10.0, 200_001) {
            let want = libm_erf(x as f64);
            let err = (erf(x) as f64 - want).abs();
            assert!(err < 1e-6, "erf({x}): error {err}");
            let err = (erf_with::<true>(x) as f64 - want).abs();
            assert!(err < 1e-6, "erf({x}) with fused multiply-adds: error {err}");
        }
        let mut xs = grid(-12.0, 12.0, 10_001);
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| {
                let x = x as f64;
                0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2))
            })
            .collect();
        gelu_erf(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 2e-6 * w.abs().max(1.0),
                "{g} vs {w}"
            );
        }
        let mut ts = grid(-12.0, 12.0, 10_001);
        let orig = ts.clone();
        gelu_tanh(&mut ts);
        for (g, x) in ts.iter().zip(&orig) {
            let x = *x as f64;
            let w = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (*g as f64 - w).abs() < 2e-6 * w.abs().max(1.0),
                "{g} vs {w}"
            );
        }
    }

    /// erf in f64 from its series / continued fraction is overkill here: the standard
    /// library has no erf, so use the complementary error function from Numerical Recipes'
    /// `erfcc` (fractional error < 1.2e-7), accurate enough to judge a 1e-6 tolerance.
    fn libm_erf(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let r = t
            * (-z * z - 1.265_512_23
                + t * (1.000_023_68
                    + t * (0.374_091_96
                        + t * (0.096_784_18
                            + t * (-0.186_288_06
                                + t * (0.278_868_07
                                    + t * (-1.135_203_98
                                        + t * (1.488_515_87
                                            + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
                .exp();
        if x >= 0.0 {
            1.0 - r
        } else {
            r - 1.0
        }
    }

    #[test]
    fn softmax_and_layer_norm_match_the_textbook() {
        let cols = 37;
        let mut x: Vec<f32> = (0..cols * 3)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let orig = x.clone();
        let mut inv = vec![0f32; 3];
        exp_rows(&mut x, cols, &mut inv);
        // SAFETY: x holds 3 rows of cols floats.
        unsafe { scale_rows(x.as_mut_ptr(), cols, 3, cols, &inv) };
        for (row, o) in x.chunks(cols).zip(orig.chunks(cols)) {
            let m = o
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let z: f64 = o.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (p, &v) in row.iter().zip(o) {
                let want = (v as f64 - m).exp() / z;
                assert!(
                    (*p as f64 - want).abs() < 1e-7 + 1e-6 * want,
                    "{p} vs {want}"
                );
            }
        }
        let gamma: Vec<f32> = (0..cols).map(|i| 1.0 + i as f32 / 50.0).collect();
        let beta: Vec<f32> = (0..cols).map(|i| i as f32 / 10.0 - 1.0).collect();
        let mut y = orig.clone();
        layer_norm_rows(&mut y, &gamma, &beta, 1e-12);
        for (row, o) in y.chunks(cols).zip(orig.chunks(cols)) {
            let mean = o.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = o.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            for (i, (v, &x)) in row.iter().zip(o).enumerate() {
                let want =
                    (x as f64 - mean) / (var + 1e-12).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((*v as f64 - want).abs() < 1e-5, "{v} vs {want}");
            }
        }
    }
}
