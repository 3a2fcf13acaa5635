//! Custom candle ops that make training on the CPU faster. They compute what candle's own ops
//! compute (the tests below compare values and gradients); only the work differs.
//!
//! - [`conv3x3_train`]: a 3x3, padding-1 convolution. Its output, input gradient and kernel
//!   gradient each run as one im2col (row copies at stride 1) and one GEMM per image; at stride
//!   2 (the encoder's split) the input gradient is scattered back (col2im).
//!   candle computes the input gradient with `conv_transpose2d`, on the CPU a scalar loop over
//!   output pixels, and the kernel gradient as a convolution with a 3x3 output, whose GEMMs are
//!   skinny and whose im2col is a scalar gather.
//! - [`batch_norm_train`]: training-mode batch norm, with the following ReLU fused, as two passes
//!   over the activations forward and two backward. candle_nn's version is about 15 tensor ops
//!   with a transposed copy each way, and ReLU's backward three more; at batch 128 they cost as
//!   much as the convolution before them.
//!
//! Together they make a batch-128 training step of the Fashion-MNIST WAE 2.7-2.8x faster
//! (`cargo bench --bench train_step`). The decoder's transposed convolution still runs through
//! candle's scalar `conv_transpose2d`.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var,
};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_nn::BatchNorm;
use rayon::prelude::*;

use crate::cpu::{gemm_into, View};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns these ops on (the default) or off, falling back to candle's own: for side-by-side
/// measurements (`cargo bench --bench train_step`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether these ops apply to a tensor: on the CPU, in f32, and not switched off.
fn applies(xs: &Tensor) -> bool {
    ENABLED.load(Ordering::Relaxed) && xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// The contiguous f32 data behind a custom op's input.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: inputs must be contiguous")
    };
    Ok(&data[start..end])
}

/// (batch, channels, pixels per channel) of an NCHW layout.
fn nchw(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = layout.shape().dims4()?;
    Ok((b, c, h * w))
}

/// Writes the im2col matrix of one CHW image for a 3x3 "same" convolution into `cols`, as
/// (9 c) x (h w) row-major: row `(ch, ky, kx)` is channel `ch` shifted by `(ky - 1, kx - 1)`,
/// zero outside the image. Every value is written, so `cols` can be reused unzeroed.
fn im2col_image(x: &[f32], c: usize, h: usize, w: usize, cols: &mut [f32]) {
    for (row, plane) in cols[..9 * c * h * w].chunks_mut(h * w).enumerate() {
        let (ch, ky, kx) = (row / 9, row % 9 / 3, row % 3);
        let src = &x[ch * h * w..][..h * w];
        for (y, out) in plane.chunks_mut(w).enumerate() {
            let Some(sy) = (y + ky).checked_sub(1).filter(|&sy| sy < h) else {
                out.fill(0.0);
                continue;
            };
            let src = &src[sy * w..][..w];
            match kx {
                0 => {
                    out[0] = 0.0;
                    out[1..].copy_from_slice(&src[..w - 1]);
                }
                1 => out.copy_from_slice(src),
                _ => {
                    out[..w - 1].copy_from_slice(&src[1..]);
                    out[w - 1] = 0.0;
                }
            }
        }
    }
}

/// A 3x3 convolution with padding 1 of NCHW `x` with an OIHW kernel, no bias: one im2col and
/// one GEMM per image, images in parallel, so each image's 9 C x HoWo matrix stays in the
/// core's L2.
struct Conv3x3 {
    stride: usize,
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let kernel = f32_data(s2, l2, self.name())?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (c_out, k_in, ..) = l2.shape().dims4()?;
        if k_in != c || l2.shape().dims()[2..] != [3, 3] || h == 0 || w == 0 {
            bail!(
                "conv3x3: kernel {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let s = self.stride;
        let (ho, wo) = (strided_out(h, s), strided_out(w, s));
        let (k, hwo) = (9 * c, ho * wo);
        let mut ys = vec![0f32; b * c_out * hwo];
        if !ys.is_empty() && k > 0 {
            let weights = View {
                data: kernel,
                row_stride: k,
                col_stride: 1,
            };
            ys.par_chunks_mut(c_out * hwo)
                .zip(x.par_chunks(c * h * w))
                .for_each_init(
                    || vec![0f32; k * hwo],
                    |cols, (ys, x)| {
                        im2col(x, c, h, w, s, cols);
                        let cols = View {
                            data: cols,
                            row_stride: hwo,
                            col_stride: 1,
                        };
                        gemm_into(ys, c_out, hwo, k, weights, cols, false);
                    },
                );
        }
        Ok((CpuStorage::F32(ys), Shape::from((b, c_out, ho, wo))))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        kernel: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Skipped for an input that needs none (the first conv after a frozen encoder).
        let grad_xs = match (xs.track_op(), self.stride) {
            (false, _) => None,
            // At stride 1 the input gradient is the convolution of the output gradient with the
            // kernel flipped and its channel axes swapped.
            (true, 1) => {
                let flipped = kernel.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
                Some(grad.apply_op2_no_bwd(&flipped, &Conv3x3 { stride: 1 })?)
            }
            (true, stride) => {
                let op = Conv3x3StridedInputGrad {
                    stride,
                    shape: xs.shape().clone(),
                };
                Some(grad.apply_op2_no_bwd(kernel, &op)?)
            }
        };
        let op = Conv3x3KernelGrad {
            stride: self.stride,
        };
        let grad_kernel = xs.apply_op2_no_bwd(&grad, &op)?;
        Ok((grad_xs, Some(grad_kernel)))
    }
}

/// The kernel gradient of [`Conv3x3`], (x, dy) -> dW: the sum over images of dY_b (C_out x HoWo) * im2col(x_b)^T, each thread summing its own images.
struct Conv3x3KernelGrad {
    stride: usize,
}

impl CustomOp2 for Conv3x3KernelGrad {
    fn name(&self) -> &'static str {
        "conv3x3-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (b2, c_out, h2, w2) = l2.shape().dims4()?;
        let s = self.stride;
        if h == 0 || w == 0 || (b2, h2, w2) != (b, strided_out(h, s), strided_out(w, s)) {
            bail!(
                "conv3x3: gradient {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let (k, hw, hwo) = (9 * c, h * w, h2 * w2);
        let zeros = || vec![0f32; c_out * k];
        let grad = if b == 0 || c_out * k * hw == 0 {
            zeros()
        } else {
            dy.par_chunks(c_out * hwo)
                .zip(x.par_chunks(c * hw))
                .fold(
                    || (zeros(), vec![0f32; k * hwo]),
                    |(mut acc, mut cols), (dy, x)| {
                        im2col(x, c, h, w, s, &mut cols);
                        let dy = View {
                            data: dy,
                            row_stride: hwo,
                            col_stride: 1,
                        };
                        let cols_t = View {
                            data: &cols,
                            row_stride: 1,
                            col_stride: hwo,
                        };
                        gemm_into(&mut acc, c_out, k, hwo, dy, cols_t, true);
                        (acc, cols)
                    },
                )
                .map(|(acc, _)| acc)
                .reduce(zeros, |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                })
        };
        Ok((CpuStorage::F32(grad), Shape::from((c_out, c, 3, 3))))
    }
}

/// `xs.conv2d(kernel, padding 1, stride)` for training: [`Conv3x3`] on the CPU in f32, candle's
/// own convolution everywhere else.
pub fn conv3x3_train(xs: &Tensor, kernel: &Tensor, stride: usize) -> Result<Tensor> {
    if !(applies(xs) && kernel.dtype() == DType::F32 && stride > 0) {
        return xs.conv2d(kernel, 1, stride, 1, 1);
    }
    xs.contiguous()?
        .apply_op2(&kernel.contiguous()?, Conv3x3 { stride })
}

/// Output size of a 3x3 convolution with padding 1 and `stride` along a side of `n`.
fn strided_out(n: usize, stride: usize) -> usize {
    (n - 1) / stride + 1
}

/// The im2col matrix of one CHW image for a 3x3 convolution with padding 1 and `stride`, as
/// (9 c) x (ho wo) row-major, every value written. The gather is per element: only the encoder's
/// small stride-2 convolutions use it.
fn im2col_strided(x: &[f32], c: usize, h: usize, w: usize, stride: usize, cols: &mut [f32]) {
    let (ho, wo) = (strided_out(h, stride), strided_out(w, stride));
    for (row, plane) in cols[..9 * c * ho * wo].chunks_mut(ho * wo).enumerate() {
        let (ch, ky, kx) = (row / 9, row % 9 / 3, row % 3);
        for (oy, out) in plane.chunks_mut(wo).enumerate() {
            for (ox, v) in out.iter_mut().enumerate() {
                let (iy, ix) = (
                    (oy * stride + ky).wrapping_sub(1),
                    (ox * stride + kx).wrapping_sub(1),
                );
                *v = if iy < h && ix < w {
                    x[(ch * h + iy) * w + ix]
                } else {
                    0.0
                };
            }
        }
    }
}

/// The im2col matrix of one CHW image for a 3x3 convolution with padding 1 and `stride`:
/// row copies at stride 1, a per-element gather above.
fn im2col(x: &[f32], c: usize, h: usize, w: usize, stride: usize, cols: &mut [f32]) {
    if stride == 1 {
        im2col_image(x, c, h, w, cols);
    } else {
        im2col_strided(x, c, h, w, stride, cols);
    }
}

/// The input gradient of [`Conv3x3`] at a stride above 1, (dy, W) -> dx: per image, W^T dY_b scattered back
/// onto the input pixels each column came from.
struct Conv3x3StridedInputGrad {
    stride: usize,
    shape: Shape,
}

impl CustomOp2 for Conv3x3StridedInputGrad {
    fn name(&self) -> &'static str {
        "conv3x3-strided-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = f32_data(s1, l1, self.name())?;
        let kernel = f32_data(s2, l2, self.name())?;
        let (b, c, h, w) = self.shape.dims4()?;
        let (c_out, ..) = l2.shape().dims4()?;
        let s = self.stride;
        let (ho, wo) = (strided_out(h, s), strided_out(w, s));
        if l1.shape().dims4()? != (b, c_out, ho, wo) {
            bail!(
                "conv3x3-strided: gradient {:?} for input {:?}",
                l1.shape(),
                self.shape
            )
        }
        let k = 9 * c;
        let mut dx = vec![0f32; b * c * h * w];
        if !dx.is_empty() && c_out > 0 {
            // W^T: (9 C) x C_out, a transposed view of the (C_out, 9 C) kernel.
            let weights_t = View {
                data: kernel,
                row_stride: 1,
                col_stride: k,
            };
            dx.par_chunks_mut(c * h * w)
                .zip(dy.par_chunks(c_out * ho * wo))
                .for_each_init(
                    || vec![0f32; k * ho * wo],
                    |cols, (dx, dy)| {
                        let dy = View {
                            data: dy,
                            row_stride: ho * wo,
                            col_stride: 1,
                        };
                        gemm_into(cols, k, ho * wo, c_out, weights_t, dy, false);
                        for (row, plane) in cols.chunks(ho * wo).enumerate() {
                            let (ch, ky, kx) = (row / 9, row % 9 / 3, row % 3);
                            for (i, &g) in plane.iter().enumerate() {
                                let (oy, ox) = (i / wo, i % wo);
                                let (iy, ix) =
                                    ((oy * s + ky).wrapping_sub(1), (ox * s + kx).wrapping_sub(1));
                                if iy < h && ix < w {
                                    dx[(ch * h + iy) * w + ix] += g;
                                }
                            }
                        }
                    },
                );
        }
        Ok((CpuStorage::F32(dx), self.shape.clone()))
    }
}

/// Per-channel mean and biased variance of an NCHW tensor, as a (2, C) tensor; no gradient.
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(storage, layout, self.name())?;
        let (b, c, hw) = nchw(layout)?;
        let n = (b * hw) as f64;
        // f64 sums: a channel has up to 100k values at batch 128 and 28x28.
        let stats: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let values = || (0..b).flat_map(move |i| &x[(i * c + ch) * hw..][..hw]);
                let mean = values().map(|&v| v as f64).sum::<f64>() / n;
                let var = values().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                (mean as f32, var as f32)
            })
            .collect();
        let (means, vars): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        Ok((CpuStorage::F32([means, vars].concat()), Shape::from((2, c))))
    }
}

/// Per channel of the fused batch norm: `1 / sqrt(var + eps)`, and the scale and shift that
/// give the output before ReLU as `x * scale + shift`. `stats` holds mean and variance, `params`
/// gamma and beta, each `c` long.
fn per_channel(stats: &[f32], params: &[f32], c: usize, eps: f32) -> Vec<[f32; 3]> {
    (0..c)
        .map(|ch| {
            let inv_std = 1.0 / (stats[c + ch] + eps).sqrt();
            let scale = params[ch] * inv_std;
            [inv_std, scale, params[c + ch] - stats[ch] * scale]
        })
        .collect()
}

/// Batch norm with the batch's statistics, then ReLU if `relu`: (x, stats, [gamma; beta]).
struct BatchNormRelu {
    eps: f32,
    relu: bool,
}

impl CustomOp3 for BatchNormRelu {
    fn name(&self) -> &'static str {
        "batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let (_, c, hw) = nchw(l1)?;
        let per = per_channel(
            f32_data(s2, l2, self.name())?,
            f32_data(s3, l3, self.name())?,
            c,
            self.eps,
        );
        let mut ys = vec![0f32; x.len()];
        ys.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(run, (ys, xs))| {
                let [_, scale, shift] = per[run % c];
                for (y, &x) in ys.iter_mut().zip(xs) {
                    let z = x * scale + shift;
                    *y = if self.relu { z.max(0.0) } else { z };
                }
            });
        Ok((CpuStorage::F32(ys), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        stats: &Tensor,
        params: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = params.dim(1)?;
        let both = Tensor::cat(&[stats, params], 0)?;
        let op = BatchNormReluGrad {
            eps: self.eps,
            relu: self.relu,
        };
        let packed = xs.apply_op3_no_bwd(&grad.contiguous()?, &both, &op)?;
        let n = xs.elem_count();
        let grad_xs = packed.narrow(0, 0, n)?.reshape(xs.shape())?;
        let grad_params = packed.narrow(0, n, 2 * c)?.reshape((2, c))?;
        Ok((Some(grad_xs), None, Some(grad_params)))
    }
}

/// The gradients of [`BatchNormRelu`]: (x, dy, [mean; var; gamma; beta]) -> dx, dgamma and
/// dbeta packed in one flat tensor (a custom op has one output).
struct BatchNormReluGrad {
    eps: f32,
    relu: bool,
}

impl CustomOp3 for BatchNormReluGrad {
    fn name(&self) -> &'static str {
        "batch-norm-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let both = f32_data(s3, l3, self.name())?;
        let (b, c, hw) = nchw(l1)?;
        let (stats, params) = both.split_at(2 * c);
        let per = per_channel(stats, params, c, self.eps);
        // The gradient that reaches the batch norm's output: ReLU passes it where z > 0.
        let masked = |x: f32, g: f32, [_, scale, shift]: [f32; 3]| {
            if self.relu && x * scale + shift <= 0.0 {
                0.0
            } else {
                g
            }
        };
        // Per channel: sum of the gradient (dbeta) and of gradient * x_hat (dgamma).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let p = per[ch];
                let (mut sum, mut sum_xhat) = (0f64, 0f64);
                for i in 0..b {
                    let run = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                    for (&x, &g) in x[run.clone()].iter().zip(&dy[run]) {
                        let g = masked(x, g, p);
                        sum += g as f64;
                        sum_xhat += (g * (x - stats[ch]) * p[0]) as f64;
                    }
                }
                (sum, sum_xhat)
            })
            .collect();
        let n = (b * hw) as f64;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, dparams) = out.split_at_mut(x.len());
        // dx = gamma / sigma * (g - mean(g) - x_hat * mean(g * x_hat))
        dx.par_chunks_mut(hw).enumerate().for_each(|(run, dx)| {
            let ch = run % c;
            let p = per[ch];
            let k = params[ch] * p[0];
            let mean_g = (sums[ch].0 / n) as f32;
            let mean_gx = (sums[ch].1 / n) as f32;
            let xs = &x[run * hw..][..hw];
            let gs = &dy[run * hw..][..hw];
            for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(gs) {
                let x_hat = (x - stats[ch]) * p[0];
                *d = k * (masked(x, g, p) - mean_g - x_hat * mean_gx);
            }
        });
        for (ch, &(sum, sum_xhat)) in sums.iter().enumerate() {
            dparams[ch] = sum_xhat as f32;
            dparams[c + ch] = sum as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Training-mode batch norm of an NCHW tensor, then ReLU if `relu`, updating `bn`'s running
/// statistics as candle_nn's `BatchNorm::forward_train` does. Fused on the CPU in f32 (see the
/// module doc); candle_nn's own everywhere else.
pub fn batch_norm_train(xs: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    let fused = applies(xs) && xs.rank() == 4;
    let (Some((gamma, beta)), true) = (bn.weight_and_bias(), fused) else {
        let ys = bn.forward_train(xs)?;
        return if relu { ys.relu() } else { Ok(ys) };
    };
    let xs = xs.contiguous()?;
    let (b, _, h, w) = xs.dims4()?;
    let n = (b * h * w) as f64;
    if b == 0 || h * w == 0 {
        bail!("batch norm of an empty batch {:?}", xs.shape())
    }
    let stats = xs.apply_op1_no_bwd(&ChannelStats)?;
    let m = bn.momentum();
    let update = |running: &Tensor, batch: Tensor, weight: f64| -> Result<()> {
        Var::from_tensor(running)?.set(&((running * (1.0 - m))? + (batch * (m * weight))?)?)
    };
    update(bn.running_mean(), stats.get(0)?, 1.0)?;
    // The running variance is the unbiased one, as in candle_nn and PyTorch.
    update(bn.running_var(), stats.get(1)?, n / (n - 1.0).max(1.0))?;
    let params = Tensor::stack(&[gamma, beta], 0)?;
    xs.apply_op3(
        &stats,
        &params,
        BatchNormRelu {
            eps: bn.eps() as f32,
            relu,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::Var;

    /// Values and both gradients agree with candle's own convolution.
    #[test]
    fn matches_candle_conv_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, in, out, height, width): odd sizes, one channel, one-pixel rows and columns.
        for (b, c_in, c_out, h, w, stride) in [
            (3, 5, 4, 6, 7, 1),
            (2, 1, 3, 4, 1, 1),
            (1, 2, 2, 1, 5, 1),
            (3, 5, 4, 6, 7, 2),
            (2, 3, 2, 5, 4, 2),
            (1, 2, 1, 1, 3, 2),
        ] {
            let xs = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c_in, h, w), &dev)?)?;
            let kernel = Var::from_tensor(&Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &dev)?)?;
            let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
            let weights = Tensor::randn(0f32, 1., (b, c_out, ho, wo), &dev)?;
            let ours = conv3x3_train(&xs, &kernel, stride)?;
            // A strided convolution is the stride-1 one subsampled. (candle's own stride-2
            // backward gets non-square inputs wrong: it pads both sides by the height's rule.)
            let every = |n: usize| Tensor::arange_step(0u32, n as u32, stride as u32, &dev);
            let theirs = xs
                .conv2d(&kernel, 1, 1, 1, 1)?
                .index_select(&every(h)?, 2)?
                .index_select(&every(w)?, 3)?;
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert!(max_diff(&ours, &theirs)? < 1e-4);
            let g_ours = (&ours * &weights)?.sum_all()?.backward()?;
            let g_theirs = (&theirs * &weights)?.sum_all()?.backward()?;
            for var in [&xs, &kernel] {
                let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b)? < 1e-3, "stride {stride}: gradient differs");
                assert!(a.abs()?.max_all()?.to_scalar::<f32>()? > 0.1);
            }
        }
        Ok(())
    }

    /// Output, both gradients and the running statistics agree with candle_nn's batch norm
    /// followed by candle's ReLU.
    #[test]
    fn batch_norm_matches_candle_nn() -> Result<()> {
        use candle_nn::{VarBuilder, VarMap};
        let dev = Device::Cpu;
        for relu in [false, true] {
            let xs = Var::from_tensor(&(Tensor::randn(0f32, 2., (4, 3, 5, 6), &dev)? + 0.7)?)?;
            let weights = Tensor::randn(0f32, 1., (4, 3, 5, 6), &dev)?;
            let mut grads = vec![];
            let mut outs = vec![];
            let mut running = vec![];
            for fused in [false, true] {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                let bn = candle_nn::batch_norm(3, 1e-5, vb.clone())?;
                // Non-trivial affine parameters, the same for both runs.
                let (gamma, beta) = bn.weight_and_bias().unwrap();
                Var::from_tensor(gamma)?.set(&Tensor::new(&[1.5f32, -0.5, 0.8], &dev)?)?;
                Var::from_tensor(beta)?.set(&Tensor::new(&[0.1f32, 0.3, -0.2], &dev)?)?;
                let ys = if fused {
                    batch_norm_train(&xs, &bn, relu)?
                } else {
                    let ys = bn.forward_train(&xs)?;
                    if relu {
                        ys.relu()?
                    } else {
                        ys
                    }
                };
                let g = (&ys * &weights)?.sum_all()?.backward()?;
                grads.push([xs.as_tensor(), gamma, beta].map(|t| g.get(t).unwrap().clone()));
                outs.push(ys);
                running.push([bn.running_mean().clone(), bn.running_var().clone()]);
            }
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert!(max_diff(&outs[0], &outs[1])? < 1e-4);
            for (a, b) in grads[0].iter().zip(&grads[1]) {
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b)? < 1e-3, "relu {relu}: gradient differs");
            }
            for (a, b) in running[0].iter().zip(&running[1]) {
                assert!(max_diff(a, b)? < 1e-5, "running statistics differ");
            }
        }
        Ok(())
    }
}
