//! 2x2 windows: max pooling after each stage, and the fixed 2x2 splits (average for the naive
//! half-resolution baseline, the four Haar bands) that stand in for the learned encoder.

use super::{band_rows, for_each_chunk, Buf, Buffers, Map, COPY_SPLIT_MIN};

/// A side of `n` after [`max_pool`].
pub(super) fn pooled(n: usize, ceil: bool) -> usize {
    if ceil {
        n.div_ceil(2)
    } else {
        n / 2
    }
}

/// 2x2/2 max-pool; `ceil` keeps a clipped window at odd edges (Caffe/ONNX ceil mode).
pub(super) fn max_pool(x: &Map, ceil: bool, bufs: &Buffers) -> Map {
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
pub(super) fn split_2x2(x: &Map, haar: bool, bufs: &Buffers) -> (Map, Option<Map>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::buffers::tests::poisoned;

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
}
