//! A 3x3 conv (pad 1) and the choice of kernel that runs it: Winograd for stride-1 convs with
//! enough channels (`winograd.rs`), the direct kernel for few channels (`direct.rs`), and
//! otherwise im2col + GEMM (`im2col.rs`). Kernels are laid out once, at load, for the kernel
//! chosen.

use super::direct::{DIRECT_MAX_CIN, DIRECT_MIN_COUT, DIRECT_PAD};
use super::winograd::Winograd;
use super::{Buffers, Map};
use crate::weights::{ModelFile, WeightsError};

/// A 3x3 conv (pad 1) with packed weights.
pub(super) struct Conv3 {
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) stride: usize,
    pub(super) relu: bool,
    /// `[9 * cin, cout]`, row `(ky * 3 + kx) * cin + ci`.
    pub(super) w: Vec<f32>,
    pub(super) b: Vec<f32>,
    /// `[9 * cin, cout rounded up to DIRECT_PAD]` for the direct kernel, else empty.
    pub(super) wd: Vec<f32>,
    /// The kernels in the Winograd domain, where that form runs this conv.
    pub(super) winograd: Option<Winograd>,
}

/// Stride-1 convs with at least this many inputs and outputs run in the Winograd domain;
/// `WAE_EDGE_NO_WINOGRAD=1` turns it off, for comparisons. With F(4x4, 3x3) this pays from 16
/// input channels on (measured, 224x224 16->16: 1.26 ms direct, 1.11 ms; 56x56 16->32: 231
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
pub(super) struct Packed {
    cin: usize,
    cout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Packed {
    pub(super) fn load(file: &ModelFile, at: &str) -> Result<Packed, WeightsError> {
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
    pub(super) fn concat(self, other: Packed) -> Packed {
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
    pub(super) fn build(self, stride: usize, relu: bool, side: usize) -> Conv3 {
        Conv3::new(self.cin, self.cout, stride, relu, self.w, self.b, side)
    }
}

/// The output side of a 3x3 conv with padding 1 on a side of `n`.
pub(super) fn out_side(n: usize, stride: usize) -> usize {
    (n + 2 - 3) / stride + 1
}

impl Conv3 {
    pub(super) fn load(
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
    pub(super) fn new(
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
    pub(super) fn weight_bytes(&self) -> usize {
        let wg = self.winograd.as_ref().map_or(0, |wg| wg.len());
        4 * (self.w.len() + self.wd.len() + wg + self.b.len())
    }

    /// Multiply-adds one pass on an `h x w` input does: Winograd's products, or direct
    /// convolution's `9 * cin * cout` per output pixel.
    pub(super) fn multiplies(&self, h: usize, w: usize) -> usize {
        match &self.winograd {
            Some(wg) => wg.multiplies(h, w),
            None => out_side(h, self.stride) * out_side(w, self.stride) * 9 * self.cin * self.cout,
        }
    }

    /// Which kernel runs this conv.
    pub(super) fn kernel(&self) -> &'static str {
        match (&self.winograd, self.wd.is_empty()) {
            (Some(wg), _) => wg.name(),
            (None, false) => "direct",
            (None, true) => "im2col + gemm",
        }
    }

    /// This conv applied to `x`, by the kernel chosen at load.
    pub(super) fn forward(&self, x: &Map, bufs: &Buffers) -> Map {
        if !self.wd.is_empty() {
            return self.direct(x, bufs);
        }
        if let Some(wg) = &self.winograd {
            return wg.forward(x, &self.b, self.relu, bufs);
        }
        self.im2col_gemm(x, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::buffers::tests::poisoned;

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
}
