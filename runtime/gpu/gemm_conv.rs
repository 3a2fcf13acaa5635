//! A 3x3 conv (padding 1) as im2col + GEMM without candle's extra passes: candle's CUDA conv
//! writes the GEMM's result as [N, H*W, Cout] and copies it to NCHW, then adds the bias and
//! applies ReLU as two more kernels. Here the column matrix is [C*9, N*Ho*Wo], so the weight
//! [Cout, C*9] times it (one cuBLAS GEMM through candle's matmul) is [Cout, N*Ho*Wo], NCHW at
//! batch 1; one epilogue kernel adds the bias, applies ReLU and lays it out as NCHW: three
//! kernels and one pass over the output instead of five kernels and four passes.
//!
//! Both kernels are candle custom ops compiled by NVRTC (`gemm_conv.cu`); on the CPU they run
//! f32 twins, which the tests hold to candle's conv.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Output side of a 3x3, padding-1 conv.
fn out_side(side: usize, stride: usize) -> usize {
    (side - 1) / stride + 1
}

/// The column matrix `[C*9, N*Ho*Wo]` of an NCHW input.
#[derive(Clone, Copy, Debug)]
struct Im2Col {
    stride: usize,
}

/// Bias, optional ReLU, and `[Cout, N*plane]` to `[N, Cout, Ho, Wo]`.
#[derive(Clone, Copy, Debug)]
struct BiasAct {
    n: usize,
    h_out: usize,
    w_out: usize,
    relu: bool,
}

impl Im2Col {
    fn dims(&self, x: &[usize]) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let &[n, c, h, w] = x else {
            return Err(candle_core::Error::Msg(format!(
                "im2col: input must be [n, c, h, w], got {x:?}"
            )));
        };
        if !(1..=2).contains(&self.stride) || n * c * h * w == 0 {
            return Err(candle_core::Error::Msg(format!(
                "im2col: stride {} on {x:?}",
                self.stride
            )));
        }
        Ok((
            n,
            c,
            h,
            w,
            out_side(h, self.stride),
            out_side(w, self.stride),
        ))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "wae-im2col-kn"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w, ho, wo) = self.dims(l.dims())?;
        let x = super::cpu_f32(s, l)?;
        let cols = n * ho * wo;
        let mut col = vec![0f32; c * 9 * cols];
        for (idx, v) in col.iter_mut().enumerate() {
            let (k, p) = (idx / cols, idx % cols);
            let (ox, oy, img) = (p % wo, (p / wo) % ho, p / (wo * ho));
            let (ci, ky, kx) = (k / 9, (k % 9) / 3, k % 3);
            let (iy, ix) = (oy * self.stride + ky, ox * self.stride + kx);
            if (1..=h).contains(&iy) && (1..=w).contains(&ix) {
                *v = x[((img * c + ci) * h + iy - 1) * w + ix - 1];
            }
        }
        Ok((CpuStorage::F32(col), Shape::from((c * 9, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::im2col(self, s, l)
    }
}

impl BiasAct {
    fn check(&self, y: &[usize], b: &[usize]) -> Result<usize> {
        let plane = self.h_out * self.w_out;
        match (y, b) {
            (&[c_out, cols], &[cb]) if cb == c_out && cols == self.n * plane => Ok(c_out),
            _ => Err(candle_core::Error::Msg(format!(
                "bias/act: {y:?} and {b:?} for batch {} of {}x{}",
                self.n, self.h_out, self.w_out
            ))),
        }
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "wae-bias-act-nchw"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c_out = self.check(yl.dims(), bl.dims())?;
        let (y, b) = (super::cpu_f32(ys, yl)?, super::cpu_f32(bs, bl)?);
        let plane = self.h_out * self.w_out;
        let mut out = vec![0f32; self.n * c_out * plane];
        for (idx, o) in out.iter_mut().enumerate() {
            let (q, co, img) = (idx % plane, (idx / plane) % c_out, idx / (plane * c_out));
            let v = y[co * self.n * plane + img * plane + q] + b[co];
            *o = if self.relu { v.max(0.0) } else { v };
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.n, c_out, self.h_out, self.w_out)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bias_act(self, ys, yl, bs, bl)
    }
}

/// The CUDA source, compiled by NVRTC at first use.
#[cfg(feature = "cuda")]
pub(crate) static KERNELS: super::nvrtc::Kernels = super::nvrtc::Kernels::new(
    concat!(include_str!("f16.cuh"), include_str!("gemm_conv.cu")),
    "gemm_conv.cu",
);

/// `relu(conv3x3(x, w, padding 1, stride) + b)` (or without ReLU): `x` `[n, c_in, h, w]`, `w`
/// `[c_out, c_in, 3, 3]`, `b` `[c_out]`, all of one dtype on one device.
pub fn conv(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, relu: bool) -> Result<Tensor> {
    let (n, _, h, wd) = x.dims4()?;
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        return Err(candle_core::Error::Msg(format!(
            "gemm conv: a 3x3 kernel, got {kh}x{kw}"
        )));
    }
    let col = x.contiguous()?.apply_op1_no_bwd(&Im2Col { stride })?;
    let y = w.reshape((c_out, c_in * 9))?.matmul(&col)?;
    let act = BiasAct {
        n,
        h_out: out_side(h, stride),
        w_out: out_side(wd, stride),
        relu,
    };
    y.apply_op2_no_bwd(&b.contiguous()?, &act)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};
    use half::f16;

    use super::super::nvrtc::view;
    use super::{BiasAct, Im2Col, KERNELS};

    /// Threads per block of both kernels.
    const THREADS: u32 = 256;

    /// Blocks of [`THREADS`] covering `total` elements.
    pub(super) fn blocks(total: usize) -> Result<(u32, u32, u32)> {
        let b = u32::try_from(total.div_ceil(THREADS as usize))
            .map_err(|_| candle_core::Error::Msg(format!("conv: {total} elements")))?;
        Ok((b, 1, 1))
    }

    /// One thread per element of `total`.
    fn config(total: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: blocks(total)?,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    pub(super) fn im2col(op: &Im2Col, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, c, h, w, ho, wo) = op.dims(l.dims())?;
        let dev = s.device().clone();
        let func = dev.get_or_load_custom_func("im2col_kn", KERNELS.name(), KERNELS.ptx(&dev)?)?;
        let x = view(s, l)?;
        let total = c * 9 * n * ho * wo;
        // SAFETY: the kernel writes every element (zeros for the padding).
        let col = unsafe { dev.alloc::<f16>(total)? };
        let dims = [n, c, h, w, ho, wo, op.stride].map(|d| d as i32);
        let mut launch = func.builder();
        launch.arg(&x).arg(&col);
        for d in &dims {
            launch.arg(d);
        }
        // SAFETY: the arguments match im2col_kn's signature; the grid covers `total`.
        unsafe { launch.launch(config(total)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(col, dev),
            Shape::from((c * 9, n * ho * wo)),
        ))
    }

    pub(super) fn bias_act(
        op: &BiasAct,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let c_out = op.check(yl.dims(), bl.dims())?;
        let dev = ys.device().clone();
        let func =
            dev.get_or_load_custom_func("bias_act_nchw", KERNELS.name(), KERNELS.ptx(&dev)?)?;
        let (y, b) = (view(ys, yl)?, view(bs, bl)?);
        let plane = op.h_out * op.w_out;
        let total = op.n * c_out * plane;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f16>(total)? };
        let (n, c, p, relu) = (op.n as i32, c_out as i32, plane as i64, op.relu as i32);
        let mut launch = func.builder();
        launch
            .arg(&y)
            .arg(&b)
            .arg(&out)
            .arg(&n)
            .arg(&c)
            .arg(&p)
            .arg(&relu);
        // SAFETY: the arguments match bias_act_nchw's signature; the grid covers `total`.
        unsafe { launch.launch(config(total)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((op.n, c_out, op.h_out, op.w_out)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_conv_bias_and_relu() {
        let d = Device::Cpu;
        for (n, c_in, c_out, h, w, stride, relu) in [
            (1, 64, 64, 9, 7, 1, true),
            (3, 3, 40, 11, 13, 1, false),
            (2, 48, 33, 10, 9, 2, true),
        ] {
            let x = Tensor::randn(0f32, 1., (n, c_in, h, w), &d).unwrap();
            let wt = Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &d).unwrap();
            let b = Tensor::randn(0f32, 1., c_out, &d).unwrap();
            let mut want = x
                .conv2d(&wt, 1, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            if relu {
                want = want.relu().unwrap();
            }
            let got = conv(&x, &wt, &b, stride, relu).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = crate::gpu::max_abs_diff(&got, &want);
            assert!(diff < 1e-3, "{n} {c_in}->{c_out} {h}x{w}/{stride}: {diff}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let d = Device::Cpu;
        let x = Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &d).unwrap();
        let w5 = Tensor::zeros((8, 4, 5, 5), candle_core::DType::F32, &d).unwrap();
        let b = Tensor::zeros(8, candle_core::DType::F32, &d).unwrap();
        assert!(conv(&x, &w5, &b, 1, true).is_err());
        let w = Tensor::zeros((8, 4, 3, 3), candle_core::DType::F32, &d).unwrap();
        assert!(conv(&x, &w, &b, 3, true).is_err());
        let b7 = Tensor::zeros(7, candle_core::DType::F32, &d).unwrap();
        assert!(conv(&x, &w, &b7, 1, true).is_err());
    }

    /// NVRTC needs no GPU: the kernel source is checked wherever the `cuda` feature builds.
    #[cfg(feature = "cuda")]
    #[test]
    fn nvrtc_compiles_the_kernels_for_xavier_orin_and_hopper() {
        for cc in [(7, 2), (8, 7), (9, 0)] {
            let ptx = KERNELS.compile(cc).unwrap();
            assert!(ptx.contains(".entry im2col_kn") && ptx.contains(".entry bias_act_nchw"));
        }
        assert_eq!(super::cuda::blocks(257).unwrap(), (2, 1, 1));
    }
}
