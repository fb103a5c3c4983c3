//! The fused CPU inference path of the encoder's transformer layers.
//!
//! candle runs a layer as some twenty tensor ops, each a pass over memory with its own
//! allocation and thread fork. Here a layer is five matrix products and a few one-pass kernels
//! ([`super::kernels`]) over buffers reused for the whole forward pass. The products run on
//! weights packed once at load for Tidings' microkernel ([`super::sgemm`]), or quantized to
//! int8 ([`super::qgemm`], [`super::precision::Precision`]); on CPUs those do not serve, on
//! `gemm` (the crate candle itself uses). Attention packs each head's keys and values for the
//! same microkernel. Around them:
//! - one product for query, key and value together (their weights side by side, the query's
//!   pre-multiplied by `1/sqrt(head_dim)`), with the bias written into the output first;
//! - attention per (sequence, head) read straight out of that product with strides (keys and
//!   values are packed per head, with no other transposes or copies);
//! - residual connections added by accumulating the products into them.
//!
//! Sequences are **unpadded**: only tokens whose attention-mask value is 1 are packed, one
//! after another, and each attends to the tokens of its own sequence only. Padding costs no
//! work at all, and the result for every real token is the same as the padded, masked
//! computation (a masked key gets probability `exp(-10000)`, which is 0 in f32).

use super::kernels;
use super::precision::Precision;
use super::qgemm::{QuantizedRows, QuantizedWeights};
use super::sgemm::{PackedWeights, SharedMut};
use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// A row-major view of a matrix for [`matmul`]: where it starts, and its row stride (columns
/// are contiguous unless `col_stride` says otherwise).
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl View {
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] rhs[k, n]`; `dst` has row stride `dst_rs`, contiguous columns.
///
/// # Safety
/// Every view must address valid memory for its dimensions, and `dst` must not overlap the
/// inputs or memory another thread uses.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// How a [`FusedLinear`] holds `W^T` (`[in, out]`).
#[derive(Debug, Clone)]
enum Weights {
    /// Row-major and contiguous, for `gemm`: while a layer is built, and on CPUs Tidings'
    /// own kernels do not serve.
    Plain(Vec<f32>),
    /// Packed once for the microkernel of [`super::sgemm`].
    Packed(PackedWeights),
    /// Quantized for [`super::qgemm`].
    Int8(QuantizedWeights),
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub(super) struct FusedLinear {
    weights: Weights,
    bias: Vec<f32>,
    inp: usize,
    out: usize,
}

impl FusedLinear {
    /// From candle tensors `weight: [out, in]`, `bias: [out]`.
    pub(super) fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        Ok(Self {
            weights: Weights::Plain(weight.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?),
            bias: bias.to_vec1::<f32>()?,
            inp,
            out,
        })
    }

    /// `W^T` row-major, as [`FusedLinear::new`] and [`FusedLinear::concat`] build it.
    fn plain(&self) -> Result<&[f32]> {
        match &self.weights {
            Weights::Plain(wt) => Ok(wt),
            _ => candle_core::bail!("a finished linear layer has no plain weights"),
        }
    }

    /// Several layers reading the same input, side by side: `[in, out_1 + out_2 + ...]`,
    /// each scaled by its factor.
    pub(super) fn concat(parts: &[(&FusedLinear, f32)]) -> Result<Self> {
        let inp = parts.first().map_or(0, |(p, _)| p.inp);
        if parts.iter().any(|(p, _)| p.inp != inp) {
            candle_core::bail!("concatenated linear layers differ in input width");
        }
        let out: usize = parts.iter().map(|(p, _)| p.out).sum();
        let mut wt = Vec::with_capacity(inp * out);
        for r in 0..inp {
            for (p, s) in parts {
                wt.extend(p.plain()?[r * p.out..(r + 1) * p.out].iter().map(|w| w * s));
            }
        }
        let bias = parts
            .iter()
            .flat_map(|(p, s)| p.bias.iter().map(move |b| b * s))
            .collect();
        Ok(Self {
            weights: Weights::Plain(wt),
            bias,
            inp,
            out,
        })
    }

    /// The last step of building a layer: the weights as the products will read them, in
    /// `precision` where this CPU runs that kernel (int8: [`super::qgemm`]; f32:
    /// [`super::sgemm`]'s packed layout), plain for `gemm` otherwise.
    pub(super) fn finish(self, precision: Precision) -> Self {
        let Weights::Plain(wt) = &self.weights else {
            return self;
        };
        let quantized = match precision {
            Precision::Int8 => QuantizedWeights::quantize(wt, self.inp, self.out),
            Precision::F32 => None,
        };
        let weights = match quantized {
            Some(q) => Weights::Int8(q),
            None => match PackedWeights::pack(wt, self.inp, self.out) {
                Some(p) => Weights::Packed(p),
                None => return self,
            },
        };
        Self { weights, ..self }
    }

    /// Whether the products run in int8.
    fn is_int8(&self) -> bool {
        matches!(self.weights, Weights::Int8(_))
    }

    /// `y[rows, out] = x[rows, in] W^T + b (+ residual)`; `qrows` holds the quantized
    /// activations of the int8 path between calls.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        y: &mut [f32],
        qrows: &mut QuantizedRows,
    ) {
        let y = &mut y[..rows * self.out];
        match residual {
            Some(res) => {
                for (yr, rr) in y.chunks_exact_mut(self.out).zip(res.chunks_exact(self.out)) {
                    for ((o, b), r) in yr.iter_mut().zip(&self.bias).zip(rr) {
                        *o = b + r;
                    }
                }
            }
            None => {
                for yr in y.chunks_exact_mut(self.out) {
                    yr.copy_from_slice(&self.bias);
                }
            }
        }
        if rows == 0 {
            return;
        }
        let threads = rayon::current_num_threads();
        let wt = match &self.weights {
            Weights::Int8(q) => return q.matmul_acc(x, rows, y, threads, qrows),
            Weights::Packed(p) => return p.matmul_acc(x, rows, y, threads),
            Weights::Plain(wt) => wt,
        };
        let par = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: every matrix is row-major and contiguous with the dimensions given; `y`
        // holds rows * out, `x` rows * inp, `wt` inp * out elements.
        unsafe {
            matmul(
                (rows, self.out, self.inp),
                y.as_mut_ptr(),
                self.out,
                true,
                View::rows(x.as_ptr(), self.inp),
                View::rows(wt.as_ptr(), self.out),
                par,
            );
        }
    }
}

/// Layer-norm parameters.
#[derive(Debug, Clone)]
pub(super) struct FusedNorm {
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) eps: f32,
}

impl FusedNorm {
    /// Normalises each row of the row-major `x` in place, rows spread over the pool.
    fn forward(&self, x: &mut [f32]) {
        rows_in_parallel(x, self.gamma.len(), |rows| {
            kernels::layer_norm_rows(rows, &self.gamma, &self.beta, self.eps)
        });
    }
}

/// The non-linearity between the two feed-forward products.
#[derive(Debug, Clone, Copy)]
pub(super) enum FusedActivation {
    GeluErf,
    GeluTanh,
    Relu,
}

/// One transformer layer with its weights in plain buffers.
#[derive(Debug, Clone)]
pub(super) struct FusedLayer {
    pub(super) qkv: FusedLinear,
    pub(super) attn_out: FusedLinear,
    pub(super) attn_norm: FusedNorm,
    pub(super) ffn_in: FusedLinear,
    pub(super) ffn_out: FusedLinear,
    pub(super) out_norm: FusedNorm,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    pub(super) act: FusedActivation,
}

/// A relative position bias (MPNet's): a learned value per (bucket of `key - query`, head),
/// added to the attention scores of every layer.
#[derive(Debug, Clone)]
pub(crate) struct PositionBias {
    /// `[buckets, heads]`, row-major.
    table: Vec<f32>,
    heads: usize,
    buckets: usize,
    max_distance: usize,
}

impl PositionBias {
    /// From the `[buckets, heads]` table of `relative_attention_bias`.
    pub(crate) fn new(table: Vec<f32>, heads: usize, buckets: usize, max_distance: usize) -> Self {
        Self {
            table,
            heads,
            buckets,
            max_distance,
        }
    }

    /// The bucket of a key `rel` positions after its query ([`relative_bucket`]).
    fn bucket(&self, rel: i64) -> usize {
        relative_bucket(rel, self.buckets, self.max_distance)
    }

    /// For sequences up to `len` long: per head, the `2 len - 1` biases of `key - query` from
    /// `-(len - 1)` to `len - 1`, so that a query row's biases are one contiguous slice.
    fn expand(&self, len: usize) -> Vec<f32> {
        let width = 2 * len.max(1) - 1;
        let mut out = vec![0f32; self.heads * width];
        for k in 0..width {
            let b = self.bucket(k as i64 - (len as i64 - 1));
            for hd in 0..self.heads {
                out[hd * width + k] = self.table[b * self.heads + hd];
            }
        }
        out
    }
}

/// The bucket of a key `rel` positions after its query (before it when negative), as
/// transformers' `MPNetAttention.relative_position_bucket` computes it, in f32 as there: half
/// the `buckets` for each direction, exact below a quarter, then logarithmic up to
/// `max_distance`.
pub(crate) fn relative_bucket(rel: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let n = -rel;
    let base = if n < 0 { half } else { 0 };
    let n = n.unsigned_abs() as usize;
    let exact = half / 2;
    if n < exact {
        return base + n;
    }
    let log_ratio =
        (n as f32 / exact as f32).ln() / ((max_distance as f64 / exact as f64).ln() as f32);
    let large = exact + (log_ratio * (half - exact) as f32) as usize;
    base + large.min(half - 1)
}

/// [`PositionBias::expand`]ed for a forward pass: its longest sequence and the values.
struct ExpandedBias {
    len: usize,
    values: Vec<f32>,
}

impl ExpandedBias {
    /// Adds head `hd`'s bias to the `len x len` scores of one sequence.
    fn add(&self, scores: &mut [f32], len: usize, hd: usize) {
        let width = 2 * self.len - 1;
        let head = &self.values[hd * width..(hd + 1) * width];
        for (i, row) in scores.chunks_exact_mut(len).enumerate() {
            // key j of query i reads key - query = j - i, at (j - i) + (self.len - 1).
            let start = self.len - 1 - i;
            for (v, b) in row.iter_mut().zip(&head[start..start + len]) {
                *v += b;
            }
        }
    }
}

/// The softmax's exponentials of one head's `len x len` scores, after the head's relative
/// position bias where the model has one; the rows' 1/sums go to `inv_sums`.
fn exp_scores(
    scores: &mut [f32],
    len: usize,
    hd: usize,
    position: Option<&ExpandedBias>,
    inv_sums: &mut [f32],
) {
    if let Some(p) = position {
        p.add(scores, len, hd);
    }
    kernels::exp_rows(scores, len, inv_sums);
}

/// Where fused passes spend their time, by phase of a layer, summed over every layer run
/// while profiling is on (`TIDINGS_PROFILE` set; `tidings bench` prints it). Off, a layer
/// reads no clock.
pub mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    /// The phases of a layer, in the order they run.
    pub const PHASES: [&str; 8] = [
        "QKV product",
        "attention (scores, softmax, context)",
        "attention output product",
        "layer norm 1",
        "feed-forward in product",
        "GELU",
        "feed-forward out product",
        "layer norm 2",
    ];
    static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

    /// Whether profiling is on (read once).
    pub fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(crate::model::choices::profile)
    }

    /// Seconds per phase since the last call, and resets them.
    pub fn take() -> [f64; 8] {
        std::array::from_fn(|i| NANOS[i].swap(0, Ordering::Relaxed) as f64 * 1e-9)
    }

    /// Marks phase ends within one layer run.
    pub(super) struct Clock(Option<Instant>);

    impl Clock {
        pub(super) fn start() -> Self {
            Self(enabled().then(Instant::now))
        }

        /// Ends phase `i` (started at the previous mark).
        pub(super) fn mark(&mut self, i: usize) {
            if let Some(t) = &mut self.0 {
                let now = Instant::now();
                NANOS[i].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
                *t = now;
            }
        }
    }
}

/// Buffers of one forward pass, sized for its token count and reused by every layer.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    mid: Vec<f32>,
    ffn: Vec<f32>,
    out: Vec<f32>,
    qrows: QuantizedRows,
}

/// Rows per parallel task of the element-wise kernels.
const ROWS_PER_TASK: usize = 16;

fn rows_in_parallel(x: &mut [f32], cols: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    x.par_chunks_mut(cols * ROWS_PER_TASK).for_each(f);
}

impl FusedLayer {
    /// Runs the layer over the packed hidden states `x: [n, h]` of sequences `segments`
    /// (`(first row, length)`, covering `0..n`), with a relative position bias where the
    /// model has one; the result replaces `x`.
    fn forward(
        &self,
        x: &mut Vec<f32>,
        segments: &[(usize, usize)],
        position: Option<&ExpandedBias>,
        scratch: &mut Scratch,
    ) {
        let h = self.attn_out.out;
        let n = x.len() / h;
        let three_h = self.qkv.out;
        let d = self.head_dim;
        scratch.qkv.resize(n * three_h, 0.0);
        scratch.ctx.resize(n * h, 0.0);
        scratch.mid.resize(n * h, 0.0);
        scratch.ffn.resize(n * self.ffn_in.out, 0.0);
        scratch.out.resize(n * h, 0.0);
        let mut clock = profile::Clock::start();

        self.qkv
            .forward(x, n, None, &mut scratch.qkv, &mut scratch.qrows);
        clock.mark(0);

        // Attention, one task per (sequence, head).
        let qkv = &scratch.qkv;
        let ctx = SharedMut(scratch.ctx.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = segments
            .iter()
            .flat_map(|&(start, len)| (0..self.heads).map(move |hd| (start, len, hd)))
            .collect();
        let packed_attention = super::sgemm::available();
        tasks.par_iter().for_each_init(
            || (Vec::new(), Vec::new(), PackedWeights::empty()),
            |(scores, inv_sums, packed): &mut (Vec<f32>, Vec<f32>, PackedWeights),
             &(start, len, hd)| {
                if len == 0 {
                    return;
                }
                scores.resize(len * len, 0.0);
                inv_sums.resize(len, 0.0);
                let q = qkv[start * three_h + hd * d..].as_ptr();
                let k = qkv[start * three_h + h + hd * d..].as_ptr();
                let v = qkv[start * three_h + 2 * h + hd * d..].as_ptr();
                // SAFETY: q, k, v address `len` rows of `d` columns with row stride 3h
                // inside `qkv`; scores is len x len; this task alone writes the ctx block
                // rows start..start+len, columns hd*d..(hd+1)*d.
                unsafe {
                    let dst = ctx.ptr().add(start * h + hd * d);
                    if packed_attention {
                        // K^T and V packed for the microkernel (len x d each, against
                        // len x len x d multiply-adds per product).
                        packed.repack(k, d, len, 1, three_h);
                        packed.matmul_into(q, three_h, len, scores.as_mut_ptr(), len);
                        exp_scores(scores, len, hd, position, inv_sums);
                        packed.repack(v, len, d, three_h, 1);
                        packed.matmul_into(scores.as_ptr(), len, len, dst, h);
                    } else {
                        // scores = Q K^T (Q is pre-scaled by 1/sqrt(d)); K^T is K read with
                        // rows and columns swapped.
                        let k_t = View {
                            ptr: k,
                            row_stride: 1,
                            col_stride: three_h as isize,
                        };
                        let seq = (len, len, d);
                        let one = Parallelism::None;
                        let q = View::rows(q, three_h);
                        matmul(seq, scores.as_mut_ptr(), len, false, q, k_t, one);
                        exp_scores(scores, len, hd, position, inv_sums);
                        let p = View::rows(scores.as_ptr(), len);
                        let v = View::rows(v, three_h);
                        matmul((len, d, len), dst, h, false, p, v, one);
                    }
                    // The softmax's division, on the d-wide output rows.
                    kernels::scale_rows(dst, h, len, d, inv_sums);
                }
            },
        );

        clock.mark(1);

        // Output projection + residual, then layer norm.
        self.attn_out.forward(
            &scratch.ctx,
            n,
            Some(x),
            &mut scratch.mid,
            &mut scratch.qrows,
        );
        clock.mark(2);
        self.attn_norm.forward(&mut scratch.mid);
        clock.mark(3);

        // Feed-forward + residual, then layer norm.
        self.ffn_in
            .forward(&scratch.mid, n, None, &mut scratch.ffn, &mut scratch.qrows);
        clock.mark(4);
        let act = self.act;
        rows_in_parallel(&mut scratch.ffn, self.ffn_in.out, |rows| match act {
            FusedActivation::GeluErf => kernels::gelu_erf(rows),
            FusedActivation::GeluTanh => kernels::gelu_tanh(rows),
            FusedActivation::Relu => kernels::relu(rows),
        });
        clock.mark(5);
        self.ffn_out.forward(
            &scratch.ffn,
            n,
            Some(&scratch.mid),
            &mut scratch.out,
            &mut scratch.qrows,
        );
        clock.mark(6);
        self.out_norm.forward(&mut scratch.out);
        clock.mark(7);
        std::mem::swap(x, &mut scratch.out);
    }
}

impl FusedLayer {
    /// Whether all four of the layer's products run in int8.
    pub(super) fn is_int8(&self) -> bool {
        [&self.qkv, &self.attn_out, &self.ffn_in, &self.ffn_out]
            .iter()
            .all(|l| l.is_int8())
    }
}

/// Runs `layers` over padded hidden states `[b, s, h]` with the `[b, s]` attention mask:
/// packs the attended tokens, runs the layers unpadded, and puts the results back in the
/// padded layout (zeros at padding). `position`: a relative position bias for every layer.
/// Sequences are taken to be right-padded (their tokens first), as Tidings builds them.
pub(super) fn forward(
    layers: &[FusedLayer],
    hidden: &Tensor,
    mask: &Tensor,
    position: Option<&PositionBias>,
) -> Result<Tensor> {
    let (b, s, h) = hidden.dims3()?;
    let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
    let mask = mask
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut kept = Vec::with_capacity(b * s);
    let mut segments = Vec::with_capacity(b);
    for row in 0..b {
        let start = kept.len();
        kept.extend((row * s..(row + 1) * s).filter(|&p| mask[p] != 0.0));
        segments.push((start, kept.len() - start));
    }
    let mut x = Vec::with_capacity(kept.len() * h);
    for &p in &kept {
        x.extend_from_slice(&flat[p * h..(p + 1) * h]);
    }
    drop(flat);
    let longest = segments.iter().map(|&(_, len)| len).max().unwrap_or(0);
    let position = position.map(|p| ExpandedBias {
        len: longest.max(1),
        values: p.expand(longest),
    });
    let mut scratch = Scratch::default();
    for layer in layers {
        layer.forward(&mut x, &segments, position.as_ref(), &mut scratch);
    }
    let mut out = vec![0f32; b * s * h];
    for (i, &p) in kept.iter().enumerate() {
        out[p * h..(p + 1) * h].copy_from_slice(&x[i * h..(i + 1) * h]);
    }
    Tensor::from_vec(out, (b, s, h), hidden.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `MPNetEncoder.relative_position_bucket` (transformers 5.24, 32 buckets, distance
    /// 128) changes bucket over relative positions -600..=600: (first position, bucket).
    const TORCH_BUCKETS: &[(i64, usize)] = &[
        (-600, 15),
        (-90, 14),
        (-63, 13),
        (-45, 12),
        (-31, 11),
        (-22, 10),
        (-15, 9),
        (-11, 8),
        (-7, 7),
        (-6, 6),
        (-5, 5),
        (-4, 4),
        (-3, 3),
        (-2, 2),
        (-1, 1),
        (0, 0),
        (1, 17),
        (2, 18),
        (3, 19),
        (4, 20),
        (5, 21),
        (6, 22),
        (7, 23),
        (8, 24),
        (12, 25),
        (16, 26),
        (23, 27),
        (32, 28),
        (46, 29),
        (64, 30),
        (91, 31),
    ];

    #[test]
    fn relative_buckets_match_transformers() {
        let bias = PositionBias::new(vec![0.0; 32], 1, 32, 128);
        for rel in -600..=600i64 {
            let want = TORCH_BUCKETS
                .iter()
                .rev()
                .find(|&&(from, _)| from <= rel)
                .map(|&(_, b)| b)
                .unwrap();
            assert_eq!(bias.bucket(rel), want, "relative position {rel}");
        }
    }

    #[test]
    fn expanded_bias_reads_key_minus_query() {
        // Two heads; bucket b's value is 10 b + head.
        let table: Vec<f32> = (0..32)
            .flat_map(|b| (0..2).map(move |h| (10 * b + h) as f32))
            .collect();
        let bias = PositionBias::new(table, 2, 32, 128);
        let longest = 5;
        let expanded = ExpandedBias {
            len: longest,
            values: bias.expand(longest),
        };
        let len = 3;
        for hd in 0..2 {
            let mut scores = vec![0f32; len * len];
            expanded.add(&mut scores, len, hd);
            for i in 0..len {
                for j in 0..len {
                    let b = bias.bucket(j as i64 - i as i64);
                    assert_eq!(scores[i * len + j], (10 * b + hd) as f32);
                }
            }
        }
    }
}
