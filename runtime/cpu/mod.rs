//! wae-edge's own CPU inference path for the inference network. Candle's CPU conv2d re-lays out
//! the input (NCHW -> NHWC) and re-flattens the kernel on every call, which dominates small maps;
//! here activations stay NHWC end to end and kernels are laid out once at load for the kernel
//! chosen per conv: Winograd F(4x4,3x3) (F(2x2,3x3) on maps under 8) for stride-1 convs with
//! 16+ input channels (`winograd.rs`), a direct register-blocked SIMD kernel for few channels,
//! and otherwise a tiled im2col + one GEMM per tile through the `gemm` crate (candle's own GEMM).
//! Bias and ReLU are fused into each kernel's output pass, buffers come from a pool kept between
//! frames, and the first fully connected layer of each head has its columns permuted at load so
//! the NHWC flatten feeds it directly. Results match the candle path within f32 rounding (tests
//! compare).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

mod winograd;

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use crate::config::{ArchKind, ModelConfig};
use crate::model::StageTimes;
use crate::weights::{ModelFile, WeightsError};
use winograd::Winograd;

/// Values from which a memory-bound pass over a map (a max pool, the input's NCHW -> NHWC copy)
/// splits its rows over the cores.
const COPY_SPLIT_MIN: usize = 1 << 16;
/// Output pixels per im2col tile: keeps the patch buffer within L2 for typical widths.
const TILE_BYTES: usize = 256 * 1024;
/// Multiply-accumulates from which a one-tile GEMM conv splits its output channels over two
/// cores (measured: 4x4 128->256, 4.7 M, gains; 4x4 64->128, 1.2 M, loses to the hand-off).
const COLUMN_SPLIT_MIN: usize = 2 << 20;

/// A row-major or transposed view of a matrix in a slice: element `(r, c)` is at
/// `r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View<'_> {
    /// Checks that a `rows x cols` matrix lies inside the slice.
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst (m x n, row-major) = [dst +] lhs (m x k) * rhs (k x n)` through the `gemm` crate, on the
/// calling thread (the callers parallelise).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    add: bool,
) {
    assert!(dst.len() >= m * n);
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: the three matrices lie inside their slices (checked above), and `dst` is borrowed
    // mutably, so nothing else reads or writes it during the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            add,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A 3x3 conv (pad 1) with packed weights.
struct Conv3 {
    cin: usize,
    cout: usize,
    stride: usize,
    relu: bool,
    /// `[9 * cin, cout]`, row `(ky * 3 + kx) * cin + ci`.
    w: Vec<f32>,
    b: Vec<f32>,
    /// `[9 * cin, cout rounded up to DIRECT_PAD]` for the direct kernel, else empty.
    wd: Vec<f32>,
    /// The kernels in the Winograd domain, where that form runs this conv.
    winograd: Option<Winograd>,
}

/// Convs that Winograd does not take, with at most this many input channels or fewer than
/// [`DIRECT_MIN_COUT`] outputs, run the direct kernel: with K = 9 * cin this small, im2col +
/// GEMM is mostly copying and packing (measured: 28x28 1->16 takes 35 us that way, 9 us direct;
/// 224x224 16->16 takes 2.25 ms against 1.8 ms direct).
const DIRECT_MAX_CIN: usize = 16;
const DIRECT_MIN_COUT: usize = 16;
/// The direct kernel's weight rows are padded to a multiple of this many channels, so a pass
/// of two SIMD vectors (up to 16 lanes each, AVX-512) never reads past a row.
const DIRECT_PAD: usize = 32;
/// Accumulators per direct-kernel pass, in registers: 4 pixels x 2 vectors of output
/// channels, or 8 pixels x 1.
const DIRECT_ACCS: usize = 8;

/// A fully connected layer, weights `[out, in]` as stored: f32 when small, else the file's f16.
struct Dense {
    n_in: usize,
    n_out: usize,
    /// f32 weights (layers up to [`DENSE_F16_MIN`] weights), else empty.
    w: Vec<f32>,
    /// f16 weights (larger layers), else empty.
    w16: Vec<half::f16>,
    b: Vec<f32>,
}

/// From this many weights on, an FC layer keeps the file's f16 values and widens them on the fly.
/// At batch 1 an FC layer is a GEMV that reads every weight once, so it is bound by memory
/// traffic, and halving the bytes halves its time (VGG16's heads: 102 M weights, 411 MB as f32).
/// Small layers stay f32: they live in the caches, where the conversion would cost more.
const DENSE_F16_MIN: usize = 1 << 20;

/// Output rows per parallel task of an f16 GEMV.
const DENSE_ROWS: usize = 64;

/// f16 values widened per block: 8 KB of f32 stay in L1 while they are used.
const DENSE_BLOCK: usize = 2048;

/// An activation map, NHWC for one image.
#[derive(Clone, Debug)]
struct Map {
    h: usize,
    w: usize,
    c: usize,
    data: Buf,
}

/// Activation and scratch buffers kept between frames. A frame takes the buffers it needs and
/// gives them back, so from the second frame on the engine neither allocates nor zeroes (what
/// TFLite's arena and ONNX Runtime's memory pattern do). It holds one frame's working set per
/// frame in flight and is freed with the net.
#[derive(Default)]
struct Buffers(Mutex<Vec<Buf>>);

/// A pooled buffer: the first `len` values of a vector that stays written to its full length.
/// Handed out again at a smaller size it writes nothing, and at its old size again nothing, so a
/// frame never refills what the one before shrank (a plain `Vec` resized on each take did:
/// 13.5 MB of zeroes a frame in WAE-VGG16, 30 MB in VGG16).
#[derive(Clone, Debug, Default)]
struct Buf {
    v: Vec<f32>,
    len: usize,
}

impl std::ops::Deref for Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.len]
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Buf {
        Buf { len: v.len(), v }
    }
}

impl Buffers {
    /// `len` values with unspecified contents: callers write every value they later read.
    fn take(&self, len: usize) -> Buf {
        let found = {
            let mut free = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest buffer that fits, so big ones stay for the big layers.
            let best = (0..free.len())
                .filter(|&i| free[i].v.len() >= len)
                .min_by_key(|&i| free[i].v.len());
            best.map(|i| free.swap_remove(i))
        };
        let mut b = found.unwrap_or_else(|| Buf::from(vec![0.0; len]));
        b.len = len;
        b
    }

    /// Returns a buffer for later frames.
    fn give(&self, b: Buf) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(b);
    }

    /// A fresh map of the given shape from the pool.
    fn map(&self, h: usize, w: usize, c: usize) -> Map {
        Map {
            h,
            w,
            c,
            data: self.take(h * w * c),
        }
    }
}

impl Map {
    /// The first `c` channels and the rest, as two maps.
    fn split_channels(&self, c: usize, bufs: &Buffers) -> (Map, Map) {
        let (mut a, mut b) = (
            bufs.map(self.h, self.w, c),
            bufs.map(self.h, self.w, self.c - c),
        );
        for ((px, pa), pb) in self
            .data
            .chunks_exact(self.c)
            .zip(a.data.chunks_exact_mut(a.c))
            .zip(b.data.chunks_exact_mut(b.c))
        {
            pa.copy_from_slice(&px[..c]);
            pb.copy_from_slice(&px[c..]);
        }
        (a, b)
    }
}

/// Stride-1 convs with at least this many inputs and outputs run in the Winograd domain;
/// `WAE_EDGE_NO_WINOGRAD=1` turns it off, for comparisons. With F(4x4, 3x3) this pays from 16
/// input channels on (session 7, 224x224 16->16: 1.26 ms direct, 1.11 ms; 56x56 16->32: 231
/// against 97-120 us); F(2x2) alone did not (2.19 against 1.97 ms at 224x224).
const WINOGRAD_MIN_CIN: usize = 16;
const WINOGRAD_MIN_COUT: usize = 16;
/// Maps at least this wide (and high) use F(4x4, 3x3), smaller ones F(2x2, 3x3). A 7x7 map is
/// 4 tiles of F(4x4) covering 8x8, and its kernels, 36/16 the size of F(2x2)'s, are then read
/// for few tiles: in WAE-VGG16, 7x7 512->512 took 1.28 ms with F(4x4) against 1.10 ms, while
/// every layer from 14x14 up got faster (28x28 256->256 2.58 -> 1.68 ms, 14x14 512->512 2.76
/// -> 2.37 ms; VGG16 100 -> 80 ms).
const F4_MIN_SIDE: usize = 8;

/// The Winograd input tile side (6 for F(4x4, 3x3), 4 for F(2x2, 3x3)) a stride-1 conv with
/// these channels runs with on maps of this smaller side, or `None` for the other kernels.
fn winograd_tile(cin: usize, cout: usize, side: usize) -> Option<usize> {
    (std::env::var_os("WAE_EDGE_NO_WINOGRAD").is_none()
        && cin >= WINOGRAD_MIN_CIN
        && cout >= WINOGRAD_MIN_COUT)
        .then_some(if side >= F4_MIN_SIDE { 6 } else { 4 })
}

/// A conv's weights as read from the file and packed `[9 * cin, cout]` (row
/// `(ky * 3 + kx) * cin + ci`), before a kernel is chosen.
struct Packed {
    cin: usize,
    cout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Packed {
    fn load(file: &ModelFile, at: &str) -> Result<Packed, WeightsError> {
        let (shape, w) = file.tensor_f32(&format!("{at}.weight"))?;
        let (_, b) = file.tensor_f32(&format!("{at}.bias"))?;
        let (cout, cin) = (shape[0], shape[1]);
        let mut packed = vec![0f32; 9 * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for k in 0..9 {
                    packed[(k * cin + ci) * cout + co] = w[(co * cin + ci) * 9 + k];
                }
            }
        }
        Ok(Packed {
            cin,
            cout,
            w: packed,
            b,
        })
    }

    /// Two convs over the same input as one, `self`'s output channels first.
    fn concat(self, other: Packed) -> Packed {
        let w = self
            .w
            .chunks_exact(self.cout)
            .zip(other.w.chunks_exact(other.cout))
            .flat_map(|(x, y)| x.iter().chain(y).copied())
            .collect();
        Packed {
            cin: self.cin,
            cout: self.cout + other.cout,
            w,
            b: self.b.into_iter().chain(other.b).collect(),
        }
    }

    /// The conv for input maps whose smaller side is `side`.
    fn build(self, stride: usize, relu: bool, side: usize) -> Conv3 {
        Conv3::new(self.cin, self.cout, stride, relu, self.w, self.b, side)
    }
}

fn out_side(n: usize, stride: usize) -> usize {
    (n + 2 - 3) / stride + 1
}

impl Conv3 {
    fn load(
        file: &ModelFile,
        at: &str,
        stride: usize,
        relu: bool,
        side: usize,
    ) -> Result<Conv3, WeightsError> {
        Ok(Packed::load(file, at)?.build(stride, relu, side))
    }

    /// A conv from packed weights, laid out for the kernel that will run it on input maps whose
    /// smaller side is `side`: the Winograd domain, the direct kernel's padded rows, or as given
    /// for im2col + GEMM (only that one keeps `w`, so no conv holds two copies of its weights).
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        relu: bool,
        w: Vec<f32>,
        b: Vec<f32>,
        side: usize,
    ) -> Conv3 {
        let winograd = if stride == 1 {
            winograd_tile(cin, cout, side).map(|n| Winograd::new(&w, cin, cout, n))
        } else {
            None
        };
        let wd = if winograd.is_none() && (cin <= DIRECT_MAX_CIN || cout < DIRECT_MIN_COUT) {
            let cpad = cout.next_multiple_of(DIRECT_PAD);
            let mut wd = vec![0f32; 9 * cin * cpad];
            for (dst, src) in wd.chunks_exact_mut(cpad).zip(w.chunks_exact(cout)) {
                dst[..cout].copy_from_slice(src);
            }
            wd
        } else {
            Vec::new()
        };
        let w = if wd.is_empty() && winograd.is_none() {
            w
        } else {
            Vec::new()
        };
        Conv3 {
            cin,
            cout,
            stride,
            relu,
            w,
            b,
            wd,
            winograd,
        }
    }

    /// Bytes of weights (kernels and bias, as laid out for its kernel) one pass reads.
    fn weight_bytes(&self) -> usize {
        let wg = self.winograd.as_ref().map_or(0, |wg| wg.len());
        4 * (self.w.len() + self.wd.len() + wg + self.b.len())
    }

    /// Multiply-adds one pass on an `h x w` input does: Winograd's products, or direct
    /// convolution's `9 * cin * cout` per output pixel.
    fn multiplies(&self, h: usize, w: usize) -> usize {
        match &self.winograd {
            Some(wg) => wg.multiplies(h, w),
            None => out_side(h, self.stride) * out_side(w, self.stride) * 9 * self.cin * self.cout,
        }
    }

    /// Which kernel runs this conv.
    fn kernel(&self) -> &'static str {
        match (&self.winograd, self.wd.is_empty()) {
            (Some(wg), _) => wg.name(),
            (None, false) => "direct",
            (None, true) => "im2col + gemm",
        }
    }

    fn forward(&self, x: &Map, bufs: &Buffers) -> Map {
        if !self.wd.is_empty() {
            return self.direct(x, bufs);
        }
        if let Some(wg) = &self.winograd {
            return wg.forward(x, &self.b, self.relu, bufs);
        }
        let (oh, ow) = (out_side(x.h, self.stride), out_side(x.w, self.stride));
        let k = 9 * self.cin;
        let pixels = oh * ow;
        let mut tile = (TILE_BYTES / (4 * k)).clamp(16, pixels.max(16));
        // A map that fits one tile but is worth splitting: one tile per core.
        let threads = rayon::current_num_threads().max(1);
        if pixels <= tile * threads && pixels * k * self.cout > (1 << 20) {
            tile = pixels.div_ceil(threads).max(16);
        }
        let mut out = bufs.map(oh, ow, self.cout);
        let split_columns =
            threads > 1 && pixels <= tile && pixels * k * self.cout > COLUMN_SPLIT_MIN;
        let run_tile = |(t, dst): (usize, &mut [f32])| {
            let rows = dst.len() / self.cout;
            let patch = self.im2col(x, t * tile, rows, ow, bufs);
            if split_columns {
                // One tile only, but enough work for two cores: each takes half the output
                // channels (the patch is shared; the halves write disjoint columns).
                let half = (self.cout / 2).next_multiple_of(16).min(self.cout);
                let out = SendPtr(dst.as_mut_ptr());
                let cols = |c0: usize, c1: usize| {
                    let out = &out;
                    // SAFETY: `dst` outlives the join, and the two calls write disjoint columns.
                    unsafe { self.gemm_cols(&patch, rows, out.0, c0, c1) }
                };
                rayon::join(|| cols(0, half), || cols(half, self.cout));
            } else {
                // SAFETY: `dst` is `rows x cout`, exclusively borrowed here.
                unsafe { self.gemm_cols(&patch, rows, dst.as_mut_ptr(), 0, self.cout) }
            }
            bufs.give(patch);
        };
        // Tiles in parallel when there are several; tiny maps stay on one thread.
        for_each_chunk(&mut out.data, tile * self.cout, run_tile);
        out
    }
}

impl Conv3 {
    /// The `rows x 9*cin` patch matrix of output pixels `p0..p0 + rows` (zero outside the map).
    fn im2col(&self, x: &Map, p0: usize, rows: usize, ow: usize, bufs: &Buffers) -> Buf {
        let k = 9 * self.cin;
        let mut patch = bufs.take(rows * k);
        for r in 0..rows {
            let (oy, ox) = ((p0 + r) / ow, (p0 + r) % ow);
            let row = &mut patch[r * k..(r + 1) * k];
            for ky in 0..3 {
                let iy = (oy * self.stride + ky) as isize - 1;
                for kx in 0..3 {
                    let ix = (ox * self.stride + kx) as isize - 1;
                    let dst = &mut row[(ky * 3 + kx) * self.cin..(ky * 3 + kx + 1) * self.cin];
                    if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = (iy as usize * x.w + ix as usize) * self.cin;
                    dst.copy_from_slice(&x.data[src..src + self.cin]);
                }
            }
        }
        patch
    }

    /// Output channels `c0..c1` of `rows` pixels: `patch x W` plus bias, then ReLU.
    ///
    /// # Safety
    /// `out` must point to a live `rows x cout` row-major buffer whose columns `c0..c1` nobody
    /// else touches during the call.
    unsafe fn gemm_cols(&self, patch: &[f32], rows: usize, out: *mut f32, c0: usize, c1: usize) {
        let (k, cout) = (9 * self.cin, self.cout);
        // SAFETY: `patch` is `rows x k` and `w` is `k x cout`, both row-major; the caller
        // vouches for `out`.
        unsafe {
            gemm::gemm(
                rows,
                c1 - c0,
                k,
                out.add(c0),
                1,
                cout as isize,
                false,
                patch.as_ptr(),
                1,
                k as isize,
                self.w.as_ptr().add(c0),
                1,
                cout as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            for r in 0..rows {
                let px = std::slice::from_raw_parts_mut(out.add(r * cout + c0), c1 - c0);
                for (v, b) in px.iter_mut().zip(&self.b[c0..c1]) {
                    *v += b;
                    if self.relu && *v < 0.0 {
                        *v = 0.0;
                    }
                }
            }
        }
    }
}

/// A raw output pointer shared by threads that write disjoint parts of one buffer (the halves
/// of a GEMM column split, Winograd's work items).
struct SendPtr(*mut f32);
// SAFETY: used only where the threads write disjoint parts of a buffer that outlives them.
unsafe impl Sync for SendPtr {}

impl Conv3 {
    /// The direct kernel, output rows split across threads when the conv is big enough to pay
    /// for it. Each band of rows first copies the input rows it reads into a zero-padded buffer
    /// of its own, so the copy runs on all cores and stays in cache (measured against one padded
    /// copy of the whole map made up front on one thread, 224x224 16->6 stride 2: 357 -> 217 us,
    /// 224x224 3->16: 338 -> 259 us).
    fn direct(&self, x: &Map, bufs: &Buffers) -> Map {
        let (oh, ow) = (out_side(x.h, self.stride), out_side(x.w, self.stride));
        let wp = x.w + 2;
        let mut out = bufs.map(oh, ow, self.cout);
        let rows_per = band_rows(oh, oh * ow * 9 * x.c * self.cout > (1 << 20), 4);
        let run = |(i, dst): (usize, &mut [f32])| {
            let y0 = i * rows_per;
            let rows = dst.len() / (ow * self.cout);
            // Padded input rows `y0 * stride ..`, as many as the band's windows cover.
            let (top, n) = (y0 * self.stride, (rows - 1) * self.stride + 3);
            let mut xp = bufs.take(n * wp * x.c);
            pad_rows(x, top, &mut xp);
            let op = DirectRows {
                conv: self,
                xp: &xp,
                wp,
                ow,
                out: dst,
            };
            DirectPass(op).run();
            bufs.give(xp);
        };
        for_each_chunk(&mut out.data, rows_per * ow * self.cout, run);
        out
    }
}

/// Fills `xp` with rows `top..` of `x` padded by one zero pixel on every side (padded row 0 is
/// the zero row above the map), as many rows as `xp` holds.
fn pad_rows(x: &Map, top: usize, xp: &mut [f32]) {
    let c = x.c;
    let wp = x.w + 2;
    for (i, row) in xp.chunks_exact_mut(wp * c).enumerate() {
        match (top + i).checked_sub(1).filter(|&y| y < x.h) {
            Some(y) => {
                row[..c].fill(0.0);
                row[(wp - 1) * c..].fill(0.0);
                row[c..][..x.w * c].copy_from_slice(&x.data[y * x.w * c..][..x.w * c]);
            }
            None => row.fill(0.0),
        }
    }
}

/// Rows per band when a map of `rows` rows is cut into `per_core` bands for each core, or all of
/// them in one band unless `split`.
fn band_rows(rows: usize, split: bool, per_core: usize) -> usize {
    if split {
        rows.div_ceil(per_core * rayon::current_num_threads().max(1))
    } else {
        rows
    }
}

/// Runs `f` on each `chunk`-long piece of `out` with its index: in parallel when there are
/// several, on the calling thread when one piece covers it all.
fn for_each_chunk(out: &mut [f32], chunk: usize, f: impl Fn((usize, &mut [f32])) + Send + Sync) {
    if chunk < out.len() {
        out.par_chunks_mut(chunk).enumerate().for_each(f);
    } else {
        f((0, out));
    }
}

/// One band of output rows of a direct conv.
struct DirectRows<'a> {
    conv: &'a Conv3,
    /// The input rows the band reads with a zero border of one pixel, `rows x wp x cin`,
    /// starting at the band's first output row times the stride.
    xp: &'a [f32],
    wp: usize,
    ow: usize,
    /// The band's output, whole rows, NHWC.
    out: &'a mut [f32],
}

/// The direct kernel: accumulators for `P` pixels x `V` SIMD vectors of output channels
/// stay in registers while the 9 taps x cin inputs are broadcast against one packed
/// weight row each. Written against pulp's portable SIMD (AVX-512, AVX2/FMA, NEON, or scalar,
/// picked at run time): the crate is built for baseline targets, where compiler
/// auto-vectorisation gives neither FMA nor register blocking.
struct DirectPass<'a>(DirectRows<'a>);

impl DirectPass<'_> {
    /// Runs the band with the best SIMD the CPU has. Outputs that fill at most an AVX2 vector
    /// run on 8 lanes even where AVX-512 has 16: the FMAs then issue two per cycle instead of
    /// one (Zen 4 splits 512-bit ones), and most lanes a 16-wide vector would carry are padding
    /// (measured, 224x224 16->6 stride 2, the WAE encoder's split: 437 -> 357 us).
    fn run(self) {
        #[cfg(target_arch = "x86_64")]
        if self.0.conv.cout <= 8 {
            if let Some(v3) = pulp::x86::V3::try_new() {
                return Simd::vectorize(v3, self);
            }
        }
        pulp::Arch::new().dispatch(self)
    }
}

impl WithSimd for DirectPass<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // One vector when it covers the output channels (8 lanes on AVX2, 16 on AVX-512).
        // Either way DIRECT_ACCS accumulators: with one vector, twice the pixels, so the FMA
        // chains still hide their latency (measured, 224x224 3->16: 634 -> 546 us, 16->16:
        // 1510 -> 1433 us; 12 accumulators were slower).
        if self.0.conv.cout > S::F32_LANES {
            direct_rows::<S, 2, { DIRECT_ACCS / 2 }>(simd, self.0)
        } else {
            direct_rows::<S, 1, DIRECT_ACCS>(simd, self.0)
        }
    }
}

#[inline(always)]
fn direct_rows<S: Simd, const V: usize, const P: usize>(simd: S, rows: DirectRows<'_>) {
    let DirectRows {
        conv,
        xp,
        wp,
        ow,
        out,
    } = rows;
    let (cin, cout, s) = (conv.cin, conv.cout, conv.stride);
    let lanes = S::F32_LANES;
    let cpad = cout.next_multiple_of(DIRECT_PAD);
    let zero = simd.splat_f32s(0.0);
    // Offset of each tap from a window's top-left corner in the padded input.
    let taps: [usize; 9] = std::array::from_fn(|t| ((t / 3) * wp + t % 3) * cin);
    for (oy, dst_row) in out.chunks_exact_mut(ow * cout).enumerate() {
        let mut ox = 0;
        while ox < ow {
            let np = P.min(ow - ox);
            // Each pixel's window in the padded input; a short last group repeats its last
            // pixel rather than reading out of bounds. Plain loops and pointers, not
            // `array::from_fn` (see `winograd::input_tiles`): with 3 input channels a tap is
            // only 3 broadcasts per pixel, so per-tap overhead dominated (measured, three
            // alternating runs: 224x224 3->16 0.49-0.57 -> 0.30-0.41 ms, 112x112 3->64 0.40 ->
            // 0.26-0.35 ms).
            let mut px = [xp.as_ptr(); P];
            for (p, w) in px.iter_mut().enumerate() {
                let at = (oy * s * wp + (ox + p.min(np - 1)) * s) * cin;
                *w = xp[at..][..taps[8] + cin].as_ptr();
            }
            let mut c0 = 0;
            while c0 < cout {
                let mut acc = [[zero; V]; P];
                for (t, &toff) in taps.iter().enumerate() {
                    let wt =
                        conv.wd[t * cin * cpad + c0..][..(cin - 1) * cpad + V * lanes].as_ptr();
                    for ci in 0..cin {
                        // SAFETY: `ci * cpad + V * lanes` is within `wt`'s slice, checked above.
                        let wv =
                            unsafe { std::slice::from_raw_parts(wt.add(ci * cpad), V * lanes) };
                        let (wv, _) = S::as_simd_f32s(wv);
                        for p in 0..P {
                            // SAFETY: each window holds `taps[8] + cin` values (checked above),
                            // and `toff + ci` is below that.
                            let xv = simd.splat_f32s(unsafe { *px[p].add(toff + ci) });
                            for v in 0..V {
                                acc[p][v] = simd.mul_add_f32s(xv, wv[v], acc[p][v]);
                            }
                        }
                    }
                }
                for v in 0..V {
                    let c = c0 + v * lanes;
                    if c >= cout {
                        break;
                    }
                    let n = (cout - c).min(lanes);
                    let bias = winograd::load(simd, &conv.b[c..][..n]);
                    for (p, a) in acc.iter().take(np).enumerate() {
                        let mut y = simd.add_f32s(a[v], bias);
                        if conv.relu {
                            y = simd.max_f32s(y, zero);
                        }
                        winograd::store(simd, &mut dst_row[(ox + p) * cout + c..][..n], y);
                    }
                }
                c0 += V * lanes;
            }
            ox += np;
        }
    }
}

/// A side of `n` after [`max_pool`].
fn pooled(n: usize, ceil: bool) -> usize {
    if ceil {
        n.div_ceil(2)
    } else {
        n / 2
    }
}

/// 2x2/2 max-pool; `ceil` keeps a clipped window at odd edges (Caffe/ONNX ceil mode).
fn max_pool(x: &Map, ceil: bool, bufs: &Buffers) -> Map {
    let (oh, ow, c) = (pooled(x.h, ceil), pooled(x.w, ceil), x.c);
    let mut out = bufs.map(oh, ow, c);
    // Bands of output rows on all cores, each window started from its top-left pixel rather
    // than a filled -inf (measured alone, two alternating runs: VGG16's first pool, 224x224x64,
    // 725-1215 -> 430-452 us; WAE-VGG16's, 112x112x64, 144 -> 58-82 us).
    let rows_per = band_rows(oh, x.data.len() >= COPY_SPLIT_MIN, 2);
    let pixel = |y: usize, xx: usize| &x.data[(y * x.w + xx) * c..][..c];
    for_each_chunk(&mut out.data, rows_per * ow * c, |(i, band)| {
        for (r, row) in band.chunks_exact_mut(ow * c).enumerate() {
            let y = 2 * (i * rows_per + r);
            for (ox, dst) in row.chunks_exact_mut(c).enumerate() {
                // The window's top-left pixel is always in the map (ceil mode included).
                let xx = 2 * ox;
                dst.copy_from_slice(pixel(y, xx));
                for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
                    if y + dy < x.h && xx + dx < x.w {
                        for (d, s) in dst.iter_mut().zip(pixel(y + dy, xx + dx)) {
                            *d = d.max(*s);
                        }
                    }
                }
            }
        }
    });
    out
}

/// 2x2 analysis of an even-sided map: average (naive half) or the four Haar bands.
fn split_2x2(x: &Map, haar: bool, bufs: &Buffers) -> (Map, Option<Map>) {
    let (oh, ow, c) = (x.h / 2, x.w / 2, x.c);
    let mut low = bufs.map(oh, ow, c);
    let mut high = if haar {
        bufs.map(oh, ow, 3 * c)
    } else {
        Map {
            h: oh,
            w: ow,
            c: 0,
            data: Buf::default(),
        }
    };
    for oy in 0..oh {
        for ox in 0..ow {
            let at = |dy: usize, dx: usize, ch: usize| {
                x.data[((2 * oy + dy) * x.w + 2 * ox + dx) * c + ch]
            };
            for ch in 0..c {
                let (a, b, cc, d) = (at(0, 0, ch), at(0, 1, ch), at(1, 0, ch), at(1, 1, ch));
                let p = oy * ow + ox;
                if haar {
                    low.data[p * c + ch] = (a + b + cc + d) * 0.5;
                    // Channels band-major, as the candle path's Haar kernel orders them.
                    let hi = &mut high.data[p * 3 * c..];
                    hi[ch] = (a - b + cc - d) * 0.5;
                    hi[c + ch] = (a + b - cc - d) * 0.5;
                    hi[2 * c + ch] = (a - b - cc + d) * 0.5;
                } else {
                    low.data[p * c + ch] = (a + b + cc + d) * 0.25;
                }
            }
        }
    }
    (low, haar.then_some(high))
}

impl Dense {
    fn load(file: &ModelFile, at: &str) -> Result<Dense, WeightsError> {
        let (shape, w16) = file.tensor_f16(&format!("{at}.weight"))?;
        let (_, b) = file.tensor_f32(&format!("{at}.bias"))?;
        let (n_out, n_in) = (shape[0], shape[1]);
        let (w, w16) = if n_in * n_out >= DENSE_F16_MIN {
            (Vec::new(), w16)
        } else {
            (w16.iter().map(|v| v.to_f32()).collect(), Vec::new())
        };
        Ok(Dense {
            n_out,
            n_in,
            w,
            w16,
            b,
        })
    }

    /// Reorders input columns from candle's NCHW flatten of `[c, h, w]` to the NHWC flatten.
    fn permute_from_nchw(&mut self, c: usize, hw: usize) {
        fn permute<T: Copy>(w: &[T], n_out: usize, n_in: usize, c: usize, hw: usize) -> Vec<T> {
            let mut out = w.to_vec();
            if w.is_empty() {
                return out;
            }
            for o in 0..n_out {
                for ch in 0..c {
                    for p in 0..hw {
                        out[o * n_in + p * c + ch] = w[o * n_in + ch * hw + p];
                    }
                }
            }
            out
        }
        self.w = permute(&self.w, self.n_out, self.n_in, c, hw);
        self.w16 = permute(&self.w16, self.n_out, self.n_in, c, hw);
    }

    fn forward(&self, x: &[f32], relu: bool) -> Vec<f32> {
        let mut y = self.b.clone();
        if self.w.is_empty() {
            self.gemv_f16(x, &mut y);
        } else {
            // y[1, out] += x[1, in] . W^T, reading W [out, in] in place through strides.
            let x = View {
                data: x,
                row_stride: self.n_in,
                col_stride: 1,
            };
            let w_t = View {
                data: &self.w,
                row_stride: 1,
                col_stride: self.n_in,
            };
            gemm_into(&mut y, 1, self.n_out, self.n_in, x, w_t, true);
        }
        if relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        y
    }

    /// `y += W x` with f16 `W`: each row is widened to f32 and dotted with `x`, in registers
    /// (F16C + FMA) where the CPU has them, else in blocks through `half`; row groups run on all
    /// cores, since memory bandwidth, not arithmetic, is the limit.
    fn gemv_f16(&self, x: &[f32], y: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let arch = pulp::Arch::new();
        #[cfg(target_arch = "x86_64")]
        let fused = is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma");
        y.par_chunks_mut(DENSE_ROWS)
            .enumerate()
            .for_each(|(g, ys)| {
                let row = |r: usize| &self.w16[(g * DENSE_ROWS + r) * self.n_in..][..self.n_in];
                #[cfg(target_arch = "x86_64")]
                if fused {
                    for (q, y4) in ys.chunks_mut(4).enumerate() {
                        let r0 = 4 * q;
                        // Four rows per pass: each load of `x` (which lives in L2) serves four
                        // rows of weights, so the pass runs at the weights' bandwidth.
                        let rows = [0, 1, 2, 3].map(|k| row(r0 + k.min(y4.len() - 1)));
                        // SAFETY: F16C and FMA were detected above.
                        let d = unsafe { dot4_f16_f16c(x, rows) };
                        y4.iter_mut().zip(d).for_each(|(yo, d)| *yo += d);
                    }
                    return;
                }
                let mut buf = [0f32; DENSE_BLOCK];
                for (r, yo) in ys.iter_mut().enumerate() {
                    let row = row(r);
                    for (ws, xs) in row.chunks(DENSE_BLOCK).zip(x.chunks(DENSE_BLOCK)) {
                        let wf = &mut buf[..ws.len()];
                        ws.convert_to_f32_slice(wf);
                        *yo += arch.dispatch(Dot(xs, wf));
                    }
                }
            });
    }
}

/// `x . w` for four rows `w` widened from f16 in registers: one pass over the weights, where
/// `half`'s slice conversion makes a call per 8 values and a second pass over a buffer
/// (measured: VGG16's heads went from 22 to 12 ms, WAE-VGG16's from 6.8 to 3.7).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma,f16c")]
fn dot4_f16_f16c(x: &[f32], w: [&[half::f16]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = w.iter().fold(x.len(), |n, r| n.min(r.len()));
    let main = n - n % 16;
    let xp = x.as_ptr();
    let wp = w.map(|r| r.as_ptr().cast::<u16>());
    // Two accumulators per row, for enough independent FMAs in flight.
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    for i in (0..main).step_by(16) {
        for h in 0..2 {
            // SAFETY: i + 8h + 8 <= main <= n, the length of `x` and of every row.
            let xv = unsafe { _mm256_loadu_ps(xp.add(i + 8 * h)) };
            for (a, p) in acc.iter_mut().zip(wp) {
                // SAFETY: as above.
                let wh = unsafe { _mm_loadu_si128(p.add(i + 8 * h).cast::<__m128i>()) };
                a[h] = _mm256_fmadd_ps(xv, _mm256_cvtph_ps(wh), a[h]);
            }
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), r) in out.iter_mut().zip(acc).zip(w) {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a[0], a[1])) };
        let tail: f32 = x[main..n]
            .iter()
            .zip(&r[main..n])
            .map(|(a, b)| a * b.to_f32())
            .sum();
        *o = lanes.iter().sum::<f32>() + tail;
    }
    out
}

/// A dot product in four SIMD accumulators.
struct Dot<'a>(&'a [f32], &'a [f32]);

impl WithSimd for Dot<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (a, a_tail) = S::as_simd_f32s(self.0);
        let (b, b_tail) = S::as_simd_f32s(self.1);
        let mut acc = [simd.splat_f32s(0.0); 4];
        let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
        let (a_rest, b_rest) = (a4.remainder(), b4.remainder());
        for (x, w) in a4.zip(b4) {
            for i in 0..4 {
                acc[i] = simd.mul_add_f32s(x[i], w[i], acc[i]);
            }
        }
        for (x, w) in a_rest.iter().zip(b_rest) {
            acc[0] = simd.mul_add_f32s(*x, *w, acc[0]);
        }
        let sum = simd.add_f32s(simd.add_f32s(acc[0], acc[1]), simd.add_f32s(acc[2], acc[3]));
        let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, w)| x * w).sum();
        simd.reduce_sum_f32s(sum) + tail
    }
}

fn mlp(layers: &[Dense], x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    for (i, l) in layers.iter().enumerate() {
        x = l.forward(&x, i + 1 < layers.len());
    }
    x
}

enum Split {
    Identity,
    Average,
    Haar,
    Learned {
        convs: Vec<Conv3>,
        /// `encoder.low` and `encoder.high` as one conv: they read the same map, so one pass
        /// makes both (I_L in the first half of the channels, I_H in the second).
        split: Conv3,
    },
}

/// The inference network compiled for the CPU.
pub struct CpuNet {
    config: ModelConfig,
    split: Split,
    backbone: Vec<Vec<Conv3>>,
    branch: Option<Vec<Vec<Conv3>>>,
    head_low: Vec<Dense>,
    head_fuse: Option<Vec<Dense>>,
    bufs: Buffers,
}

/// The conv stages under `at`, for input maps whose smaller side is `side` (each stage ends in a
/// 2x2 pool, ceil mode if `ceil`).
fn stack(
    file: &ModelFile,
    at: &str,
    stages: &[Vec<usize>],
    side: usize,
    ceil: bool,
) -> Result<Vec<Vec<Conv3>>, WeightsError> {
    let mut side = side;
    stages
        .iter()
        .enumerate()
        .map(|(s, st)| {
            let convs = (0..st.len())
                .map(|i| Conv3::load(file, &format!("{at}.s{s}.c{i}"), 1, true, side))
                .collect();
            side = pooled(side, ceil);
            convs
        })
        .collect()
}

fn head(
    file: &ModelFile,
    at: &str,
    hidden: usize,
    c: usize,
    hw: usize,
) -> Result<Vec<Dense>, WeightsError> {
    let mut layers = (0..=hidden)
        .map(|i| Dense::load(file, &format!("{at}.fc{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    layers[0].permute_from_nchw(c, hw);
    Ok(layers)
}

/// Applies `f` to `x`, giving `x`'s buffer back to the pool.
fn step(x: Map, bufs: &Buffers, f: impl FnOnce(&Map) -> Map) -> Map {
    let y = f(&x);
    bufs.give(x.data);
    y
}

/// One conv's time in one frame (see [`CpuNet::profile`]).
#[derive(Clone, Debug)]
pub struct LayerTime {
    /// The conv's tensor prefix, e.g. `backbone.s2.c1`.
    pub name: String,
    /// Input map and channels, e.g. `28x28 256->256`, with `/2` for stride 2.
    pub shape: String,
    /// The kernel that ran it: `direct`, `im2col + gemm`, `winograd F(2x2)` or `F(4x4)`.
    pub kernel: &'static str,
    /// Bytes of weights the conv reads, as laid out for its kernel (Winograd's in their domain).
    pub weight_bytes: usize,
    /// Multiply-adds its kernel does (see [`Conv3::multiplies`]).
    pub multiplies: usize,
    /// Wall time.
    pub time: Duration,
}

/// Where a profiled frame's conv times go; the I_H branch records from another thread.
type Recorder = Mutex<Vec<LayerTime>>;

/// `conv` applied to `x` as [`step`] does, timed into `rec` under `name` when profiling.
fn conv_step(
    x: Map,
    conv: &Conv3,
    bufs: &Buffers,
    rec: Option<&Recorder>,
    name: impl FnOnce() -> String,
) -> Map {
    let t = Instant::now();
    let (h, w) = (x.h, x.w);
    let y = step(x, bufs, |x| conv.forward(x, bufs));
    if let Some(rec) = rec {
        let stride = if conv.stride == 1 { "" } else { " /2" };
        let t = LayerTime {
            name: name(),
            shape: format!("{h}x{w} {}->{}{stride}", conv.cin, conv.cout),
            kernel: conv.kernel(),
            weight_bytes: conv.weight_bytes(),
            multiplies: conv.multiplies(h, w),
            time: t.elapsed(),
        };
        rec.lock().unwrap_or_else(PoisonError::into_inner).push(t);
    }
    y
}

fn run_stack(
    stages: &[Vec<Conv3>],
    x: Map,
    ceil: bool,
    bufs: &Buffers,
    at: &str,
    rec: Option<&Recorder>,
) -> Map {
    let mut x = x;
    for (s, stage) in stages.iter().enumerate() {
        for (i, conv) in stage.iter().enumerate() {
            x = conv_step(x, conv, bufs, rec, || format!("{at}.s{s}.c{i}"));
        }
        x = step(x, bufs, |x| max_pool(x, ceil, bufs));
    }
    x
}

impl CpuNet {
    /// Compiles a validated model file: reads every inference weight once, packs, permutes.
    pub fn from_file(file: &ModelFile) -> Result<CpuNet, WeightsError> {
        let c = file.config().clone();
        let a = &c.arch;
        let side = c.input.height.min(c.input.width);
        let split = match a.kind {
            ArchKind::Plain => Split::Identity,
            ArchKind::NaiveHalf => Split::Average,
            ArchKind::Haar => Split::Haar,
            ArchKind::Wae => Split::Learned {
                convs: (0..a.encoder.len())
                    .map(|i| Conv3::load(file, &format!("encoder.conv{i}"), 1, true, side))
                    .collect::<Result<_, _>>()?,
                split: Packed::load(file, "encoder.low")?
                    .concat(Packed::load(file, "encoder.high")?)
                    .build(2, false, side),
            },
        };
        let (fh, fw) = c.feature_size();
        let c_low = *a
            .backbone
            .last()
            .and_then(|s| s.last())
            .expect("validated backbone");
        // The backbone and the branch see the full frame (plain) or a half-size split of it.
        let side = match a.kind {
            ArchKind::Plain => side,
            ArchKind::Wae => out_side(side, 2),
            _ => side / 2,
        };
        let backbone = stack(file, "backbone", &a.backbone, side, a.pool_ceil)?;
        let head_low = head(file, "head_low", a.head_low.len(), c_low, fh * fw)?;
        let (branch, head_fuse) = if a.kind.has_branch() {
            let stages = c.branch_stages();
            let c_high = *stages
                .last()
                .and_then(|s| s.last())
                .expect("validated backbone");
            (
                Some(stack(file, "branch", &stages, side, a.pool_ceil)?),
                Some(head(
                    file,
                    "head_fuse",
                    a.head_fuse.len(),
                    c_low + c_high,
                    fh * fw,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(CpuNet {
            config: c,
            split,
            backbone,
            branch,
            head_low,
            head_fuse,
            bufs: Buffers::default(),
        })
    }

    /// The config compiled from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `[n, classes]` (row-major) of a normalised NCHW batch, with stage times summed
    /// over the batch.
    pub fn forward(&self, nchw: &[f32], n: usize) -> (Vec<f32>, StageTimes) {
        // The whole pass runs on a pool thread: its joins and parallel loops then hand work to
        // the other worker through the pool's deque, instead of each one waking the pool from
        // outside and blocking this thread (measured: a quarter of a small model's time went to
        // those wake-ups).
        rayon::scope(|_| self.forward_on_pool(nchw, n, None))
    }

    /// Every conv's time in one pass of the first image of a normalised NCHW batch, in network
    /// order (encoder, I_L backbone, I_H branch). The branch runs beside the backbone as in
    /// [`CpuNet::forward`], so the layers it overlaps share the cores with it.
    pub fn profile(&self, nchw: &[f32]) -> Vec<LayerTime> {
        let i = self.config.input;
        let rec = Recorder::default();
        rayon::scope(|_| {
            self.forward_on_pool(&nchw[..i.channels * i.height * i.width], 1, Some(&rec))
        });
        let mut layers = rec.into_inner().unwrap_or_else(PoisonError::into_inner);
        let rank = |n: &str| {
            ["encoder", "backbone", "branch"]
                .iter()
                .position(|p| n.starts_with(p))
        };
        layers.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
        layers
    }

    fn forward_on_pool(
        &self,
        nchw: &[f32],
        n: usize,
        rec: Option<&Recorder>,
    ) -> (Vec<f32>, StageTimes) {
        let i = self.config.input;
        let per = i.channels * i.height * i.width;
        assert_eq!(nchw.len(), n * per, "input is not [n, C, H, W]");
        let mut times = StageTimes::default();
        let mut logits = Vec::with_capacity(n * self.config.classes);
        let bufs = &self.bufs;
        for img in nchw.chunks_exact(per) {
            let t = Instant::now();
            let plane = i.height * i.width;
            let mut x = bufs.map(i.height, i.width, i.channels);
            // NCHW -> NHWC in bands of rows on all cores (measured, VGG16 224x224x3, four
            // alternating pairs: 0.106-0.163 -> 0.084-0.110 ms).
            let c = i.channels;
            let rows_per = band_rows(i.height, per >= COPY_SPLIT_MIN, 2);
            for_each_chunk(&mut x.data, rows_per * i.width * c, |(b, band)| {
                let p0 = b * rows_per * i.width;
                for (p, px) in band.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = img[ch * plane + p0 + p];
                    }
                }
            });
            let (low, high) = match &self.split {
                Split::Identity => (x, None),
                Split::Average | Split::Haar => {
                    let halves = split_2x2(&x, matches!(self.split, Split::Haar), bufs);
                    bufs.give(x.data);
                    halves
                }
                Split::Learned { convs, split } => {
                    for (i, conv) in convs.iter().enumerate() {
                        x = conv_step(x, conv, bufs, rec, || format!("encoder.conv{i}"));
                    }
                    let both = conv_step(x, split, bufs, rec, || "encoder.split".into());
                    let (low, high) = both.split_channels(split.cout / 2, bufs);
                    bufs.give(both.data);
                    (low, Some(high))
                }
            };
            let t1 = Instant::now();
            let ceil = self.config.arch.pool_ceil;
            let timed = |stages: &[Vec<Conv3>], x: Map, at: &str| {
                let t = Instant::now();
                let y = run_stack(stages, x, ceil, bufs, at, rec);
                (y, t.elapsed())
            };
            // The I_H branch runs beside the I_L backbone (a second core is otherwise idle during
            // the backbone's small convs); their stage times overlap.
            let ((f_low, t_low), high) = match (&self.branch, high) {
                (Some(b), Some(h)) => {
                    let (l, h) = rayon::join(
                        || timed(&self.backbone, low, "backbone"),
                        || timed(b, h, "branch"),
                    );
                    (l, Some(h))
                }
                _ => (timed(&self.backbone, low, "backbone"), None),
            };
            let (f_high, t_high) = high.map_or((None, Duration::ZERO), |(f, t)| (Some(f), t));
            let t3 = Instant::now();
            // The two heads read 2-3 MB of weights each: on two cores they share the memory
            // bandwidth rather than queue for it.
            let fused = |fuse: &[Dense], fh: &Map| {
                let mut cat = Vec::with_capacity(f_low.data.len() + fh.data.len());
                for (l, h) in f_low
                    .data
                    .chunks_exact(f_low.c)
                    .zip(fh.data.chunks_exact(fh.c))
                {
                    cat.extend_from_slice(l);
                    cat.extend_from_slice(h);
                }
                mlp(fuse, &cat)
            };
            let y = match (&self.head_fuse, &f_high) {
                (Some(fuse), Some(fh)) => {
                    let (mut y, y2) =
                        rayon::join(|| mlp(&self.head_low, &f_low.data), || fused(fuse, fh));
                    y.iter_mut().zip(y2).for_each(|(a, b)| *a += b);
                    y
                }
                _ => mlp(&self.head_low, &f_low.data),
            };
            let t4 = Instant::now();
            bufs.give(f_low.data);
            if let Some(fh) = f_high {
                bufs.give(fh.data);
            }
            times.encoder += t1 - t;
            times.backbone += t_low;
            times.branch += t_high;
            times.heads += t4 - t3;
            logits.extend(y);
        }
        (logits, times)
    }
}

/// Median time of one 3x3 conv (pad 1, ReLU) on an `h x h x cin` map over `iters` runs, through
/// whichever kernel the engine picks for that shape. For `benches/conv_layers.rs`.
#[doc(hidden)]
pub fn time_conv3(h: usize, cin: usize, cout: usize, stride: usize, iters: usize) -> Duration {
    let conv = Conv3::new(
        cin,
        cout,
        stride,
        true,
        (0..9 * cin * cout).map(|i| (i % 7) as f32 * 0.01).collect(),
        vec![0.1; cout],
        h,
    );
    let x = Map {
        h,
        w: h,
        c: cin,
        data: vec![0.5; h * h * cin].into(),
    };
    let bufs = Buffers::default();
    let run = || bufs.give(std::hint::black_box(conv.forward(&x, &bufs)).data);
    // On a pool thread, as in `CpuNet::forward`.
    let mut t: Vec<Duration> = rayon::scope(|_| {
        for _ in 0..iters.div_ceil(10) {
            run();
        }
        (0..iters.max(1))
            .map(|_| {
                let t0 = Instant::now();
                run();
                t0.elapsed()
            })
            .collect()
    });
    t.sort();
    t[t.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use candle_core::{Device, Tensor};

    /// Every kind and the presets' layer shapes: the CPU path equals the candle path.
    #[test]
    fn matches_the_candle_path() {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind, wide_head, side) in [
            ("wae-fashion", ArchKind::Wae, false, 28),
            ("wae-fashion", ArchKind::Wae, true, 28),
            ("wae-fashion", ArchKind::Haar, false, 28),
            ("plain-fashion", ArchKind::Plain, false, 28),
            ("plain-fashion", ArchKind::NaiveHalf, false, 28),
            // A frame big enough for the input copy and the pools to split into bands of rows.
            ("wae-fashion", ArchKind::Wae, false, 260),
        ] {
            let mut cfg = preset(name).unwrap();
            cfg.arch.kind = kind;
            if side != 28 {
                cfg.input.height = side;
                cfg.input.width = side;
                cfg.arch.backbone = vec![vec![8], vec![8], vec![8], vec![8], vec![8]];
            }
            if wide_head {
                // Over DENSE_F16_MIN weights: the f16 GEMV, after the NCHW -> NHWC permutation.
                cfg.arch.head_low = vec![1100];
            }
            if kind == ArchKind::Haar {
                cfg.arch.encoder.clear();
            }
            if !kind.has_branch() {
                cfg.arch.head_fuse.clear();
            }
            // An odd feature map exercises ceil pooling; floor is checked with the plain net.
            cfg.arch.pool_ceil = kind != ArchKind::Plain;
            let (cfg, tensors) = crate::weights::random_model(&cfg, 11).unwrap();
            let p = dir
                .path()
                .join(format!("{kind:?}-{wide_head}-{side}.safetensors"));
            crate::weights::save(&p, &cfg, &tensors).unwrap();
            let file = ModelFile::open(&p).unwrap();
            let mut cpu = CpuNet::from_file(&file).unwrap();
            cpu.bufs = poisoned();
            let net = file.build(&Device::Cpu).unwrap();
            let x = || Tensor::randn(0f32, 1., (3, 1, side, side), &Device::Cpu).unwrap();
            let run = |x: &Tensor| {
                cpu.forward(&x.flatten_all().unwrap().to_vec1().unwrap(), 3)
                    .0
            };
            // The second batch runs on the buffers the first left behind.
            for x in [x(), x()] {
                let want = net.forward_t(&x, false).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = run(&x);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let diff = want
                    .iter()
                    .zip(&got)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "{kind:?}: max diff {diff} (scale {scale})"
                );
            }
            // Once warm, a frame allocates nothing: the pool holds the same buffers after it.
            // (One thread, so that the order of takes, and so the pool, is deterministic.)
            let held = || {
                let mut caps: Vec<usize> = cpu
                    .bufs
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|b| b.v.capacity())
                    .collect();
                caps.sort();
                caps
            };
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            one.install(|| run(&x()));
            let warm = held();
            one.install(|| run(&x()));
            assert_eq!(held(), warm, "{kind:?}: the pool grew on a warm frame");
        }
    }

    /// A buffer given back after a small take comes out again at its old size unwritten: the
    /// pool does not refill what a smaller take left alone.
    #[test]
    fn pool_reuses_buffers_without_writing_them() {
        let bufs = Buffers::default();
        let mut b = bufs.take(100);
        b.fill(7.0);
        bufs.give(b);
        let small = bufs.take(10);
        assert_eq!(small.len(), 10);
        bufs.give(small);
        let big = bufs.take(100);
        assert_eq!(big.len(), 100);
        assert!(
            big.iter().all(|&v| v == 7.0),
            "the pool wrote to a reused buffer"
        );
    }

    /// A pool holding buffers full of NaN: any value a kernel reads without writing it first
    /// poisons the result.
    fn poisoned() -> Buffers {
        let bufs = Buffers::default();
        for n in [1 << 18, 1 << 14, 4096, 1000, 300, 64] {
            bufs.give(vec![f32::NAN; n].into());
        }
        bufs
    }

    #[test]
    fn conv_by_hand_with_stride_and_padding() {
        // One input channel 3x3 of ones, a kernel of ones, stride 2: corners see 4 ones.
        let conv = Conv3::new(1, 1, 2, false, vec![1.0; 9], vec![0.5], 4);
        let x = Map {
            h: 3,
            w: 3,
            c: 1,
            data: vec![1.0; 9].into(),
        };
        let y = conv.forward(&x, &poisoned());
        assert_eq!((y.h, y.w), (2, 2));
        assert_eq!(*y.data, [4.5, 4.5, 4.5, 4.5]);
    }

    /// Naive reference: out[oy, ox, co] = b[co] + sum over in-bounds taps and channels.
    fn reference(conv: &Conv3, w: &[f32], x: &Map) -> Vec<f32> {
        let (oh, ow) = (out_side(x.h, conv.stride), out_side(x.w, conv.stride));
        let mut out = vec![0f32; oh * ow * conv.cout];
        for oy in 0..oh {
            for ox in 0..ow {
                for co in 0..conv.cout {
                    let mut acc = conv.b[co];
                    for t in 0..9 {
                        let iy = (oy * conv.stride + t / 3) as isize - 1;
                        let ix = (ox * conv.stride + t % 3) as isize - 1;
                        if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                            continue;
                        }
                        for ci in 0..conv.cin {
                            let v = x.data[(iy as usize * x.w + ix as usize) * conv.cin + ci];
                            acc += v * w[(t * conv.cin + ci) * conv.cout + co];
                        }
                    }
                    out[(oy * ow + ox) * conv.cout + co] =
                        if conv.relu { acc.max(0.0) } else { acc };
                }
            }
        }
        out
    }

    /// Both kernels (direct for few channels, im2col + GEMM otherwise) against the naive
    /// reference: odd and non-square maps, stride 2, channel counts that are not a multiple of
    /// the SIMD width, several passes over the output channels, a short last pixel group, and
    /// maps big enough to be split across threads (by rows or by tiles).
    #[test]
    fn kernels_match_the_reference() {
        let shapes = [
            (7, 9, 1, 16, 1, true),
            (5, 6, 3, 40, 1, true),
            (9, 7, 16, 6, 2, false),
            (11, 10, 2, 1, 2, false),
            (6, 5, 24, 20, 1, true),
            (13, 13, 32, 33, 2, true),
            (96, 80, 3, 16, 1, true),
            (40, 40, 64, 64, 1, true),
            (7, 7, 64, 64, 1, true),
            (4, 4, 64, 128, 1, true),
            // One tile with its output channels split over two threads.
            (4, 4, 128, 256, 1, true),
            (3, 5, 160, 200, 1, false),
            // Winograd: channel counts off the vector width, and several spans of tiles.
            (5, 9, 40, 72, 1, true),
            (90, 50, 48, 40, 1, true),
            // Winograd's narrower channel groups (32, then 16) with a partial vector.
            (9, 9, 32, 20, 1, true),
            (6, 7, 33, 16, 1, false),
            // Winograd with few inputs (each item transforms its own tiles): two channel
            // groups and a short last block of tiles.
            (30, 22, 32, 72, 1, true),
            // F(4x4) with halved last tile rows and columns (sides 14 and 10), and items that
            // hold only halved tiles (14x14 with one channel group: 4 items of 4 tiles).
            (14, 14, 64, 64, 1, true),
            (10, 14, 40, 24, 1, false),
            // Kernels big enough for blocks of more than 64 tiles (110 tiles, 4 groups).
            (22, 20, 512, 200, 1, true),
            // 16 input channels (Winograd from 16 on), clipped tiles on both edges.
            (21, 18, 16, 24, 1, true),
            // The direct kernel in bands of rows, each padding its own input rows, with at most
            // 8 outputs (8 lanes on AVX-512 too): stride 2 with an odd height (a one-row last
            // band), and stride 1.
            (85, 66, 16, 6, 2, false),
            (72, 41, 8, 5, 1, true),
        ];
        // Shared between the shapes, so each runs on buffers another left behind.
        let bufs = poisoned();
        // Each shape as the engine would run it, and again as if on a small map, which makes
        // Winograd shapes use F(2x2) instead of F(4x4).
        let runs = shapes.iter().flat_map(|&(h, w, ci, co, st, r)| {
            [(h, w, ci, co, st, r, h.min(w)), (h, w, ci, co, st, r, 4)]
        });
        for (h, w, cin, cout, stride, relu, side) in runs {
            let wts: Vec<f32> = (0..9 * cin * cout)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let b: Vec<f32> = (0..cout).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
            let packed = wts.clone();
            let conv = Conv3::new(cin, cout, stride, relu, wts, b, side);
            let x = Map {
                h,
                w,
                c: cin,
                data: (0..h * w * cin)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.05)
                    .collect::<Vec<_>>()
                    .into(),
            };
            let want = reference(&conv, &packed, &x);
            let got = conv.forward(&x, &bufs);
            assert_eq!(
                (got.h, got.w, got.c),
                (out_side(h, stride), out_side(w, stride), cout)
            );
            let diff = want
                .iter()
                .zip(got.data.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Relative to the largest output: F(4x4)'s transforms (factors up to 8 and 1/24)
            // round more than F(2x2)'s, about 1e-5 of the output's scale.
            let scale = want.iter().fold(1f32, |m, a| m.max(a.abs()));
            assert!(
                diff < 1e-4 * scale,
                "{h}x{w} {cin}->{cout}/{stride} ({}): max diff {diff}, scale {scale}",
                conv.kernel()
            );
            bufs.give(got.data);
        }
    }

    /// Max pooling against each window's maximum, on maps small enough for one thread and big
    /// enough for bands of rows, with odd sides in both rounding modes.
    #[test]
    fn max_pool_takes_each_windows_maximum() {
        let bufs = poisoned();
        for (h, w, c) in [(7, 5, 3), (67, 41, 24), (64, 64, 16)] {
            let x = Map {
                h,
                w,
                c,
                data: (0..h * w * c)
                    .map(|i| ((i * 7919 % 1009) as f32 - 500.0) * 0.01)
                    .collect::<Vec<_>>()
                    .into(),
            };
            for ceil in [false, true] {
                let y = max_pool(&x, ceil, &bufs);
                assert_eq!((y.h, y.w), (pooled(h, ceil), pooled(w, ceil)));
                for oy in 0..y.h {
                    for ox in 0..y.w {
                        for ch in 0..c {
                            let mut want = f32::NEG_INFINITY;
                            for iy in 2 * oy..(2 * oy + 2).min(h) {
                                for ix in 2 * ox..(2 * ox + 2).min(w) {
                                    want = want.max(x.data[(iy * w + ix) * c + ch]);
                                }
                            }
                            assert_eq!(y.data[(oy * y.w + ox) * c + ch], want, "{h}x{w}x{c}");
                        }
                    }
                }
                bufs.give(y.data);
            }
        }
    }

    /// Large FC layers keep f16 weights: the blocked, parallel GEMV equals the plain sum over
    /// the same (f16-rounded) weights, with a row count that is not a multiple of the row group
    /// and a width that is not a multiple of the block or of the fused kernel's 32 (the last
    /// three inputs are non-zero, so a dropped tail shows).
    #[test]
    fn f16_gemv_matches_the_plain_sum() {
        let (n_out, n_in) = (702, 2 * DENSE_BLOCK + 99);
        assert!(n_out * n_in >= DENSE_F16_MIN);
        let w16: Vec<half::f16> = (0..n_out * n_in)
            .map(|i| half::f16::from_f32(((i * 7919 % 2003) as f32 - 1001.0) * 1e-3))
            .collect();
        let b: Vec<f32> = (0..n_out).map(|i| i as f32 * 0.01).collect();
        let x: Vec<f32> = (0..n_in).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let dense = Dense {
            n_in,
            n_out,
            w: Vec::new(),
            w16: w16.clone(),
            b: b.clone(),
        };
        let got = dense.forward(&x, true);
        for o in 0..n_out {
            let want: f32 = b[o]
                + (0..n_in)
                    .map(|i| w16[o * n_in + i].to_f32() * x[i])
                    .sum::<f32>();
            let want = want.max(0.0);
            assert!(
                (got[o] - want).abs() <= 1e-3 * want.abs().max(1.0),
                "row {o}: {} vs {want}",
                got[o]
            );
        }
    }
}
