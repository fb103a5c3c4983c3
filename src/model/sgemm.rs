//! Single-precision products against a weight matrix packed once, at load, for
//! register-blocked FMA microkernels (AVX2, AVX-512).
//!
//! `gemm` (the crate candle uses) packs its right-hand side on every call and reached about
//! two thirds of the machine's best SGEMM on the encoder's shapes on an AVX2 CPU. Weights
//! never change while serving, so here they are laid out once, as the microkernels read
//! them: panels of [`NR`] columns, one 64-byte line per row of the panel. Each call then only
//! walks the activations, BLIS-style:
//! - with AVX2, a 6 x 16 tile of the output lives in twelve `ymm` accumulators while `k`
//!   runs; each step loads one line of the panel and broadcasts six activations (12 FMAs per
//!   8 loads). With AVX-512, a 12 x 32 tile (two panels) lives in 24 `zmm` accumulators; each
//!   step loads a line of both panels and broadcasts twelve activations (24 FMAs per 14
//!   loads), and the last panel's padding columns are masked off;
//! - `k` is cut in blocks of [`KC`], and the panels in blocks of at most [`B_BLOCK_BYTES`] so
//!   that they stay in L2 while every row tile of the activations walks them, left to
//!   right: the tile's rows stay in L1, and each output row is read and written in order
//!   (the rows are prefetched when the tile starts). On the encoder's 2048-row products
//!   (`cargo bench --bench kernels`) that was 10-15% faster than the BLIS order, where a
//!   block of rows sits in L2 and each panel passes down it, missing the cache on every
//!   output line, for the 384-deep ones, and within the noise (±5%) for the others;
//! - threads take disjoint groups of panels (output columns), so they never write the same
//!   output element.
//!
//! [`kernel`] picks the widest the CPU runs (`TIDINGS_SGEMM` names another, or `gemm`),
//! except on Intel CPUs with AVX-512, which keep `gemm`. On a 2-core AMD EPYC Zen 5
//! (AVX-512; `cargo bench --bench kernels`, 2 threads), the AVX-512 tile ran the encoder's
//! products at 435-483 GFLOP/s and the AVX2 tile at 204-222, where `gemm`'s own AVX-512
//! kernels reached 409-437 on the same shapes (a separate loop). On the GPU machine's Xeon
//! (Emerald Rapids) the AVX-512 tile ran at 204-310 GFLOP/s, and the encoder ran faster on
//! `gemm` at 16x64 and 8x256 (see [`kernel`]). CPUs without AVX2 and FMA, and other
//! architectures, keep `gemm`; see [`PackedWeights::pack`].

use rayon::prelude::*;

/// Columns per packed panel: two `ymm` registers, or one `zmm`.
pub const NR: usize = 16;
/// Rows per output tile of the AVX2 kernel.
const MR: usize = 6;
/// Rows per output tile of the AVX-512 kernel (two panels wide: 24 accumulators, two panel
/// lines and a broadcast of the 32 `zmm` registers).
const MR_ZMM: usize = 12;
/// Depth of a block of `k`: a panel's block is `KC` lines of 64 bytes, 24 KiB.
const KC: usize = 384;
/// At most this many bytes of packed panels (of one `k` block) are walked by one pass of the
/// row tiles, so that they stay in L2 (a Zen 3 core has 512 KiB, a Zen 5 one 1 MiB) while a
/// tile's rows stay in L1; MiniLM's widest product on two threads, 24 panels of 384 deep, is
/// 576 KiB: two blocks.
const B_BLOCK_BYTES: usize = 320 << 10;

/// One row of a packed panel: sixteen weights on one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; NR]);

/// A `[k, n]` row-major matrix (`W^T`) packed in panels of [`NR`] columns (the last one
/// padded with zeros), each panel `k` lines deep.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    lines: Vec<Line>,
    k: usize,
    n: usize,
}

impl PackedWeights {
    /// Packs `b: [k, n]` (row-major) when an f32 kernel runs here and is wanted ([`kernel`]:
    /// AVX2 and FMA, not an Intel CPU with AVX-512 unless `TIDINGS_SGEMM` names a tile),
    /// `None` otherwise; `TIDINGS_SGEMM=gemm` in the environment forces `None`.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        Some(Self::pack_always(b, k, n))
    }

    fn pack_always(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "matrix is not k x n");
        let mut packed = Self::empty();
        // SAFETY: `b` holds k x n floats, row-major.
        unsafe { packed.repack(b.as_ptr(), k, n, n, 1) };
        packed
    }

    /// A `0 x 0` matrix, to be filled by [`PackedWeights::repack`].
    pub(super) fn empty() -> Self {
        Self {
            lines: Vec::new(),
            k: 0,
            n: 0,
        }
    }

    /// Packs the `[k, n]` matrix whose element `(kk, j)` is at `base + kk * rs + j * cs`
    /// (any strides: a transpose is `rs = 1`), reusing this one's memory.
    ///
    /// # Safety
    /// Every such element must be readable.
    pub(super) unsafe fn repack(
        &mut self,
        base: *const f32,
        k: usize,
        n: usize,
        rs: usize,
        cs: usize,
    ) {
        let panels = n.div_ceil(NR);
        self.lines.clear();
        self.lines.resize(panels * k, Line::default());
        #[cfg(target_arch = "x86_64")]
        if rs == 1 && std::arch::is_x86_feature_detected!("avx") {
            // A transpose (attention's keys): eight by eight in registers.
            avx2::pack_transposed(&mut self.lines, base, k, n, cs);
            self.k = k;
            self.n = n;
            return;
        }
        for p in 0..panels {
            let cols = (n - p * NR).min(NR);
            for kk in 0..k {
                let line = &mut self.lines[p * k + kk].0;
                let row = base.add(kk * rs + p * NR * cs);
                if cs == 1 {
                    // Rows of contiguous columns (attention's values): a copy per line.
                    line[..cols].copy_from_slice(std::slice::from_raw_parts(row, cols));
                    continue;
                }
                for (j, v) in line.iter_mut().take(cols).enumerate() {
                    *v = *row.add(j * cs);
                }
            }
        }
        self.k = k;
        self.n = n;
    }

    /// `c[m, n] = a[m, k] B` on the calling thread, `a` with row stride `lda` and `c` with
    /// row stride `ldc` (columns contiguous in both).
    ///
    /// # Safety
    /// A kernel must run here ([`available`]); `a` must address `m` rows of `k` floats, `c`
    /// `m` rows of `n` writable floats that nothing else uses meanwhile.
    pub(super) unsafe fn matmul_into(
        &self,
        a: *const f32,
        lda: usize,
        m: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let kernel = kernel().expect("matmul_into runs only where a kernel does");
        for i in 0..m {
            std::ptr::write_bytes(c.add(i * ldc), 0, self.n);
        }
        self.run_panels(kernel, a, lda, m, SharedMut(c), ldc, 0..self.n.div_ceil(NR));
    }

    /// `c[m, n] += a[m, k] B`, with `a` and `c` row-major and contiguous, spread over
    /// `threads` rayon tasks (1: on the calling thread).
    pub fn matmul_acc(&self, a: &[f32], m: usize, c: &mut [f32], threads: usize) {
        let kernel = kernel().expect("PackedWeights exist only where a kernel runs");
        self.matmul_acc_on(kernel, a, m, c, threads);
    }

    /// [`PackedWeights::matmul_acc`] on `kernel`, which this CPU must run.
    fn matmul_acc_on(&self, kernel: Kernel, a: &[f32], m: usize, c: &mut [f32], threads: usize) {
        assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
        let (k, n) = (self.k, self.n);
        let holds = |len: usize, cols: usize| m.checked_mul(cols).is_some_and(|x| len >= x);
        assert!(holds(a.len(), k) && holds(c.len(), n), "buffers too small");
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        let out = SharedMut(c.as_mut_ptr());
        over_column_groups(n.div_ceil(NR), threads, kernel.panels(), |panels| {
            // SAFETY: the CPU runs `kernel` (asserted above); `panels` are this task's own
            // output columns, and every pointer stays inside `a`, `c` and `self.lines`
            // (asserted sizes above).
            unsafe { self.run_panels(kernel, a.as_ptr(), k, m, out, n, panels) };
        });
    }

    /// Runs output panels `panels` over every row: `c += a B` for those columns, `a` with
    /// row stride `lda`, `c` with row stride `ldc`.
    ///
    /// # Safety
    /// The CPU must run `kernel`; `a` must address `m` rows of `k` floats and `c` `m` rows
    /// of `n`; no other thread may touch the columns of `panels`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_panels(
        &self,
        kernel: Kernel,
        a: *const f32,
        lda: usize,
        m: usize,
        c: SharedMut,
        ldc: usize,
        panels: std::ops::Range<usize>,
    ) {
        let (k, n) = (self.k, self.n);
        let (mr, pr, tile) = (kernel.rows(), kernel.panels(), kernel.tile());
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let panel_bytes = kc * std::mem::size_of::<Line>();
            for block in panel_blocks(panels.clone(), panel_bytes, pr) {
                let mut r = 0;
                while r < m {
                    let rows = mr.min(m - r);
                    let mut p = block.start;
                    while p < block.end {
                        let count = pr.min(block.end - p);
                        let last = p + count - 1;
                        let t = Tile {
                            kc,
                            a: a.add(r * lda + k0),
                            lda,
                            b: self.lines.as_ptr().add(p * k + k0) as *const f32,
                            panel_stride: k * NR,
                            c: c.ptr().add(r * ldc + p * NR),
                            ldc,
                            cols: (n - last * NR).min(NR),
                        };
                        tile(rows, count, t);
                        p += count;
                    }
                    r += rows;
                }
            }
        }
    }
}

/// `panels` (each `panel_bytes`) cut into the fewest consecutive blocks of the same panel
/// count, a multiple of `granule` (the panels a tile spans; the last block may be shorter),
/// that keep each block within [`B_BLOCK_BYTES`] plus less than `granule` panels.
pub(super) fn panel_blocks(
    panels: std::ops::Range<usize>,
    panel_bytes: usize,
    granule: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let count = panels.len();
    let blocks = (count * panel_bytes).div_ceil(B_BLOCK_BYTES).max(1);
    let per_block = count
        .div_ceil(blocks)
        .max(1)
        .next_multiple_of(granule.max(1));
    panels
        .clone()
        .step_by(per_block)
        .map(move |p0| p0..(p0 + per_block).min(panels.end))
}

/// Runs `run` over `panels` output panels cut into at most `threads` contiguous groups of a
/// multiple of `granule` panels (the last may be shorter), one rayon task each (on the
/// calling thread when there is one group).
pub(super) fn over_column_groups(
    panels: usize,
    threads: usize,
    granule: usize,
    run: impl Fn(std::ops::Range<usize>) + Sync + Send,
) {
    let per_group = panels
        .div_ceil(threads.clamp(1, panels.max(1)))
        .next_multiple_of(granule.max(1));
    let groups = panels.div_ceil(per_group.max(1));
    let group = |g: usize| run(g * per_group..((g + 1) * per_group).min(panels));
    if groups <= 1 {
        group(0);
    } else {
        (0..groups).into_par_iter().for_each(group);
    }
}

/// A raw output pointer that rayon tasks may share; each task writes a disjoint region (the
/// column groups of a product, the (sequence rows x head columns) blocks of attention).
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: used only to write disjoint regions of one buffer, as above.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The instructions of an f32 tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// FMA on 256-bit registers (AVX2 and FMA): [`MR`] rows x one panel, twelve
    /// accumulators.
    Avx2,
    /// FMA on 512-bit registers (AVX-512F): [`MR_ZMM`] rows x two panels, twenty-four
    /// accumulators.
    Avx512,
}

impl Kernel {
    /// Every kernel, the fastest first.
    pub const ALL: [Self; 2] = [Self::Avx512, Self::Avx2];

    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx2")
                && has!("fma")
                && match self {
                    Self::Avx2 => true,
                    Self::Avx512 => has!("avx512f"),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The name `TIDINGS_SGEMM` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Rows per tile.
    fn rows(self) -> usize {
        match self {
            Self::Avx2 => MR,
            Self::Avx512 => MR_ZMM,
        }
    }

    /// Panels per tile.
    fn panels(self) -> usize {
        match self {
            Self::Avx2 => 1,
            Self::Avx512 => 2,
        }
    }

    /// The tile function: `tile(rows, panels, t)` for up to [`Kernel::rows`] rows and
    /// [`Kernel::panels`] panels (safe to call where [`Kernel::runs_here`] holds and `t` is
    /// as [`Tile`] says).
    fn tile(self) -> unsafe fn(usize, usize, Tile) {
        match self {
            Self::Avx2 => avx2::tile,
            Self::Avx512 => avx2::tile_zmm,
        }
    }
}

/// The f32 kernel (attention's products, and the weights' at f32): `None` where
/// `TIDINGS_SGEMM=gemm` (the products on `gemm`) or the CPU lacks AVX2 and FMA; the one
/// `TIDINGS_SGEMM` names (`avx2`, `avx512`) where this CPU runs it; else `None` on Intel CPUs
/// with AVX-512 (see [`gemm_is_faster_here`]); else the fastest it runs. Decided once.
pub fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        if super::choices::named("TIDINGS_SGEMM").is_some_and(|v| v == "gemm") {
            return None;
        }
        choose_kernel(
            "TIDINGS_SGEMM",
            "f32",
            "gemm",
            &Kernel::ALL,
            Kernel::runs_here,
            Kernel::name,
            !gemm_is_faster_here(),
        )
    })
}

/// Whether `gemm`'s own kernels beat the tiles here: on Intel CPUs with AVX-512 (the vendor
/// from `cpuid` leaf 0). On the GPU machine's Xeon (Emerald Rapids, 2 threads, three
/// instances), `tidings bench --precision f32` (ner) ran faster on `gemm` than on the
/// AVX-512 tile in all twelve interleaved pairs at 16x64 and 8x256 (by 2-83%, 18% at the
/// median), and within that machine's noise at 1x64 (the tile ahead in two pairs, behind in
/// two). On AMD's Zen 5 the tile was 3-6% faster at 16x64 and 8x256. `TIDINGS_SGEMM=avx512`
/// still picks the tile there.
fn gemm_is_faster_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0: the vendor, "GenuineIntel", in EBX, EDX, ECX. (`__cpuid` is a safe
        // function in recent Rust and an unsafe one in older releases, such as this crate's
        // minimum, 1.89.)
        #[allow(unused_unsafe)]
        // SAFETY: `cpuid` exists on every x86-64 CPU.
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let intel = [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e];
        intel && Kernel::Avx512.runs_here()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Of `all` (fastest first), the kernel the environment variable `var` names where this CPU
/// runs it, else the default: the fastest it runs where `fastest_by_default`, otherwise
/// `None` (the caller's own fallback, `also`; also `None` where no kernel runs). A name that
/// is unknown or does not run here gets a warning, which lists the names (and `also`, a value
/// the caller handles itself, when not empty). For `what` kernels (`f32`, `int8`).
pub(super) fn choose_kernel<K: Copy>(
    var: &str,
    what: &str,
    also: &'static str,
    all: &[K],
    runs_here: impl Fn(K) -> bool,
    name: impl Fn(K) -> &'static str,
    fastest_by_default: bool,
) -> Option<K> {
    let default = all
        .iter()
        .copied()
        .find(|&k| runs_here(k))
        .filter(|_| fastest_by_default);
    let Some(wanted) = super::choices::named(var) else {
        return default;
    };
    match all.iter().copied().find(|&k| name(k) == wanted) {
        Some(k) if runs_here(k) => Some(k),
        named => {
            let names = all.iter().map(|&k| name(k)).chain([also]);
            let names: Vec<_> = names.filter(|n| !n.is_empty()).collect();
            tracing::warn!(
                variable = var,
                value = %wanted,
                using = default.map(&name).unwrap_or(if also.is_empty() { "none" } else { also }),
                "{}; using this CPU's default",
                if named.is_some() {
                    format!("this CPU does not run that {what} kernel")
                } else {
                    format!("no such {what} kernel ({})", names.join(", "))
                }
            );
            default
        }
    }
}

/// Whether an f32 kernel runs here (and is wanted).
pub fn available() -> bool {
    kernel().is_some()
}

/// One tile's operands: `a` addresses the tile's rows of `kc` floats with stride `lda`; `b`
/// the first of its panels' blocks of `kc` 64-byte lines (aligned), the next one
/// `panel_stride` floats further; `c` the tile's output rows with stride `ldc`, of which the
/// tile writes whole panels but `cols` columns of the last.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    panel_stride: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{Tile, MR, MR_ZMM, NR};
    use std::arch::x86_64::*;

    /// `c[rows, cols] += a[rows, kc] b[kc, 16]` for one tile of at most [`MR`] rows and one
    /// panel.
    ///
    /// # Safety
    /// AVX2 and FMA; `t` as [`Tile`] says, `panels` 1.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(rows: usize, panels: usize, t: Tile) {
        debug_assert_eq!(panels, 1, "AVX2 tiles are one panel wide");
        match rows {
            6 => tile_m::<6>(t),
            5 => tile_m::<5>(t),
            4 => tile_m::<4>(t),
            3 => tile_m::<3>(t),
            2 => tile_m::<2>(t),
            1 => tile_m::<1>(t),
            _ => debug_assert_eq!(rows, 0, "tiles have at most {MR} rows"),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_m<const M: usize>(t: Tile) {
        let Tile {
            kc,
            a,
            lda,
            b,
            c,
            ldc,
            cols,
            ..
        } = t;
        // The tile's output rows are read at the end; start fetching them now.
        for i in 0..M {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for kk in 0..kc {
            let b0 = _mm256_load_ps(b.add(kk * NR));
            let b1 = _mm256_load_ps(b.add(kk * NR + 8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            add_to_row(c.add(i * ldc), acc[0], acc[1], cols);
        }
    }

    /// `c[rows, ..] += a[rows, kc] b[kc, panels x 16]` for one tile of at most [`MR_ZMM`]
    /// rows and two panels: a line of each panel and a broadcast per row and step of `k`,
    /// into `rows x panels` accumulators.
    ///
    /// # Safety
    /// AVX-512F; `t` as [`Tile`] says, `panels` 1 or 2.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_zmm(rows: usize, panels: usize, t: Tile) {
        macro_rules! rows {
            ($($m:literal)*) => {
                match (rows, panels) {
                    $(($m, 2) => tile_zmm_m::<$m, 2>(t), ($m, 1) => tile_zmm_m::<$m, 1>(t),)*
                    _ => debug_assert!(rows == 0, "{rows} x {panels}: not a tile"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_zmm_m<const M: usize, const P: usize>(t: Tile) {
        const { assert!(M <= MR_ZMM && P <= 2) };
        let Tile {
            kc,
            a,
            lda,
            b,
            panel_stride,
            c,
            ldc,
            cols,
        } = t;
        for i in 0..M {
            for p in 0..P {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + p * NR) as *const i8);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); P]; M];
        for kk in 0..kc {
            let mut line = [_mm512_setzero_ps(); P];
            for (p, line) in line.iter_mut().enumerate() {
                *line = _mm512_load_ps(b.add(p * panel_stride + kk * NR));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i * lda + kk));
                for (acc, line) in acc.iter_mut().zip(&line) {
                    *acc = _mm512_fmadd_ps(ai, *line, *acc);
                }
            }
        }
        // Only `cols` columns of the last panel are the output's (masked loads and stores
        // touch no others).
        let last: __mmask16 = if cols >= NR { !0 } else { (1 << cols) - 1 };
        for (i, acc) in acc.iter().enumerate() {
            for (p, v) in acc.iter().enumerate() {
                let mask = if p + 1 == P { last } else { !0 };
                let row = c.add(i * ldc + p * NR);
                let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, row), *v);
                _mm512_mask_storeu_ps(row, mask, sum);
            }
        }
    }

    /// Packs the `[k, n]` matrix whose element `(kk, j)` is at `base + j * cs + kk` (the
    /// transpose of `n` rows of `k` contiguous floats) into `lines` (`n.div_ceil(16) * k`
    /// lines, zeroed): eight rows by eight columns at a time through registers, the rest one
    /// by one.
    ///
    /// # Safety
    /// AVX; every such element must be readable.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn pack_transposed(
        lines: &mut [super::Line],
        base: *const f32,
        k: usize,
        n: usize,
        cs: usize,
    ) {
        let k8 = k - k % 8;
        for p in 0..n.div_ceil(NR) {
            let panel = &mut lines[p * k..(p + 1) * k];
            for half in [0, 8] {
                let j0 = p * NR + half;
                let rows = n.saturating_sub(j0).min(8);
                if rows == 0 {
                    break;
                }
                let src = |r: usize, kk: usize| base.add((j0 + r) * cs + kk);
                let mut kk = 0;
                if rows == 8 {
                    while kk < k8 {
                        let r: [__m256; 8] = std::array::from_fn(|r| _mm256_loadu_ps(src(r, kk)));
                        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                        let cols = [
                            _mm256_permute2f128_ps::<0x20>(u0, u4),
                            _mm256_permute2f128_ps::<0x20>(u1, u5),
                            _mm256_permute2f128_ps::<0x20>(u2, u6),
                            _mm256_permute2f128_ps::<0x20>(u3, u7),
                            _mm256_permute2f128_ps::<0x31>(u0, u4),
                            _mm256_permute2f128_ps::<0x31>(u1, u5),
                            _mm256_permute2f128_ps::<0x31>(u2, u6),
                            _mm256_permute2f128_ps::<0x31>(u3, u7),
                        ];
                        for (t, col) in cols.into_iter().enumerate() {
                            _mm256_storeu_ps(panel[kk + t].0.as_mut_ptr().add(half), col);
                        }
                        kk += 8;
                    }
                }
                for (kk, line) in panel.iter_mut().enumerate().skip(kk) {
                    for r in 0..rows {
                        line.0[half + r] = *src(r, kk);
                    }
                }
            }
        }
    }

    /// `c[..cols] += [v0, v1][..cols]` for one row of a 16-column tile (also the int8
    /// kernel's).
    ///
    /// # Safety
    /// AVX; `c` addresses `cols <= 16` writable floats.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::model) unsafe fn add_to_row(c: *mut f32, v0: __m256, v1: __m256, cols: usize) {
        if cols == NR {
            _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), v0));
            _mm256_storeu_ps(c.add(8), _mm256_add_ps(_mm256_loadu_ps(c.add(8)), v1));
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
            for (j, t) in tmp.iter().take(cols).enumerate() {
                *c.add(j) += t;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::Tile;

    /// Never called: no [`super::Kernel`] runs off x86-64.
    pub(super) unsafe fn tile(_: usize, _: usize, _: Tile) {
        unreachable!("the f32 tiles run only on x86-64")
    }
    pub(super) use tile as tile_zmm;
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn has_avx2_fma() -> bool {
        Kernel::Avx2.runs_here()
    }

    /// The kernels this CPU runs, the narrowest first.
    fn kernels_here() -> impl Iterator<Item = Kernel> {
        Kernel::ALL.into_iter().rev().filter(|k| k.runs_here())
    }

    /// Deterministic values in [-1, 1) (also the int8 kernel's tests').
    pub(in crate::model) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn strided_packing_and_product_into_strided_rows() {
        // a: 5 x 3 inside rows of 7; B = the transpose of an n x 3 block inside rows of 6;
        // c: 5 x n inside rows of n + 5, whose other columns must stay untouched (n = 20: a
        // whole panel and a partial one, which the AVX-512 tile runs as one masked tile).
        let (m, k) = (5, 3);
        for kernel in kernels_here() {
            for n in [4, 20] {
                let ldc = n + 5;
                let a = values(5 * 7, 11);
                let bt = values(n * 6, 12);
                let mut c = vec![7.0f32; m * ldc];
                let mut packed = PackedWeights::empty();
                unsafe {
                    packed.repack(bt.as_ptr(), k, n, 1, 6);
                    if Some(kernel) == super::kernel() {
                        // What attention calls, on the chosen kernel: it must overwrite the
                        // 7s where the product goes, and only there.
                        packed.matmul_into(a.as_ptr(), 7, m, c.as_mut_ptr(), ldc);
                    } else {
                        for i in 0..m {
                            c[i * ldc..i * ldc + n].fill(0.0);
                        }
                        let out = SharedMut(c.as_mut_ptr());
                        packed.run_panels(kernel, a.as_ptr(), 7, m, out, ldc, 0..n.div_ceil(NR));
                    }
                }
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j];
                        if j >= n {
                            assert_eq!(got, 7.0, "{kernel:?} n {n}");
                            continue;
                        }
                        let want: f32 = (0..k).map(|t| a[i * 7 + t] * bt[j * 6 + t]).sum();
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{kernel:?} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn panel_blocks_are_even_and_cover_the_range() {
        let blocks =
            |r: std::ops::Range<usize>, bytes| panel_blocks(r, bytes, 1).collect::<Vec<_>>();
        // Two-panel tiles: whole pairs per block (a 2048-wide product on one thread: 128
        // panels of 384 x 64 bytes, 10 blocks of 13 panels, or 10 of 14 in pairs).
        let pairs = panel_blocks(0..128, 384 * 64, 2).collect::<Vec<_>>();
        assert_eq!(pairs.len(), 10);
        assert!(pairs.iter().all(|b| b.len() == 14 || b.end == 128));
        assert_eq!(pairs.last(), Some(&(126..128)));
        // MiniLM's first feed-forward product on two threads: 24 panels of 384 x 64 bytes.
        assert_eq!(blocks(24..48, 384 * 64), [24..36, 36..48]);
        assert_eq!(
            blocks(0..12, 96 * 64),
            Vec::from_iter(std::iter::once(0..12))
        );
        assert_eq!(blocks(3..5, B_BLOCK_BYTES + 1), [3..4, 4..5]);
        assert_eq!(blocks(0..7, B_BLOCK_BYTES / 3), [0..3, 3..6, 6..7]);
        assert!(blocks(4..4, 64).is_empty());
    }

    #[test]
    fn transposed_packing_matches_the_strided_reads() {
        if !has_avx2_fma() {
            return;
        }
        // Rows of a transpose that fill whole 8 x 8 blocks, and ones that leave remainders
        // in both directions; the buffer is reused from a larger matrix, as attention does.
        let mut packed = PackedWeights::empty();
        for &(k, n) in &[(64, 256), (20, 37), (8, 8), (3, 5), (64, 17)] {
            let cs = k + 3;
            let src = values(n * cs, 5);
            unsafe { packed.repack(src.as_ptr(), k, n, 1, cs) };
            assert_eq!((packed.k, packed.n), (k, n));
            for p in 0..n.div_ceil(NR) {
                for kk in 0..k {
                    for j in 0..NR {
                        let col = p * NR + j;
                        let want = if col < n { src[col * cs + kk] } else { 0.0 };
                        assert_eq!(packed.lines[p * k + kk].0[j], want, "{k}x{n} ({kk},{col})");
                    }
                }
            }
        }
    }

    #[test]
    fn packed_product_matches_the_textbook_on_ragged_shapes() {
        // Rows, depth and columns that are not multiples of either kernel's tile, the k block
        // or the row block, and ones that are; every kernel this CPU runs.
        for kernel in kernels_here() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (7, 5, 17),
                (25, 40, 80),
                (64, 384, 96),
                (73, 400, 33),
                (150, 800, 48),
            ] {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let start = values(m * n, 3);
                let packed = PackedWeights::pack_always(&b, k, n);
                for threads in [1, 2, 3] {
                    let mut c = start.clone();
                    packed.matmul_acc_on(kernel, &a, m, &mut c, threads);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = start[i * n + j] as f64
                                + (0..k)
                                    .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                                    .sum::<f64>();
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (k as f64).sqrt(),
                                "{kernel:?} {m}x{k}x{n} threads {threads} at ({i},{j}): \
                                 {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        // Both tiles make each output's sum in the same order (one FMA per step of `k`, from
        // zero in each k block), so the kernels are interchangeable bit for bit.
        // 400 columns: 25 panels, in more than one L2 block at this depth, and an odd count.
        let (m, k, n) = (37, 800, 400);
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let packed = PackedWeights::pack_always(&b, k, n);
        for threads in [1, 2, 3] {
            let mut results = kernels_here().map(|kernel| {
                let mut c = values(m * n, 6);
                packed.matmul_acc_on(kernel, &a, m, &mut c, threads);
                (kernel, c)
            });
            if let Some((first, want)) = results.next() {
                for (kernel, got) in results {
                    assert!(
                        got == want,
                        "{kernel:?} differs from {first:?}, {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn the_chosen_kernel_runs_here_and_is_the_widest_one() {
        let named = std::env::var("TIDINGS_SGEMM").ok();
        let named_here = kernels_here().find(|k| named.as_deref() == Some(k.name()));
        // Unnamed (or named wrongly): the widest, except on Intel CPUs with AVX-512.
        let default = kernels_here().last().filter(|_| !gemm_is_faster_here());
        let want = match named.as_deref() {
            Some("gemm") => None,
            _ => named_here.or(default),
        };
        assert_eq!(kernel(), want, "TIDINGS_SGEMM={named:?}");
    }
}
