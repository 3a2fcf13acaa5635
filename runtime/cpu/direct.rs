//! The direct 3x3 conv kernel for few channels: accumulators for a group of pixels and output
//! channels stay in registers while each input value is broadcast against a packed weight row.

use pulp::{Simd, WithSimd};

use super::winograd;
use super::{band_rows, for_each_chunk, out_side, Buffers, Conv3, Map};

/// Convs that Winograd does not take, with at most this many input channels or fewer than
/// [`DIRECT_MIN_COUT`] outputs, run the direct kernel: with K = 9 * cin this small, im2col +
/// GEMM is mostly copying and packing (measured: 28x28 1->16 takes 35 us that way, 9 us direct;
/// 224x224 16->16 takes 2.25 ms against 1.8 ms direct).
pub(super) const DIRECT_MAX_CIN: usize = 16;
pub(super) const DIRECT_MIN_COUT: usize = 16;
/// The direct kernel's weight rows are padded to a multiple of this many channels, so a pass
/// of two SIMD vectors (up to 16 lanes each, AVX-512) never reads past a row.
pub(super) const DIRECT_PAD: usize = 32;
/// Accumulators per direct-kernel pass, in registers: 4 pixels x 2 vectors of output
/// channels, or 8 pixels x 1.
const DIRECT_ACCS: usize = 8;

impl Conv3 {
    /// The direct kernel, output rows split across threads when the conv is big enough to pay
    /// for it. Each band of rows first copies the input rows it reads into a zero-padded buffer
    /// of its own, so the copy runs on all cores and stays in cache (measured against one padded
    /// copy of the whole map made up front on one thread, 224x224 16->6 stride 2: 357 -> 217 us,
    /// 224x224 3->16: 338 -> 259 us).
    pub(super) fn direct(&self, x: &Map, bufs: &Buffers) -> Map {
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
