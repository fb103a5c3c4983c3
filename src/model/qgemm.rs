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
//! ([`QuantizedWeights::quantize`] returns `None` elsewhere, and the caller keeps f32). Where
//! the CPU has VNNI (AVX512-VNNI with AVX512VL: Intel since Cascade Lake, AMD since Zen 4; or
//! AVX-VNNI: Intel since Alder Lake), the tile makes the same sums with `vpdpbusd`, one
//! instruction in place of `vpmaddubsw`, `vpmaddwd` and `vpaddd` (on the same 256-bit lanes
//! and panel layout, so the integer sums, and the results, are identical bit for bit). With
//! AVX-512 the tile is 8 rows by one 512-bit line per step (the same sums again). On the GPU
//! machine's Xeon (AVX-512, VNNI, 2 threads), `cargo bench --bench kernels` ran, in one run,
//! the AVX2 tile at 175-300 GOP/s, the 256-bit VNNI tile at 243-392 and the 512-bit one at
//! 391-602 (on another instance of that machine: 186-304, 311-426 and 543-744).
//!
//! Where the CPU has AMX-INT8 (Intel since Sapphire Rapids) and Linux grants the process its
//! tile registers, blocks of 32 rows x 32 columns run on AMX's `tdpbusd`: the panels are
//! already in the layout its right-hand tiles want (16 lines of 16 columns x 4 `k`), the
//! quantized rows load as they are, and the integer sums are once more the same. On the GPU
//! machine's Xeon (2 threads) AMX ran the encoder's products at 576-1,436 GOP/s where the
//! 512-bit VNNI tile ran at 453-671 in the same run, and `tidings bench --precision int8`
//! 1.16-1.51x faster. `TIDINGS_QGEMM` names a kernel to use instead ([`kernel`]).

use super::sgemm::{choose_kernel, over_column_groups, panel_blocks, SharedMut};
use multiversion::multiversion;
use rayon::prelude::*;

/// Columns per panel (two `ymm` registers of eight 32-bit sums).
const NR: usize = 16;
/// Rows per tile: 8 accumulators, 2 weight registers, a broadcast and temporaries fit the 16
/// `ymm` registers.
const MR: usize = 4;
/// Rows per tile of the 512-bit kernel: one accumulator per row, 8 sums in flight to cover
/// `vpdpbusd`'s latency.
const MR_ZMM: usize = 8;
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
        let kernel = kernel().expect("QuantizedWeights exist only where a kernel runs");
        self.matmul_acc_on(kernel, a, m, c, threads, rows);
    }

    /// [`QuantizedWeights::matmul_acc`] on `kernel`, which this CPU must run.
    fn matmul_acc_on(
        &self,
        kernel: Kernel,
        a: &[f32],
        m: usize,
        c: &mut [f32],
        threads: usize,
        rows: &mut QuantizedRows,
    ) {
        assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
        let (k, n) = (self.k, self.n);
        let holds = |len: usize, cols: usize| m.checked_mul(cols).is_some_and(|x| len >= x);
        assert!(holds(a.len(), k) && holds(c.len(), n), "buffers too small");
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        let kp = k.div_ceil(4) * 4;
        let kernel = kernel.for_depth(kp);
        rows.quantize(&a[..m * k], m, k, kp, threads);
        let granule = if kernel == Kernel::Amx {
            // AMX reads whole blocks of rows: the padding rows are zeros (128), and their
            // sums never reach `c`.
            rows.values.resize(m.next_multiple_of(amx::ROWS) * kp, 128);
            2
        } else {
            1
        };
        let out = SharedMut(c.as_mut_ptr());
        let rows = &*rows;
        over_column_groups(n.div_ceil(NR), threads, granule, |panels| {
            // SAFETY: the CPU runs `kernel` (asserted above); `panels` are this task's own
            // output columns; `rows` holds m x kp bytes (for AMX, whole blocks of rows, and
            // a depth of whole tiles: `for_depth`) and m scales, `c` m x n floats (asserted
            // above).
            unsafe { self.run_panels(kernel, rows, m, out, panels) };
        });
    }

    /// # Safety
    /// The CPU runs `kernel`; `rows` holds `m` quantized rows of this matrix's padded depth
    /// (AMX: rounded up to whole blocks of [`amx::ROWS`]); `c` `m x n` floats; no other thread
    /// writes the columns of `panels`.
    unsafe fn run_panels(
        &self,
        kernel: Kernel,
        rows: &QuantizedRows,
        m: usize,
        c: SharedMut,
        panels: std::ops::Range<usize>,
    ) {
        if kernel == Kernel::Amx {
            return self.run_panels_amx(rows, m, c, panels);
        }
        let groups = self.k.div_ceil(4);
        // Panels in blocks that stay in L2 while every row tile passes over them; a tile's
        // quantized rows stay in L1 while it walks the block's panels, and its output rows
        // are written left to right.
        let (mr, tile) = (kernel.rows(), kernel.tile());
        for block in panel_blocks(panels, groups * LINE, 1) {
            let mut r = 0;
            while r < m {
                let tile_rows = mr.min(m - r);
                for p in block.clone() {
                    tile(tile_rows, self.tile_at(rows, c, r, p));
                }
                r += tile_rows;
            }
        }
    }

    /// [`QuantizedWeights::run_panels`] on AMX: blocks of [`amx::ROWS`] rows x two panels
    /// (one where a block of panels has an odd count), in the same order as the other tiles.
    ///
    /// # Safety
    /// As [`QuantizedWeights::run_panels`], and AMX runs here; `rows` holds whole blocks of
    /// [`amx::ROWS`] rows, of a depth of whole [`amx::DEPTH`]-byte tiles.
    unsafe fn run_panels_amx(
        &self,
        rows: &QuantizedRows,
        m: usize,
        c: SharedMut,
        panels: std::ops::Range<usize>,
    ) {
        let groups = self.k.div_ceil(4);
        // A partial tile of depth would be dropped, and no depth loops forever: `for_depth`
        // sends such products to the VNNI tile.
        assert!(
            groups > 0 && groups.is_multiple_of(16),
            "AMX needs whole tiles of depth"
        );
        amx::configure();
        for block in panel_blocks(panels, groups * LINE, 2) {
            for r in (0..m).step_by(amx::ROWS) {
                for p in block.clone().step_by(2) {
                    let second = (p + 1 < block.end).then(|| self.tile_at(rows, c, r, p + 1));
                    amx::block((m - r).min(amx::ROWS), self.tile_at(rows, c, r, p), second);
                }
            }
        }
        amx::release();
    }

    /// The [`Tile`] of quantized rows from `r` and panel `p`, writing into `c`.
    ///
    /// # Safety
    /// `rows` holds the rows from `r` of this matrix's padded depth; `c` is `m x n`, `r < m`.
    unsafe fn tile_at(&self, rows: &QuantizedRows, c: SharedMut, r: usize, p: usize) -> Tile {
        let (groups, n) = (self.k.div_ceil(4), self.n);
        Tile {
            groups,
            a: rows.values.as_ptr().add(r * groups * 4),
            lda: groups * 4,
            sa: rows.scales.as_ptr().add(r),
            b: self.lines.as_ptr().add(p * groups) as *const i8,
            sb: self.scales.as_ptr().add(p * NR),
            cs: self.colsums.as_ptr().add(p * NR),
            c: c.ptr().add(r * n + p * NR),
            ldc: n,
            cols: (n - p * NR).min(NR),
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

/// The instructions of an int8 tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `vpmaddubsw`, `vpmaddwd`, `vpaddd` (AVX2).
    Avx2,
    /// `vpdpbusd` on 256-bit lanes, VEX-encoded (AVX-VNNI).
    AvxVnni,
    /// `vpdpbusd` on 256-bit lanes, EVEX-encoded (AVX512-VNNI with AVX512VL).
    Avx512Vnni,
    /// `vpdpbusd` on 512-bit registers, a panel line each, in tiles of [`MR_ZMM`] rows
    /// (AVX512-VNNI).
    Avx512VnniZmm,
    /// AMX's `tdpbusd` on 16 x 64-byte tiles, 32 rows x two panels per block (Intel since
    /// Sapphire Rapids; Linux must grant the process the tile registers). Products whose
    /// depth is not a whole number of 64-byte tiles run on [`Kernel::Avx512VnniZmm`].
    Amx,
}

impl Kernel {
    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx2")
                && match self {
                    Self::Avx2 => true,
                    Self::AvxVnni => has!("avxvnni"),
                    Self::Avx512Vnni => has!("avx512vnni") && has!("avx512vl"),
                    Self::Avx512VnniZmm => has!("avx512f") && has!("avx512vnni"),
                    Self::Amx => has!("avx512f") && has!("avx512vnni") && amx::usable(),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// Every kernel, the fastest first.
    pub const ALL: [Self; 5] = [
        Self::Amx,
        Self::Avx512VnniZmm,
        Self::Avx512Vnni,
        Self::AvxVnni,
        Self::Avx2,
    ];

    /// The name `TIDINGS_QGEMM` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::AvxVnni => "avxvnni",
            Self::Avx512Vnni => "avx512vnni-ymm",
            Self::Avx512VnniZmm => "avx512vnni",
            Self::Amx => "amx",
        }
    }

    /// Rows per tile of [`Kernel::tile`]. (AMX's blocks are [`amx::ROWS`] rows; its entry
    /// here is [`Kernel::Avx512VnniZmm`]'s, which [`Kernel::for_depth`] puts in its place
    /// before any tile runs.)
    fn rows(self) -> usize {
        match self {
            Self::Avx512VnniZmm | Self::Amx => MR_ZMM,
            _ => MR,
        }
    }

    /// The tile function: `tile(rows, t)` for up to [`Kernel::rows`] rows (safe to call
    /// where [`Kernel::runs_here`] holds and `t` is as [`Tile`] says). AMX's blocks run
    /// apart ([`QuantizedWeights::run_panels_amx`]); its entry, never reached, is the
    /// 512-bit tile that [`Kernel::for_depth`] gives the other depths to.
    fn tile(self) -> unsafe fn(usize, Tile) {
        match self {
            Self::Avx2 => avx2::tile,
            Self::AvxVnni => avx2::tile_avxvnni,
            Self::Avx512Vnni => avx2::tile_avx512vnni,
            Self::Avx512VnniZmm | Self::Amx => avx2::tile_zmm,
        }
    }

    /// The kernel that runs a product of `kp` (padded) bytes deep: AMX only on whole 64-byte
    /// tiles of depth, the 512-bit VNNI tile otherwise (the same sums).
    fn for_depth(self, kp: usize) -> Self {
        if self == Self::Amx && !kp.is_multiple_of(amx::DEPTH) {
            Self::Avx512VnniZmm
        } else {
            self
        }
    }
}

/// The int8 kernel: the one `TIDINGS_QGEMM` names (`avx2`, `avxvnni`, `avx512vnni-ymm`,
/// `avx512vnni`, `amx`) where this CPU runs it, else the fastest it runs; `None` without
/// AVX2.
/// Decided once.
pub fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        choose_kernel(
            "TIDINGS_QGEMM",
            "int8",
            "",
            &Kernel::ALL,
            Kernel::runs_here,
            Kernel::name,
            true,
        )
    })
}

/// Whether an int8 kernel runs here.
pub fn available() -> bool {
    kernel().is_some()
}

/// One tile's operands: `a` addresses the tile's rows of `4 * groups` quantized bytes with
/// stride `lda` and `sa` their scales; `b` a panel's `groups` 64-byte lines (aligned), `sb` its
/// 16 scales and `cs` its 16 column sums; `c` the tile's output rows, `cols` floats each with
/// stride `ldc`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, LINE, MR};
    use crate::model::sgemm::avx2::add_to_row;
    use std::arch::x86_64::*;

    /// A tile function and its `M`-row body, on the CPU features `$features`, whose
    /// `$step` adds one 4-byte group's products `$ai` (a row's four activations in every
    /// 32-bit lane) by `$b` (four weights of each of 8 columns) to the 32-bit sums `$acc`.
    macro_rules! int8_tile {
        ($(#[$doc:meta])* $tile:ident, $tile_m:ident, $features:literal,
         |$acc:ident, $ai:ident, $b:ident| $step:expr) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU features named; `t` as [`Tile`] says, for `rows` rows.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $tile(rows: usize, t: Tile) {
                match rows {
                    4 => $tile_m::<4>(t),
                    3 => $tile_m::<3>(t),
                    2 => $tile_m::<2>(t),
                    1 => $tile_m::<1>(t),
                    _ => debug_assert_eq!(rows, 0, "tiles have at most {MR} rows"),
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $tile_m<const M: usize>(t: Tile) {
                let Tile { groups, a, lda, b, c, ldc, .. } = t;
                // The tile's output rows are read at the end; start fetching them now.
                for i in 0..M {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
                }
                let mut sums = [[_mm256_setzero_si256(); 2]; M];
                for g in 0..groups {
                    let b0 = _mm256_load_si256(b.add(g * LINE) as *const __m256i);
                    let b1 = _mm256_load_si256(b.add(g * LINE + 32) as *const __m256i);
                    for (i, sums) in sums.iter_mut().enumerate() {
                        let four = std::ptr::read_unaligned(a.add(i * lda + g * 4) as *const i32);
                        let $ai = _mm256_set1_epi32(four);
                        sums[0] = {
                            let ($acc, $b) = (sums[0], b0);
                            $step
                        };
                        sums[1] = {
                            let ($acc, $b) = (sums[1], b1);
                            $step
                        };
                    }
                }
                finish(&sums, t);
            }
        };
    }

    int8_tile!(
        /// `c[rows, cols] += sa[i] sb[j] (qa qb)[i, j]` for one tile of at most [`MR`] rows:
        /// AVX2's `vpmaddubsw` (pairs, 16 bits) and `vpmaddwd` (quads, 32 bits).
        tile, tile_m, "avx2",
        |acc, ai, b| _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ai, b), _mm256_set1_epi16(1)))
    );
    int8_tile!(
        /// [`tile`] with AVX-VNNI's `vpdpbusd` (quads straight into 32 bits).
        tile_avxvnni, tile_m_avxvnni, "avx2,avxvnni",
        |acc, ai, b| _mm256_dpbusd_avx_epi32(acc, ai, b)
    );
    int8_tile!(
        /// [`tile`] with AVX512-VNNI's `vpdpbusd` on 256-bit registers (AVX512VL).
        tile_avx512vnni, tile_m_avx512vnni, "avx2,avx512vnni,avx512vl",
        |acc, ai, b| _mm256_dpbusd_epi32(acc, ai, b)
    );

    /// [`tile`] on 512-bit registers for tiles of up to [`super::MR_ZMM`] rows: a panel line
    /// is one register, and AVX512-VNNI's `vpdpbusd` adds a row's four products of each of
    /// the 16 columns into its 32-bit sums.
    ///
    /// # Safety
    /// AVX512F and AVX512-VNNI; the pointers as for [`tile`], `b`'s lines 64-byte aligned.
    #[target_feature(enable = "avx2,avx512f,avx512vnni")]
    pub(super) unsafe fn tile_zmm(rows: usize, t: Tile) {
        match rows {
            8 => tile_m_zmm::<8>(t),
            7 => tile_m_zmm::<7>(t),
            6 => tile_m_zmm::<6>(t),
            5 => tile_m_zmm::<5>(t),
            4 => tile_m_zmm::<4>(t),
            3 => tile_m_zmm::<3>(t),
            2 => tile_m_zmm::<2>(t),
            1 => tile_m_zmm::<1>(t),
            _ => debug_assert_eq!(rows, 0, "tiles have at most {} rows", super::MR_ZMM),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vnni")]
    unsafe fn tile_m_zmm<const M: usize>(t: Tile) {
        let Tile {
            groups,
            a,
            lda,
            b,
            c,
            ldc,
            ..
        } = t;
        for i in 0..M {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        }
        let mut sums = [_mm512_setzero_si512(); M];
        for g in 0..groups {
            let line = _mm512_load_si512(b.add(g * LINE).cast());
            for (i, sum) in sums.iter_mut().enumerate() {
                let four = std::ptr::read_unaligned(a.add(i * lda + g * 4) as *const i32);
                *sum = _mm512_dpbusd_epi32(*sum, _mm512_set1_epi32(four), line);
            }
        }
        // Columns 0-7 are the low half of each sum, 8-15 the high half, as in [`tile`].
        let mut halves = [[_mm256_setzero_si256(); 2]; M];
        for (h, s) in halves.iter_mut().zip(&sums) {
            *h = [
                _mm512_castsi512_si256(*s),
                _mm512_extracti64x4_epi64::<1>(*s),
            ];
        }
        finish(&halves, t);
    }

    /// Scales a tile's integer sums into `c`: `c[i, j] += sa[i] sb[j] (sums[i][j] - 128 cs[j])`.
    ///
    /// # Safety
    /// AVX2; `t` as [`Tile`] says, for `sums.len()` rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn finish(sums: &[[__m256i; 2]], t: Tile) {
        let Tile {
            sa,
            sb,
            cs,
            c,
            ldc,
            cols,
            ..
        } = t;
        let s0 = _mm256_loadu_ps(sb);
        let s1 = _mm256_loadu_ps(sb.add(8));
        // 128 x the column sums: the activations' offset, taken back out.
        let o0 = _mm256_slli_epi32::<7>(_mm256_loadu_si256(cs as *const __m256i));
        let o1 = _mm256_slli_epi32::<7>(_mm256_loadu_si256(cs.add(8) as *const __m256i));
        for (i, acc) in sums.iter().enumerate() {
            let si = _mm256_set1_ps(*sa.add(i));
            let d0 = _mm256_sub_epi32(acc[0], o0);
            let d1 = _mm256_sub_epi32(acc[1], o1);
            let v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, si));
            let v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, si));
            add_to_row(c.add(i * ldc), v0, v1, cols);
        }
    }
}

/// Intel AMX: tiles of 16 rows x 64 bytes in eight tile registers, and `tdpbusd`, which adds
/// a 16 x 64 tile of unsigned bytes times a 64 x 16 tile of signed bytes (16 rows of 16
/// columns x 4 consecutive `k`: exactly 16 lines of a panel) into 16 x 16 32-bit sums.
/// The sums are exact, as `vpdpbusd`'s are, so the results are the other kernels' bits.
/// Rust has no stable AMX intrinsics; the instructions are inline assembly, one statement
/// per product block, so that no tile's data lives across Rust code (the tile configuration
/// does: loaded before a task's blocks, released after them).
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{avx2::finish, Tile, LINE};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Rows per block: two tiles of [`TILE_ROWS`].
    pub(super) const ROWS: usize = 2 * TILE_ROWS;
    /// Rows of a tile.
    const TILE_ROWS: usize = 16;
    /// Bytes of depth per tile: 16 panel lines of 4 `k` each.
    pub(super) const DEPTH: usize = 64;

    /// The tile configuration (palette 1): tiles 0-7 all 16 rows x 64 bytes. 0-3 hold the
    /// sums (rows 0-15 and 16-31 of the block, by the first and second panel), 4-5 the
    /// activations, 6-7 the panels.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether the CPU has AMX-TILE and AMX-INT8 and the OS lets this process use the tile
    /// registers (Linux grants them on request, `arch_prctl(ARCH_REQ_XCOMP_PERM)`; asked
    /// once, for the whole process, before any tile is used).
    pub(super) fn usable() -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| {
            // Leaf 7 is read only where the CPU reports it. EDX bits 24 and 25: AMX-TILE and
            // AMX-INT8 (`is_x86_feature_detected!` has no stable name for them). The cpuid
            // functions are safe in recent Rust and unsafe in older releases (this crate's
            // minimum is 1.89).
            #[allow(unused_unsafe)]
            // SAFETY: `cpuid` exists on every x86-64 CPU.
            let has = unsafe {
                __get_cpuid_max(0).0 >= 7 && {
                    let edx = __cpuid_count(7, 0).edx;
                    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
                }
            };
            has && request_tiles()
        })
    }

    /// Asks Linux for the tile data state (XFEATURE_XTILEDATA, 18).
    #[cfg(target_os = "linux")]
    fn request_tiles() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; no memory is passed.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if granted != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "the CPU has AMX but Linux did not grant the tile registers"
            );
        }
        granted == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tiles() -> bool {
        false
    }

    /// Loads [`CONFIG`] on this thread (and zeroes its tiles).
    ///
    /// # Safety
    /// [`usable`] holds.
    pub(super) unsafe fn configure() {
        asm!(
            "ldtilecfg [{}]",
            in(reg) &CONFIG,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack, readonly),
        );
    }

    /// Returns this thread's tiles to their initial state (so that the OS need not save
    /// them).
    ///
    /// # Safety
    /// [`usable`] holds.
    pub(super) unsafe fn release() {
        asm!(
            "tilerelease",
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack, nomem),
        );
    }

    /// `c += ...` for a block of `rows` (at most [`ROWS`]) rows from `t.a` and the panels of
    /// `t` and `second`, in integers on the tiles, then scaled as the other kernels do.
    ///
    /// # Safety
    /// [`configure`] ran on this thread; `t` (and `second`) as [`Tile`] says, for `rows`
    /// rows, and `t.a` readable for [`ROWS`] rows; `t.groups` a positive multiple of 16.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block(rows: usize, t: Tile, second: Option<Tile>) {
        #[repr(C, align(64))]
        struct Sums([i32; 4 * TILE_ROWS * 16]);
        // Not zeroed: the assembly stores every tile that is read below.
        let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
        let depth_tiles = t.groups / 16;
        let (a0, a1) = (t.a, t.a.add(TILE_ROWS * t.lda));
        let out = sums.as_mut_ptr() as *mut i32;
        // A lone panel (the last of an odd count: only the classifier's few columns) runs as
        // a pair with itself; only its own sums are read back.
        let b1 = second.map_or(t.b, |u| u.b);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {line}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {line}*1]",
            "tdpbusd tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{out} + {line}*1], tmm0",
            "tilestored [{out} + {line}*1 + 1024], tmm1",
            "tilestored [{out} + {line}*1 + 2048], tmm2",
            "tilestored [{out} + {line}*1 + 3072], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) t.b => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) depth_tiles => _,
            lda = in(reg) t.lda,
            line = in(reg) LINE,
            out = in(reg) out,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
        // The second tile's rows (past the end of `sa` and `c` when it holds none: wrapping).
        let lower = |t: Tile| Tile {
            sa: t.sa.wrapping_add(TILE_ROWS),
            c: t.c.wrapping_add(TILE_ROWS * t.ldc),
            ..t
        };
        let upper_rows = rows.min(TILE_ROWS);
        let lower_rows = rows.saturating_sub(TILE_ROWS);
        // Stored tile `i` of the four.
        let stored = |i: usize| std::slice::from_raw_parts(out.add(i * 256), 256);
        scale(stored(0), upper_rows, t);
        scale(stored(2), lower_rows, lower(t));
        if let Some(u) = second {
            scale(stored(1), upper_rows, u);
            scale(stored(3), lower_rows, lower(u));
        }
    }

    /// Scales the first `rows` rows of a stored 16 x 16 tile of sums into `t`'s outputs.
    ///
    /// # Safety
    /// AVX2; `t` as [`Tile`] says, for `rows` rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scale(tile: &[i32], rows: usize, t: Tile) {
        let mut halves = [[_mm256_setzero_si256(); 2]; TILE_ROWS];
        for (h, row) in halves.iter_mut().zip(tile.chunks_exact(16)).take(rows) {
            *h = [
                _mm256_loadu_si256(row.as_ptr().cast()),
                _mm256_loadu_si256(row.as_ptr().add(8).cast()),
            ];
        }
        finish(&halves[..rows], t);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    //! Never used: AMX is x86-64's.
    pub(super) const ROWS: usize = 32;
    pub(super) const DEPTH: usize = 64;
    pub(super) fn usable() -> bool {
        false
    }
    pub(super) unsafe fn configure() {}
    pub(super) unsafe fn release() {}
    pub(super) unsafe fn block(_: usize, _: super::Tile, _: Option<super::Tile>) {
        unreachable!("AMX runs only on x86-64")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    /// Never called: no [`super::Kernel`] runs off x86-64.
    pub(super) unsafe fn tile(_: usize, _: super::Tile) {
        unreachable!("the int8 kernel runs only on x86-64")
    }
    pub(super) use tile as tile_avxvnni;
    pub(super) use tile as tile_avx512vnni;
    pub(super) use tile as tile_zmm;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sgemm::tests::values;

    /// The kernels this CPU runs, AVX2's first.
    fn kernels_here() -> impl Iterator<Item = Kernel> {
        Kernel::ALL.into_iter().rev().filter(|k| k.runs_here())
    }

    #[test]
    fn the_chosen_kernel_runs_here_and_is_the_fastest_one() {
        match kernel() {
            None => assert!(!Kernel::Avx2.runs_here()),
            Some(k) => {
                let named = std::env::var("TIDINGS_QGEMM").ok();
                let want = kernels_here()
                    .find(|k| named.as_deref() == Some(k.name()))
                    .or(kernels_here().last());
                assert_eq!(Some(k), want, "TIDINGS_QGEMM={named:?}");
            }
        }
    }

    #[test]
    fn integer_product_is_exact_for_the_quantized_values() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 17),
            (9, 384, 48),
            (13, 130, 33),
            (23, 65, 40),
            // Whole 64-byte tiles of depth (AMX where the CPU has it): blocks of 32 rows with a
            // partial last one, pairs of panels and a lone one, L2 blocks of panels.
            (40, 128, 80),
            (33, 1536, 400),
            // ... partly filled lower tiles (18 and 11 rows) and narrow last panels, alone
            // and second of a pair.
            (50, 128, 72),
            (27, 384, 40),
            (19, 64, 24),
        ] {
            let a = values(m * k, 4);
            let b = values(k * n, 5);
            let start = values(m * n, 6);
            let w = QuantizedWeights::quantize_always(&b, k, n);
            let mut first: Option<Vec<f32>> = None;
            for (kernel, threads) in kernels_here().flat_map(|kn| [(kn, 1), (kn, 2), (kn, 3)]) {
                let mut rows = QuantizedRows::default();
                let mut c = start.clone();
                w.matmul_acc_on(kernel, &a, m, &mut c, threads, &mut rows);
                // Every kernel makes the same integer sums and scales them alike.
                let first = first.get_or_insert_with(|| c.clone());
                assert!(
                    first
                        .iter()
                        .zip(&c)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?} {m}x{k}x{n} threads {threads}: not the AVX2 kernel's bits"
                );
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
                            "{kernel:?} {m}x{k}x{n} threads {threads} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn amx_runs_whole_tiles_of_depth_and_leaves_the_rest_to_vnni() {
        assert_eq!(Kernel::Amx.for_depth(384), Kernel::Amx);
        assert_eq!(Kernel::Amx.for_depth(1536), Kernel::Amx);
        assert_eq!(Kernel::Amx.for_depth(132), Kernel::Avx512VnniZmm);
        assert_eq!(Kernel::Avx2.for_depth(132), Kernel::Avx2);
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
