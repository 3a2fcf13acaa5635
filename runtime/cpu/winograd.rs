//! Winograd F(2x2, 3x3) and F(4x4, 3x3) for stride-1 3x3 convs. Each `n x n` input tile `d`
//! (n = 4 or 6) and each kernel `g` are transformed (`B^T d B`, `G g G^T`) so that an
//! `(n-2) x (n-2)` output tile, `A^T [U . V] A`, costs `n * n` multiplies per channel pair instead
//! of `9 (n-2)^2`: 2.25x fewer for F(2x2), 4x for F(4x4), which is how a path already near the
//! FMA peak gets faster. Kernels are transformed once at load. A frame transforms its input tiles
//! (vectorised across the NHWC channels), then for each block of tiles and group of output channels
//! runs the `n * n` products `[tiles x cin] x [cin x cout]` in a register-blocked SIMD kernel and
//! transforms them straight back to output pixels, with bias and ReLU. With few input channels
//! each work item transforms its own tiles instead (`forward_fused`): one parallel loop a frame.
//! Where a map's side leaves the last tiles fewer outputs (14x14, 7x7), they skip the products
//! only the dropped outputs need (`Edges`).
//! Rounding differs from the direct sum: a few ulps for F(2x2), about 1e-5 of the output's scale
//! for F(4x4), whose transforms multiply by up to 8 and divide by 24; tests bound it.

use std::mem::MaybeUninit;

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::{Buffers, Map, SendPtr};

/// Output channels per work item at most: on AVX-512, four vectors of 16. Convs with fewer
/// outputs use groups of 32 or 16, so the kernel never multiplies padding.
const COLS: usize = 64;
/// Bytes of transformed input per span of tiles (half of L2 here).
const SPAN_BYTES: usize = 512 * 1024;
/// Tiles per work item at most: their products (`n*n x TILES x COLS` floats, 256 KB for
/// F(2x2)) stay in L2 while the transform back reads them. Each item reads its channel group's
/// kernels once (`n*n x cin x COLS` floats, 2 MB for F(2x2) at 512 channels), so big blocks
/// matter on deep layers.
const TILES: usize = 64;
/// An item's kernels (`n*n x cin x cols` floats) from which blocks may hold `4 x TILES` tiles.
const BIG_KERNELS: usize = 2 << 20;
/// Convs with at most this many input channels run [`Winograd::forward_fused`] (measured,
/// 32->32: 14x14 19.5 -> 15.6 us, 56x56 327 -> 270 us, 112x112 1143 -> 950 us; at 64 channels
/// and more the two forms are level).
const FUSED_MAX_CIN: usize = 32;

/// F(2x2)'s points (0, 1, -1, inf) are four of F(4x4)'s six, at these positions of a 6-point axis:
/// its transformed kernels are F(4x4)'s there, row by row scaled by 1/4, -1/3, -1/3 and 1.
const HALF: [usize; 4] = [0, 1, 2, 5];
/// What the input transform of a halved axis multiplies by to undo that scale.
const HALF_UNSCALE: [f32; 4] = [4.0, -3.0, -3.0, 1.0];

/// The last row and column of tiles, where the map's side leaves them fewer outputs than a tile
/// has, skip the products those outputs alone need:
/// - F(4x4) tiles left 2 outputs (sides 14, 30, ...) run F(2x2) on the same kernels along that
///   axis, at the positions in [`HALF`]: 4 of 6 positions, and a 14x14 map does 484 products
///   per channel pair instead of 576;
/// - tiles left fewer outputs otherwise (F(4x4) on sides 4k+1 and 4k+3, F(2x2) on odd sides: 7x7
///   does 225 instead of 256) skip the last position, the point at infinity, which only the last
///   output reads (the last column of `A^T`).
///
/// No kernels of their own: the skipped products are simply not computed.
#[derive(Clone, Copy, Debug)]
struct Edges {
    /// The last tile row, and the positions along it that its tiles skip (bit i: position i).
    row: (usize, u8),
    /// The same for the last tile column.
    col: (usize, u8),
}

/// [`Edges`]' positions skipped along a halved F(4x4) axis.
const HALVED: u8 = 0b11000;

impl Edges {
    /// The last tile row and column of an `h x w` map with input tiles of side `n`.
    fn new(n: usize, h: usize, w: usize) -> Edges {
        let axis = |side: usize| {
            let m = n - 2;
            let (last, left) = (side.div_ceil(m) - 1, side % m);
            let skip = match (n, left) {
                (_, 0) => 0,
                (6, 2) => HALVED,
                _ => 1 << (n - 1),
            };
            (last, skip)
        };
        Edges {
            row: axis(h),
            col: axis(w),
        }
    }

    /// Whether tile `t` (of `tw` a row) is halved along its rows and along its columns (F(4x4)
    /// run as F(2x2) there, with their own transforms).
    #[inline(always)]
    fn halved(self, t: usize, tw: usize) -> (bool, bool) {
        let class = self.class(t, tw);
        (
            class & 1 != 0 && self.row.1 == HALVED,
            class & 2 != 0 && self.col.1 == HALVED,
        )
    }

    /// Tile-position pairs with a product on an `h x w` map of `n`-sided tiles: along each axis,
    /// every tile's `n` positions less those the last tile skips.
    fn products(n: usize, h: usize, w: usize) -> usize {
        let e = Edges::new(n, h, w);
        let axis = |(last, skip): (usize, u8)| (last + 1) * n - skip.count_ones() as usize;
        axis(e.row) * axis(e.col)
    }

    /// Where tile `t` lies: bit 0 set in the last tile row, bit 1 in the last column.
    #[inline(always)]
    fn class(self, t: usize, tw: usize) -> u8 {
        u8::from(t / tw == self.row.0) | u8::from(t % tw == self.col.0) << 1
    }

    /// The classes (see [`Edges::class`]) whose tiles skip position `(i, j)`, as bits to test
    /// a class against: per position, not per tile, so the products' tile lists cost no
    /// division (a `div` per tile and position was a fifth of 224x224 16->16's products).
    #[inline(always)]
    fn skipping(self, i: usize, j: usize) -> u8 {
        (self.row.1 >> i & 1) | (self.col.1 >> j & 1) << 1
    }

    /// Whether tile `t` has a product at position `(i, j)`.
    #[cfg(test)]
    fn uses(self, t: usize, tw: usize, i: usize, j: usize) -> bool {
        self.class(t, tw) & self.skipping(i, j) == 0
    }
}

/// A conv's kernels in the Winograd domain.
pub(super) struct Winograd {
    cin: usize,
    cout: usize,
    /// Output channels per group: 16, 32 or [`COLS`].
    cols: usize,
    /// `cout` rounded up to `cols`.
    cpad: usize,
    /// Input tile side: 4 for F(2x2, 3x3), 6 for F(4x4, 3x3).
    n: usize,
    /// `U = G g G^T` as `[cpad / cols][n * n][cin][cols]` (output group, position, input channel,
    /// output channel), zero-padded. Group-major, so a work item streams one contiguous block
    /// (measured against `[16][cin][cpad]`, whose rows it read 256 bytes in 2 KB: WAE-VGG16's
    /// 7x7 512->512 convs went from 2.09 to 1.16 ms, the whole net from 43 to 38 ms).
    u: Vec<f32>,
}

impl Winograd {
    /// Transforms kernels packed `[9 * cin, cout]` (row `(ky * 3 + kx) * cin + ci`) for input
    /// tiles of side `n` (4 or 6).
    pub(super) fn new(w: &[f32], cin: usize, cout: usize, n: usize) -> Winograd {
        assert!(n == 4 || n == 6, "Winograd tiles are 4x4 or 6x6");
        let cols = match cout {
            0..=16 => 16,
            17..=32 => 32,
            _ => COLS,
        };
        let cpad = cout.next_multiple_of(cols);
        let pos = n * n;
        let mut u = vec![0f32; pos * cin * cpad];
        // G applied to a column or a row of three taps; F(2x2): [[1, 0, 0], [1/2, 1/2, 1/2],
        // [1/2, -1/2, 1/2], [0, 0, 1]]; F(4x4): [[1/4, 0, 0], [-1/6, -1/6, -1/6],
        // [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]].
        let g4 = |a: f32, b: f32, c: f32| {
            if n == 4 {
                [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c, 0.0, 0.0]
            } else {
                [
                    a / 4.0,
                    -(a + b + c) / 6.0,
                    -(a - b + c) / 6.0,
                    a / 24.0 + b / 12.0 + c / 6.0,
                    a / 24.0 - b / 12.0 + c / 6.0,
                    c,
                ]
            }
        };
        // Output groups in parallel (each owns a contiguous block of `u`): VGG16's F(4x4)
        // kernels are 235 MB, and building them was most of its load time.
        u.par_chunks_mut(pos * cin * cols)
            .enumerate()
            .for_each(|(grp, ug)| {
                for co in grp * cols..cout.min((grp + 1) * cols) {
                    for ci in 0..cin {
                        let g = |ky: usize, kx: usize| w[((ky * 3 + kx) * cin + ci) * cout + co];
                        let gc: [[f32; 6]; 3] =
                            std::array::from_fn(|kx| g4(g(0, kx), g(1, kx), g(2, kx)));
                        for i in 0..n {
                            let row = g4(gc[0][i], gc[1][i], gc[2][i]);
                            for (j, v) in row.into_iter().take(n).enumerate() {
                                ug[((i * n + j) * cin + ci) * cols + co % cols] = v;
                            }
                        }
                    }
                }
            });
        Winograd {
            cin,
            cout,
            cols,
            cpad,
            n,
            u,
        }
    }

    /// Floats in the transformed kernels.
    pub(super) fn len(&self) -> usize {
        self.u.len()
    }

    /// Multiply-adds its products do on an `h x w` map (padding channels excluded): the work
    /// the transform leaves, to set against direct convolution's `h * w * 9 * cin * cout`.
    pub(super) fn multiplies(&self, h: usize, w: usize) -> usize {
        Edges::products(self.n, h, w) * self.cin * self.cout
    }

    /// Which transform, for profiles and tests' messages.
    pub(super) fn name(&self) -> &'static str {
        if self.n == 4 {
            "winograd F(2x2)"
        } else {
            "winograd F(4x4)"
        }
    }

    /// Positions in a transformed tile.
    fn pos(&self) -> usize {
        self.n * self.n
    }

    /// The conv of `x` (pad 1, stride 1) plus `bias`, ReLU'd if `relu`.
    pub(super) fn forward(&self, x: &Map, bias: &[f32], relu: bool, bufs: &Buffers) -> Map {
        if self.cin <= FUSED_MAX_CIN {
            return self.forward_fused(x, bias, relu, bufs);
        }
        let (th, tw) = (x.h.div_ceil(self.n - 2), x.w.div_ceil(self.n - 2));
        let pos = self.pos();
        let tiles = th * tw;
        let threads = rayon::current_num_threads().max(1);
        // Large maps go in spans of tiles whose transformed input stays in L2 between the two
        // phases (measured with the bigger blocks, in one change: 112x112 64->64 went from 3.3
        // to 2.7 ms, 56x56 128->128 from 3.1 to 2.3 ms).
        let span = (SPAN_BYTES / (4 * pos * self.cin)).max(2 * threads * TILES);
        let mut v = bufs.take(span.min(tiles) * pos * self.cin);
        let mut zeros = bufs.take(self.cin);
        zeros.fill(0.0);
        let mut out = bufs.map(x.h, x.w, self.cout);
        let dst = SendPtr(out.data.as_mut_ptr());
        for s0 in (0..tiles).step_by(span) {
            let n = span.min(tiles - s0);
            let v = &mut v[..n * pos * self.cin];
            self.input_phase(x, &zeros, tw, s0, v);
            self.product_phase(v, s0, n, tw, bias, relu, &dst, x, bufs);
        }
        bufs.give(zeros);
        bufs.give(v);
        out
    }

    /// Transforms input tiles `s0..` (as many as `v` holds) into `v`, in parallel.
    fn input_phase(&self, x: &Map, zeros: &[f32], tw: usize, s0: usize, v: &mut [f32]) {
        let arch = pulp::Arch::new();
        let n = v.len() / (self.pos() * self.cin);
        let per = (n / (2 * rayon::current_num_threads().max(1))).max(1);
        v.par_chunks_mut(per * self.pos() * self.cin)
            .enumerate()
            .for_each(|(b, vb)| {
                arch.dispatch(InputTiles {
                    n: self.n,
                    x,
                    zeros,
                    tw,
                    t0: s0 + b * per,
                    v: vb,
                })
            });
    }

    /// Products and the transform back for tiles `s0..s0 + n` (transformed in `v`), in
    /// parallel over blocks of tiles and groups of output channels.
    #[allow(clippy::too_many_arguments)]
    fn product_phase(
        &self,
        v: &[f32],
        s0: usize,
        n: usize,
        tw: usize,
        bias: &[f32],
        relu: bool,
        dst: &SendPtr,
        x: &Map,
        bufs: &Buffers,
    ) {
        let col_groups = self.cpad / self.cols;
        let block = self.block_for(n, col_groups);
        let items = n.div_ceil(block) * col_groups;
        (0..items).into_par_iter().for_each(|item| {
            let (tb, cg) = (item / col_groups, item % col_groups);
            let nt = block.min(n - tb * block);
            let per = self.pos() * self.cin;
            let v = &v[tb * block * per..][..nt * per];
            let (t0, c0) = (s0 + tb * block, cg * self.cols);
            self.item(v, t0, nt, c0, block, tw, bias, relu, dst, x, bufs);
        });
    }

    /// [`Winograd::forward`] for few input channels: each work item transforms its own block of
    /// tiles, so the transformed input never leaves the core's cache and a frame is one parallel
    /// loop, not two per span of tiles (224x224 16->16 has 25 spans).
    fn forward_fused(&self, x: &Map, bias: &[f32], relu: bool, bufs: &Buffers) -> Map {
        let tw = x.w.div_ceil(self.n - 2);
        let tiles = x.h.div_ceil(self.n - 2) * tw;
        let mut zeros = bufs.take(self.cin);
        zeros.fill(0.0);
        let mut out = bufs.map(x.h, x.w, self.cout);
        let dst = SendPtr(out.data.as_mut_ptr());
        let arch = pulp::Arch::new();
        let block = self.block_for(tiles, 1);
        (0..tiles.div_ceil(block)).into_par_iter().for_each(|tb| {
            let t0 = tb * block;
            let nt = block.min(tiles - t0);
            let mut v = bufs.take(nt * self.pos() * self.cin);
            arch.dispatch(InputTiles {
                n: self.n,
                x,
                zeros: &zeros,
                tw,
                t0,
                v: &mut v,
            });
            for c0 in (0..self.cpad).step_by(self.cols) {
                self.item(&v, t0, nt, c0, block, tw, bias, relu, &dst, x, bufs);
            }
            bufs.give(v);
        });
        bufs.give(zeros);
        out
    }

    /// Tiles per work item: as many as possible (each item reads its kernels once), but enough
    /// items for every core to have two, and all blocks of a span the same size.
    fn block_for(&self, n: usize, col_groups: usize) -> usize {
        let want = 2 * rayon::current_num_threads().max(1);
        // Where an item's kernels outgrow L2, reading them fewer times beats keeping the
        // products in L2 (measured, 28x28 512->512: 14.8 -> 11.0 ms with blocks of 196 tiles;
        // 56x56 256->256, with 1 MB of kernels per item, got 10% slower with bigger blocks).
        let cap = if self.pos() * self.cin * self.cols * 4 >= BIG_KERNELS {
            4 * TILES
        } else {
            TILES
        };
        // Equal blocks, not full ones and a runt that reads all its kernels for a few tiles
        // (measured, 28x28 256->256, 196 tiles as 4 x 49 instead of 3 x 64 + 4: 2.70 -> 2.26,
        // 2.69 -> 2.41 and 2.97 -> 2.69 ms in three sittings).
        let mut blocks = n.div_ceil(cap);
        while n.div_ceil(blocks) > 4 && blocks * col_groups < want {
            blocks += 1;
        }
        n.div_ceil(blocks)
    }

    /// One work item: the products of tiles `t0..t0 + nt` (transformed in `v`) with output
    /// channels `c0..c0 + cols`, transformed back into `dst`.
    #[allow(clippy::too_many_arguments)]
    fn item(
        &self,
        v: &[f32],
        t0: usize,
        nt: usize,
        c0: usize,
        block: usize,
        tw: usize,
        bias: &[f32],
        relu: bool,
        dst: &SendPtr,
        x: &Map,
        bufs: &Buffers,
    ) {
        let arch = pulp::Arch::new();
        // One spare row per position: with blocks of 64 tiles a position's products would
        // start every 4 KB (16 KB), so the 16 or 36 rows the transform back reads for one tile
        // would all fall in one L1 set (measured, 224x224 16->16: 0.88-0.97 -> 0.74-0.76 ms).
        let block = block + 1;
        let mut m = bufs.take(self.pos() * block * self.cols);
        let edges = Edges::new(self.n, x.h, x.w);
        arch.dispatch(Products {
            wg: self,
            v,
            t0,
            nt,
            tw,
            edges,
            c0,
            m: &mut m,
            block,
        });
        arch.dispatch(OutputTiles {
            wg: self,
            m: &m,
            block,
            t0,
            nt,
            c0,
            tw,
            bias,
            relu,
            out: dst,
            h: x.h,
            w: x.w,
            edges,
        });
        bufs.give(m);
    }
}

/// Transforms the `n x n` input tiles `t0..` (as many as `v` holds) to `V = B^T d B`, each
/// written `[n * n][cin]`, vectorised across channels (`B^T` in [`bt`]).
struct InputTiles<'a> {
    /// Tile side, 4 or 6.
    n: usize,
    x: &'a Map,
    /// `cin` zeros, read for taps outside the map.
    zeros: &'a [f32],
    /// Tiles per row.
    tw: usize,
    t0: usize,
    v: &'a mut [f32],
}

impl WithSimd for InputTiles<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        if self.n == 4 {
            input_tiles::<S, 4>(simd, self)
        } else {
            input_tiles::<S, 6>(simd, self)
        }
    }
}

#[inline(always)]
fn input_tiles<S: Simd, const N: usize>(simd: S, job: InputTiles<'_>) {
    let InputTiles {
        x,
        zeros,
        tw,
        t0,
        v,
        ..
    } = job;
    let c = x.c;
    let zero = simd.splat_f32s(0.0);
    let edges = Edges::new(N, x.h, x.w);
    for (k, vt) in v.chunks_exact_mut(N * N * c).enumerate() {
        let (ty, tx) = ((t0 + k) / tw, (t0 + k) % tw);
        let halved = edges.halved(t0 + k, tw);
        if halved != (false, false) {
            match halved {
                (true, false) => edge_input::<S, 4, 6>(simd, x, zeros, ty, tx, vt),
                (false, true) => edge_input::<S, 6, 4>(simd, x, zeros, ty, tx, vt),
                _ => edge_input::<S, 4, 4>(simd, x, zeros, ty, tx, vt),
            }
            continue;
        }
        let src = taps::<N, N>(x, zeros, (N - 2) * ty, (N - 2) * tx);
        let mut ch = 0;
        while ch < c {
            let n = S::F32_LANES.min(c - ch);
            // Closures and `array::from_fn` stay out of this loop: they are compiled
            // without the dispatched target features, so nothing inside them inlines. `e` is
            // written whole before it is read, and left uninitialised: zeroing its 36 vectors
            // was a `memset` per tile, 10% of a 16-channel conv.
            let mut e = [[MaybeUninit::<S::f32s>::uninit(); N]; N];
            for (j, ej) in e.iter_mut().enumerate() {
                let mut col = [zero; N];
                for (i, v) in col.iter_mut().enumerate() {
                    // SAFETY: every `src` points at `c` readable values and `ch + n <= c`.
                    *v = unsafe { load_at(simd, src[i][j].add(ch), n) };
                }
                // ej: column j of B^T d.
                for (d, v) in ej.iter_mut().zip(bt(simd, col)) {
                    d.write(v);
                }
            }
            // `i` picks a row of `e`'s columns and of `vt`'s positions alike.
            #[allow(clippy::needless_range_loop)]
            for i in 0..N {
                let mut row = [zero; N];
                for (j, r) in row.iter_mut().enumerate() {
                    // SAFETY: the loop above wrote every `e[j][i]`.
                    *r = unsafe { e[j][i].assume_init() };
                }
                for (j, val) in bt(simd, row).into_iter().enumerate() {
                    // SAFETY: `vt` holds `N * N * c` values (its chunk size) and `ch + n <= c`.
                    unsafe { store_at(simd, vt.as_mut_ptr().add((i * N + j) * c + ch), n, val) };
                }
            }
            ch += n;
        }
    }
}

/// Where each of a tile's `R x C` input taps has its channels: in the map, or in `zeros` outside
/// it, for the tile whose first output pixel is `(y0, x0)` (pad 1). Plain loops, not closures
/// (see `input_tiles`): this runs once per tile, and with 16 channels a tile's transform is only
/// a few dozen vector operations.
#[inline(always)]
fn taps<const R: usize, const C: usize>(
    x: &Map,
    zeros: &[f32],
    y0: usize,
    x0: usize,
) -> [[*const f32; C]; R] {
    let mut src = [[zeros.as_ptr(); C]; R];
    assert!(x.data.len() >= x.h * x.w * x.c);
    for (i, row) in src.iter_mut().enumerate() {
        let y = (y0 + i).wrapping_sub(1);
        if y >= x.h {
            continue;
        }
        // SAFETY: `y < h`, so the row starts inside the map (asserted above).
        let line = unsafe { x.data.as_ptr().add(y * x.w * x.c) };
        for (j, s) in row.iter_mut().enumerate() {
            let xx = (x0 + j).wrapping_sub(1);
            if xx < x.w {
                // SAFETY: `xx < w`: the pixel's `c` values lie inside the row.
                *s = unsafe { line.add(xx * x.c) };
            }
        }
    }
    src
}

/// The position on a 6-point axis of point `i` of an axis with `K` points (6, or F(2x2)'s 4).
#[inline(always)]
fn axis_pos<const K: usize>(i: usize) -> usize {
    if K == 6 {
        i
    } else {
        HALF[i]
    }
}

/// `B^T r` along an axis of `K` points: F(4x4)'s, or F(2x2)'s with F(4x4)'s kernel scale undone.
#[inline(always)]
fn bt_axis<S: Simd, const K: usize>(simd: S, r: [S::f32s; K]) -> [S::f32s; K] {
    let mut t = bt(simd, r);
    if K == 4 {
        for (v, s) in t.iter_mut().zip(HALF_UNSCALE) {
            *v = simd.mul_f32s(simd.splat_f32s(s), *v);
        }
    }
    t
}

/// [`input_tiles`] for an F(4x4) tile with `R` rows and `C` columns of input (6, or 4 on a halved
/// axis, see [`Edges`]): writes the positions its products use and leaves the rest.
#[inline(always)]
fn edge_input<S: Simd, const R: usize, const C: usize>(
    simd: S,
    x: &Map,
    zeros: &[f32],
    ty: usize,
    tx: usize,
    vt: &mut [f32],
) {
    let c = x.c;
    let zero = simd.splat_f32s(0.0);
    let src = taps::<R, C>(x, zeros, 4 * ty, 4 * tx);
    let mut ch = 0;
    while ch < c {
        let n = S::F32_LANES.min(c - ch);
        // e[j]: column j of B^T d.
        let mut e = [[zero; R]; C];
        for (j, ej) in e.iter_mut().enumerate() {
            let mut col = [zero; R];
            for (i, v) in col.iter_mut().enumerate() {
                // SAFETY: every `src` points at `c` readable values and `ch + n <= c`.
                *v = load(simd, unsafe {
                    std::slice::from_raw_parts(src[i][j].add(ch), n)
                });
            }
            *ej = bt_axis(simd, col);
        }
        for i in 0..R {
            let mut row = [zero; C];
            for (r, ej) in row.iter_mut().zip(&e) {
                *r = ej[i];
            }
            for (j, val) in bt_axis(simd, row).into_iter().enumerate() {
                let at = axis_pos::<R>(i) * 6 + axis_pos::<C>(j);
                store(simd, &mut vt[at * c + ch..][..n], val);
            }
        }
        ch += n;
    }
}

/// Transforms products `m` (`[n * n][block][cols]`) of tiles `t0..t0 + nt` back to output
/// pixels, channels `c0..c0 + cols` (clipped to `cout`), with bias and ReLU (`A^T` in [`at`],
/// on both sides).
struct OutputTiles<'a> {
    wg: &'a Winograd,
    m: &'a [f32],
    block: usize,
    t0: usize,
    nt: usize,
    c0: usize,
    /// Tiles per row.
    tw: usize,
    bias: &'a [f32],
    relu: bool,
    /// The `h x w x cout` output; this item alone writes its tiles' pixels in its channels.
    out: &'a SendPtr,
    h: usize,
    w: usize,
    edges: Edges,
}

impl WithSimd for OutputTiles<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        if self.wg.n == 4 {
            output_tiles::<S, 4, 2>(simd, self)
        } else {
            output_tiles::<S, 6, 4>(simd, self)
        }
    }
}

#[inline(always)]
fn output_tiles<S: Simd, const N: usize, const M: usize>(simd: S, job: OutputTiles<'_>) {
    let OutputTiles {
        wg,
        m,
        block,
        t0,
        nt,
        c0,
        tw,
        bias,
        relu,
        out,
        h,
        w,
        edges,
    } = job;
    let (cols, n) = (wg.cols, wg.cols.min(wg.cout - c0));
    assert!(nt < block && m.len() >= N * N * block * cols);
    let zero = simd.splat_f32s(0.0);
    for p in 0..nt {
        let (ty, tx) = ((t0 + p) / tw, (t0 + p) % tw);
        let halved = edges.halved(t0 + p, tw);
        if halved != (false, false) {
            let tile = EdgeTile {
                m,
                block,
                p,
                cols,
                c0,
                n,
                bias,
                relu,
                out,
                cout: wg.cout,
                y0: 4 * ty,
                x0: 4 * tx,
                h,
                w,
            };
            match halved {
                (true, false) => edge_output::<S, 4, 6, 2, 4>(simd, tile),
                (false, true) => edge_output::<S, 6, 4, 4, 2>(simd, tile),
                _ => edge_output::<S, 4, 4, 2, 2>(simd, tile),
            }
            continue;
        }
        let mut c = 0;
        while c < n {
            let k = S::F32_LANES.min(n - c);
            let b = load(simd, &bias[c0 + c..][..k]);
            // No closures here either (see `input_tiles`).
            // s = A^T M, M x N, a column at a time (uninitialised until then, as `e` in
            // `input_tiles`).
            let mut s = [[MaybeUninit::<S::f32s>::uninit(); N]; M];
            // `col` picks a column of `m`'s positions and of `s` alike.
            #[allow(clippy::needless_range_loop)]
            for col in 0..N {
                let mut r = [zero; N];
                for (a, v) in r.iter_mut().enumerate() {
                    // SAFETY: `m` holds `N * N * block * cols` values (checked above), `p <
                    // block` and `c + k <= cols`.
                    *v = unsafe {
                        load_at(
                            simd,
                            m.as_ptr().add(((a * N + col) * block + p) * cols + c),
                            k,
                        )
                    };
                }
                let r: [S::f32s; M] = at(simd, r);
                for (i, v) in r.into_iter().enumerate() {
                    s[i][col].write(v);
                }
            }
            for (i, srow) in s.iter().enumerate() {
                let mut row = [zero; N];
                for (d, v) in row.iter_mut().zip(srow) {
                    // SAFETY: the loop above wrote every `s[i][col]`.
                    *d = unsafe { v.assume_init() };
                }
                let r: [S::f32s; M] = at(simd, row);
                for (j, val) in r.into_iter().enumerate() {
                    let (y, xx) = (M * ty + i, M * tx + j);
                    if y < h && xx < w {
                        let at = (y * w + xx) * wg.cout + c0 + c;
                        // SAFETY: the pixel is inside the map and channels c0 + c.. c0 + c + k
                        // inside cout; no other item writes them (see the struct).
                        unsafe { write_pixel(simd, out, at, k, val, b, relu) };
                    }
                }
            }
            c += k;
        }
    }
}

/// Adds `bias` to one output pixel's `k` channels, applies ReLU if `relu`, and stores them at
/// `out + at`.
///
/// # Safety
/// `out + at .. out + at + k` must lie inside the output, and no other thread may write it.
#[inline(always)]
unsafe fn write_pixel<S: Simd>(
    simd: S,
    out: &SendPtr,
    at: usize,
    k: usize,
    val: S::f32s,
    bias: S::f32s,
    relu: bool,
) {
    let mut val = simd.add_f32s(val, bias);
    if relu {
        val = simd.max_f32s(val, simd.splat_f32s(0.0));
    }
    // SAFETY: the caller's contract.
    let px = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), k) };
    store(simd, px, val);
}

/// One F(4x4) tile with halved axes for [`edge_output`].
struct EdgeTile<'a> {
    m: &'a [f32],
    block: usize,
    /// The tile's row in `m`'s blocks.
    p: usize,
    cols: usize,
    c0: usize,
    /// Output channels in this group (`cols`, clipped to `cout`).
    n: usize,
    bias: &'a [f32],
    relu: bool,
    out: &'a SendPtr,
    cout: usize,
    /// The tile's first output pixel.
    y0: usize,
    x0: usize,
    h: usize,
    w: usize,
}

/// [`output_tiles`] for an F(4x4) tile with `R x C` products (6, or 4 on a halved axis) and
/// `MR x MC` outputs.
#[inline(always)]
fn edge_output<S: Simd, const R: usize, const C: usize, const MR: usize, const MC: usize>(
    simd: S,
    t: EdgeTile<'_>,
) {
    let zero = simd.splat_f32s(0.0);
    let mut c = 0;
    while c < t.n {
        let k = S::F32_LANES.min(t.n - c);
        let b = load(simd, &t.bias[t.c0 + c..][..k]);
        // s = A^T M down the columns, then A^T along each row.
        let mut s = [[zero; C]; MR];
        for col in 0..C {
            let mut r = [zero; R];
            for (a, v) in r.iter_mut().enumerate() {
                let at = axis_pos::<R>(a) * 6 + axis_pos::<C>(col);
                *v = load(simd, &t.m[(at * t.block + t.p) * t.cols + c..][..k]);
            }
            let r: [S::f32s; MR] = at(simd, r);
            for (si, v) in s.iter_mut().zip(r) {
                si[col] = v;
            }
        }
        for (i, row) in s.into_iter().enumerate() {
            let r: [S::f32s; MC] = at(simd, row);
            for (j, val) in r.into_iter().enumerate() {
                let (y, xx) = (t.y0 + i, t.x0 + j);
                if y < t.h && xx < t.w {
                    let at = (y * t.w + xx) * t.cout + t.c0 + c;
                    // SAFETY: as in `output_tiles`.
                    unsafe { write_pixel(simd, t.out, at, k, val, b, t.relu) };
                }
            }
        }
        c += k;
    }
}

/// A vector from `s` (up to one vector's worth, zero-filled): pulp's partial loads are calls
/// into the crate, so whole vectors take the plain path.
#[inline(always)]
pub(super) fn load<S: Simd>(simd: S, s: &[f32]) -> S::f32s {
    assert!(s.len() <= S::F32_LANES);
    // SAFETY: `s` holds `s.len()` readable floats, at most a vector's worth.
    unsafe { load_at(simd, s.as_ptr(), s.len()) }
}

/// [`load`] of `n` floats at `p`, for callers that checked their bounds once for many vectors (a
/// 16-channel tile's input transform does 36 loads and 36 stores for 576 products).
///
/// # Safety
/// `p` must point at `n` readable floats, `n <= S::F32_LANES`.
#[inline(always)]
unsafe fn load_at<S: Simd>(simd: S, p: *const f32, n: usize) -> S::f32s {
    if n == S::F32_LANES {
        p.cast::<S::f32s>().read_unaligned()
    } else {
        simd.partial_load_f32s(std::slice::from_raw_parts(p, n))
    }
}

/// [`store`] of `n` floats at `p` (see [`load_at`]).
///
/// # Safety
/// `p` must point at `n` writable floats that nothing else reads or writes meanwhile,
/// `n <= S::F32_LANES`.
#[inline(always)]
unsafe fn store_at<S: Simd>(simd: S, p: *mut f32, n: usize, v: S::f32s) {
    if n == S::F32_LANES {
        p.cast::<S::f32s>().write_unaligned(v)
    } else {
        simd.partial_store_f32s(std::slice::from_raw_parts_mut(p, n), v)
    }
}

/// Stores the first `s.len()` lanes of `v` into `s` (see [`load`]).
#[inline(always)]
pub(super) fn store<S: Simd>(simd: S, s: &mut [f32], v: S::f32s) {
    assert!(s.len() <= S::F32_LANES);
    // SAFETY: `s` is `s.len()` writable floats, at most a vector's worth, borrowed mutably.
    unsafe { store_at(simd, s.as_mut_ptr(), s.len(), v) }
}

/// `B^T r` for a column `r` of `N` vectors. F(2x2): B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
/// [0, -1, 1, 0], [0, 1, 0, -1]]. F(4x4): B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
/// [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
#[inline(always)]
fn bt<S: Simd, const N: usize>(simd: S, r: [S::f32s; N]) -> [S::f32s; N] {
    let mut t = r;
    if N == 4 {
        t[0] = simd.sub_f32s(r[0], r[2]);
        t[1] = simd.add_f32s(r[1], r[2]);
        t[2] = simd.sub_f32s(r[2], r[1]);
        t[3] = simd.sub_f32s(r[1], r[3]);
    } else {
        let (four, minus4, minus5) = (
            simd.splat_f32s(4.0),
            simd.splat_f32s(-4.0),
            simd.splat_f32s(-5.0),
        );
        let a = simd.mul_add_f32s(minus4, r[2], r[4]);
        let b = simd.mul_add_f32s(minus4, r[1], r[3]);
        let c = simd.sub_f32s(r[4], r[2]);
        let d = simd.sub_f32s(r[3], r[1]);
        let d = simd.add_f32s(d, d);
        t[0] = simd.mul_add_f32s(four, r[0], simd.mul_add_f32s(minus5, r[2], r[4]));
        t[1] = simd.add_f32s(a, b);
        t[2] = simd.sub_f32s(a, b);
        t[3] = simd.add_f32s(c, d);
        t[4] = simd.sub_f32s(c, d);
        t[5] = simd.mul_add_f32s(four, r[1], simd.mul_add_f32s(minus5, r[3], r[5]));
    }
    t
}

/// `A^T r` for a column `r` of `N` vectors, `M = N - 2` out. F(2x2): A^T = [[1, 1, 1, 0],
/// [0, 1, -1, -1]]. F(4x4): A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
#[inline(always)]
fn at<S: Simd, const N: usize, const M: usize>(simd: S, r: [S::f32s; N]) -> [S::f32s; M] {
    let mut s = [simd.splat_f32s(0.0); M];
    if N == 4 {
        s[0] = simd.add_f32s(simd.add_f32s(r[0], r[1]), r[2]);
        s[1] = simd.sub_f32s(simd.sub_f32s(r[1], r[2]), r[3]);
    } else {
        let p = simd.add_f32s(r[1], r[2]);
        let q = simd.sub_f32s(r[1], r[2]);
        let u = simd.add_f32s(r[3], r[4]);
        let v = simd.sub_f32s(r[3], r[4]);
        s[0] = simd.add_f32s(simd.add_f32s(r[0], p), u);
        s[1] = simd.mul_add_f32s(simd.splat_f32s(2.0), v, q);
        s[2] = simd.mul_add_f32s(simd.splat_f32s(4.0), u, p);
        s[3] = simd.add_f32s(simd.mul_add_f32s(simd.splat_f32s(8.0), v, q), r[5]);
    }
    s
}

/// The `n * n` products of one work item: its `nt` tiles, output channels `c0..c0 + cols`.
struct Products<'a> {
    wg: &'a Winograd,
    /// The item's transformed input tiles, `[nt][n * n][cin]`.
    v: &'a [f32],
    /// The first tile's index in the map, for [`Edges`].
    t0: usize,
    nt: usize,
    /// Tiles per row.
    tw: usize,
    edges: Edges,
    c0: usize,
    /// `[n * n][block][cols]` (`block` includes the spare row, see [`Winograd::item`]).
    m: &'a mut [f32],
    block: usize,
}

impl WithSimd for Products<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // P tiles x V vectors of accumulators: about 16 of AVX-512's 32 vector registers, or 8
        // where vectors are narrower: AVX2's 16 registers, and NEON's 4-lane ones (aarch64 has
        // 32 of them, so NEON could hold more; that is tuning for real hardware, not qemu).
        let vecs = (self.wg.cols / S::F32_LANES).clamp(1, 4);
        match (S::F32_LANES >= 16, vecs) {
            (true, 4) => products::<S, 4, 4>(simd, self),
            (true, 2) => products::<S, 6, 2>(simd, self),
            (true, _) => products::<S, 8, 1>(simd, self),
            (false, 4) => products::<S, 2, 4>(simd, self),
            (false, 2) => products::<S, 4, 2>(simd, self),
            (false, _) => products::<S, 6, 1>(simd, self),
        }
    }
}

#[inline(always)]
fn products<S: Simd, const P: usize, const V: usize>(simd: S, job: Products<'_>) {
    let Products {
        wg,
        v,
        t0,
        nt,
        tw,
        edges,
        c0,
        m,
        block,
    } = job;
    let (cin, cols) = (wg.cin, wg.cols);
    let width = V * S::F32_LANES;
    let pos = wg.pos();
    let panel = cin * cols;
    // Kernels too big to stay in cache come from memory: the first pass over a position's panel
    // would wait for them, and the later passes (more tiles) read it from L2 and leave memory
    // idle. So every pass prefetches a share of the next position's panel into L2, spread over
    // its input channels, and memory streams while the FMAs run (measured inside WAE-VGG16,
    // three alternating pairs: 14x14 256->512 1.31-1.34 -> 1.01-1.31 ms, 14x14 512->512
    // 2.2-2.7 -> 2.0-2.4 ms, the deep stages 13.0-14.3 -> 11.9-13.5 ms, in a sitting with
    // other tenants on the memory bus; an earlier prefetch of only the next panel had shown no
    // change on the whole network).
    let lines = panel / LINE_FLOATS;
    // The tiles with a product at the current position (see `Edges`).
    let mut list = [0u16; 4 * TILES];
    assert!(
        nt <= list.len(),
        "a block holds at most {} tiles",
        list.len()
    );
    // What `group` reads and writes without bounds checks.
    assert!(v.len() >= nt * pos * cin && m.len() >= pos * block * cols && nt < block);
    let mut class = [0u8; 4 * TILES];
    for (t, c) in class[..nt].iter_mut().enumerate() {
        *c = edges.class(t0 + t, tw);
    }
    for xi in 0..pos {
        let skipping = edges.skipping(xi / wg.n, xi % wg.n);
        let mut len = 0;
        for (t, &c) in class[..nt].iter().enumerate() {
            if c & skipping == 0 {
                list[len] = t as u16;
                len += 1;
            }
        }
        if len == 0 {
            continue;
        }
        let list = &list[..len];
        let passes = len.div_ceil(P) * cols.div_ceil(width);
        let prefetch = panel * pos * 4 >= BIG_KERNELS && passes > 1;
        let per_ci = lines.div_ceil(passes * cin);
        let u = &wg.u[((c0 / cols) * pos + xi) * panel..][..panel];
        let next = if prefetch && xi + 1 < pos {
            Some(wg.u[((c0 / cols) * pos + xi + 1) * panel..][..panel].as_ptr())
        } else {
            None
        };
        let mut line = 0;
        let mut p0 = 0;
        while p0 < len {
            let np = P.min(len - p0);
            let g = Group {
                tiles: &list[p0..p0 + np],
                u,
                v,
                pos,
                xi,
                cin,
                cols,
                m: &mut *m,
                block,
                next,
                per_ci,
                lines,
            };
            // A short last group runs a kernel of its own size (1-3 tiles) rather than
            // multiply repeats of its last tile: 28x28 maps make blocks of 49 tiles.
            match np {
                1 => group::<S, 1, V>(simd, g, &mut line),
                2 => group::<S, 2, V>(simd, g, &mut line),
                3 => group::<S, 3, V>(simd, g, &mut line),
                _ => group::<S, P, V>(simd, g, &mut line),
            }
            p0 += np;
        }
    }
}

/// One group of tiles at one position for [`products`]: their products with the position's
/// kernel panel, all of the item's output channels.
struct Group<'a> {
    /// The tiles, at most the kernel's `G`; a shorter group repeats its last tile.
    tiles: &'a [u16],
    /// The position's kernel panel, `[cin][cols]`.
    u: &'a [f32],
    v: &'a [f32],
    pos: usize,
    xi: usize,
    cin: usize,
    cols: usize,
    m: &'a mut [f32],
    block: usize,
    /// The next position's panel, to prefetch `per_ci` lines of per input channel, up to
    /// `lines` in all (see [`products`]).
    next: Option<*const f32>,
    per_ci: usize,
    lines: usize,
}

#[inline(always)]
fn group<S: Simd, const G: usize, const V: usize>(simd: S, g: Group<'_>, line: &mut usize) {
    let Group {
        tiles,
        u,
        v,
        pos,
        xi,
        cin,
        cols,
        m,
        block,
        next,
        per_ci,
        lines,
    } = g;
    let np = tiles.len();
    let width = V * S::F32_LANES;
    let zero = simd.splat_f32s(0.0);
    // A plain loop, not `array::from_fn` (see `input_tiles`): with 16 input channels this runs
    // once per 128 multiply-adds.
    let mut rows = [v.as_ptr(); G];
    for (p, r) in rows.iter_mut().enumerate() {
        let t = tiles[p.min(np - 1)] as usize;
        debug_assert!((t * pos + xi + 1) * cin <= v.len());
        // SAFETY: `products` checked that `v` holds every listed tile's `pos * cin` values.
        *r = unsafe { v.as_ptr().add((t * pos + xi) * cin) };
    }
    let mut c = 0;
    while c < cols {
        let mut acc = [[zero; V]; G];
        let uc = u[c..][..(cin - 1) * cols + width].as_ptr();
        for ci in 0..cin {
            if let Some(next) = next {
                for _ in 0..per_ci {
                    if *line < lines {
                        // SAFETY: `line * LINE_FLOATS < panel`, inside the next panel; a
                        // prefetch never faults anyway.
                        prefetch_l2(unsafe { next.add(*line * LINE_FLOATS) });
                        *line += 1;
                    }
                }
            }
            // SAFETY: `ci * cols + width` is within `uc`'s slice, checked above.
            let w = unsafe { std::slice::from_raw_parts(uc.add(ci * cols), width) };
            let (w, _) = S::as_simd_f32s(w);
            for p in 0..G {
                // SAFETY: each row holds `cin` values and `ci < cin`.
                let xv = simd.splat_f32s(unsafe { *rows[p].add(ci) });
                for k in 0..V {
                    acc[p][k] = simd.mul_add_f32s(xv, w[k], acc[p][k]);
                }
            }
        }
        for (a, &t) in acc.iter().zip(tiles) {
            let at = (xi * block + t as usize) * cols + c;
            debug_assert!(at + width <= m.len());
            // SAFETY: `products` checked that `m` holds `pos * block * cols` values, and
            // `t < block`, `c + width <= cols`.
            let dst = unsafe { m.as_mut_ptr().add(at) }.cast::<S::f32s>();
            for (k, &v) in a.iter().enumerate() {
                // SAFETY: as above, `V` vectors of `width` floats in all.
                unsafe { dst.add(k).write_unaligned(v) };
            }
        }
        c += width;
    }
}

/// Floats per 64-byte cache line, the step of [`prefetch_l2`] over a kernel panel.
const LINE_FLOATS: usize = 64 / 4;

/// Asks for the cache line at `p` in L2 (a hint: no effect where the CPU has no such
/// instruction).
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64, and a prefetch never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::Edges;

    #[test]
    fn products_count_the_positions_each_tile_uses() {
        for n in [4, 6] {
            for h in 1..=19usize {
                for w in [1usize, 2, 3, 4, 5, 6, 7, 14, 17] {
                    let (th, tw) = (h.div_ceil(n - 2), w.div_ceil(n - 2));
                    let e = Edges::new(n, h, w);
                    let used = (0..th * tw)
                        .flat_map(|t| (0..n * n).map(move |p| (t, p)))
                        .filter(|&(t, p)| e.uses(t, tw, p / n, p % n))
                        .count();
                    assert_eq!(Edges::products(n, h, w), used, "n {n}, {h}x{w}");
                }
            }
        }
        // Per channel pair: 14x14 in F(4x4) with halved edge tiles, 7x7 in F(2x2) without the
        // point at infinity on its last tiles, 28x28 in whole tiles.
        assert_eq!(Edges::products(6, 14, 14), 484);
        assert_eq!(Edges::products(4, 7, 7), 225);
        assert_eq!(Edges::products(6, 28, 28), 49 * 36);
    }
}
