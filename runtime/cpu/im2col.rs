//! The general 3x3 conv kernel: output pixels in tiles, each tile's patches copied out (im2col)
//! and multiplied by the packed kernels in one GEMM through the `gemm` crate (candle's own GEMM),
//! with bias and ReLU fused into the pass over the result. Also the GEMM entry point the fully
//! connected layers and training's CPU ops share.

use super::{for_each_chunk, out_side, Buf, Buffers, Conv3, Map, SendPtr};

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

impl Conv3 {
    /// The conv as tiles of im2col patches, each multiplied in one GEMM; tiles run on all
    /// cores, and a map of one tile splits its output channels instead when it is worth it.
    pub(super) fn im2col_gemm(&self, x: &Map, bufs: &Buffers) -> Map {
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
