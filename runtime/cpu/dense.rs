//! Fully connected layers: small ones in f32 through GEMM, large ones as a GEMV over the file's
//! f16 weights widened on the fly, row groups on all cores (at batch 1 they are bound by memory).

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::{gemm_into, View};
use crate::weights::{ModelFile, WeightsError};

/// A fully connected layer, weights `[out, in]` as stored: f32 when small, else the file's f16.
pub(super) struct Dense {
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

impl Dense {
    pub(super) fn load(file: &ModelFile, at: &str) -> Result<Dense, WeightsError> {
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
    pub(super) fn permute_from_nchw(&mut self, c: usize, hw: usize) {
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

/// The layers in turn, ReLU between them (not after the last).
pub(super) fn mlp(layers: &[Dense], x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    for (i, l) in layers.iter().enumerate() {
        x = l.forward(&x, i + 1 < layers.len());
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

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
