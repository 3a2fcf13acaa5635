//! A direct 3x3 convolution (padding 1, stride 1 or 2, bias, optional ReLU) as a candle custom
//! op, for convs with few channels: the WAE encoder's full-resolution convs (3 -> 16 -> 16 at
//! 224x224) and its split, where candle's im2col + GEMM builds a 9x column buffer for a GEMM with
//! 16 outputs. The split's two stride-2 convs (I_L and I_H) run as one op over their concatenated
//! weights, so the encoder's input is read once per conv.
//!
//! On CUDA the op runs `direct_conv.cu`, compiled by NVRTC for the device at first use (so one
//! binary serves every compute capability, Orin's sm_87 included). On the CPU it runs the same
//! loop nest in f32: that twin is what the tests hold against candle's own conv.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Largest input or output channel count the direct kernel takes (its weights for one output
/// tile live in shared memory); wider convs stay on candle's GEMM path.
pub const MAX_CHANNELS: usize = 32;
/// Output channels one GPU thread computes (`OUT_TILE` in the CUDA source).
pub const OUT_TILE: usize = 8;
/// Threads per block.
pub const THREADS: u32 = 128;

/// Whether a `c_in -> c_out` 3x3 conv goes to the direct kernel.
pub fn suits(c_in: usize, c_out: usize) -> bool {
    (1..=MAX_CHANNELS).contains(&c_in) && (1..=MAX_CHANNELS).contains(&c_out)
}

/// The op: stride and whether ReLU follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectConv {
    /// 1 or 2.
    pub stride: usize,
    /// ReLU after the bias.
    pub relu: bool,
}

/// Shapes and launch geometry of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Output height.
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
    /// Blocks: pixels over x, output-channel tiles over y.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory: one tile's weights and biases as f32.
    pub shared_bytes: u32,
}

impl Plan {
    /// Output shape `[n, c_out, h_out, w_out]`.
    pub fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.c_out, self.h_out, self.w_out))
    }
}

impl DirectConv {
    /// Checks the shapes of input `[n, c_in, h, w]`, weight `[c_out, c_in, 3, 3]` and bias
    /// `[c_out]`, and works out the output and the launch.
    pub fn plan(&self, x: &[usize], w: &[usize], b: &[usize]) -> Result<Plan> {
        let bad = |why: String| candle_core::Error::Msg(format!("direct conv: {why}"));
        let &[n, c_in, h, wd] = x else {
            return Err(bad(format!("input must be [n, c, h, w], got {x:?}")));
        };
        let &[c_out, wc_in, 3, 3] = w else {
            return Err(bad(format!(
                "weight must be [c_out, c_in, 3, 3], got {w:?}"
            )));
        };
        if wc_in != c_in || b != [c_out] {
            return Err(bad(format!(
                "input {x:?}, weight {w:?} and bias {b:?} disagree"
            )));
        }
        if !suits(c_in, c_out) {
            return Err(bad(format!(
                "{c_in} -> {c_out} channels: at most {MAX_CHANNELS} each"
            )));
        }
        if !(1..=2).contains(&self.stride) || n == 0 || h == 0 || wd == 0 {
            return Err(bad(format!("stride {} on {x:?}", self.stride)));
        }
        let (h_out, w_out) = ((h - 1) / self.stride + 1, (wd - 1) / self.stride + 1);
        let pixels = n * h_out * w_out;
        let blocks = pixels.div_ceil(THREADS as usize);
        let grid_x = u32::try_from(blocks).map_err(|_| bad(format!("{pixels} pixels")))?;
        Ok(Plan {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            h_out,
            w_out,
            grid: (grid_x, c_out.div_ceil(OUT_TILE) as u32, 1),
            block: (THREADS, 1, 1),
            shared_bytes: (4 * OUT_TILE * (c_in * 9 + 1)) as u32,
        })
    }

    /// Applies the op: `x` `[n, c_in, h, w]`, `w` `[c_out, c_in, 3, 3]`, `b` `[c_out]`.
    pub fn apply(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.apply_op3_no_bwd(w, b, self)
    }
}

impl CustomOp3 for DirectConv {
    fn name(&self) -> &'static str {
        "wae-direct-conv3x3"
    }

    /// The CUDA kernel's loop nest, in f32: one output pixel at a time, every output channel.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.plan(xl.dims(), wl.dims(), bl.dims())?;
        let (x, w, b) = (
            super::cpu_f32(xs, xl)?,
            super::cpu_f32(ws, wl)?,
            super::cpu_f32(bs, bl)?,
        );
        let plane_out = p.h_out * p.w_out;
        let mut y = vec![0f32; p.n * p.c_out * plane_out];
        for img in 0..p.n {
            for oy in 0..p.h_out {
                for ox in 0..p.w_out {
                    for co in 0..p.c_out {
                        let mut acc = 0f32;
                        for ci in 0..p.c_in {
                            let plane = &x[(img * p.c_in + ci) * p.h * p.w..][..p.h * p.w];
                            for ky in 0..3 {
                                let Some(iy) = (oy * self.stride + ky).checked_sub(1) else {
                                    continue;
                                };
                                if iy >= p.h {
                                    continue;
                                }
                                for kx in 0..3 {
                                    let Some(ix) = (ox * self.stride + kx).checked_sub(1) else {
                                        continue;
                                    };
                                    if ix >= p.w {
                                        continue;
                                    }
                                    acc += plane[iy * p.w + ix]
                                        * w[(co * p.c_in + ci) * 9 + ky * 3 + kx];
                                }
                            }
                        }
                        let v = acc + b[co];
                        y[(img * p.c_out + co) * plane_out + oy * p.w_out + ox] =
                            if self.relu { v.max(0.0) } else { v };
                    }
                }
            }
        }
        Ok((CpuStorage::F32(y), p.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, xs, xl, ws, wl, bs, bl)
    }
}

/// The CUDA source, compiled by NVRTC at first use.
#[cfg(feature = "cuda")]
pub(crate) static KERNELS: super::nvrtc::Kernels = super::nvrtc::Kernels::new(
    concat!(include_str!("f16.cuh"), include_str!("direct_conv.cu")),
    "direct_conv.cu",
);

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};
    use half::f16;

    use super::super::nvrtc::view;
    use super::{DirectConv, KERNELS};

    pub(super) fn forward(
        op: &DirectConv,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let p = op.plan(xl.dims(), wl.dims(), bl.dims())?;
        let dev = xs.device().clone();
        let func =
            dev.get_or_load_custom_func("conv3x3_direct", KERNELS.name(), KERNELS.ptx(&dev)?)?;
        let (x, w, b) = (view(xs, xl)?, view(ws, wl)?, view(bs, bl)?);
        // SAFETY: every element is written by the kernel before anyone reads it.
        let y = unsafe { dev.alloc::<f16>(p.n * p.c_out * p.h_out * p.w_out)? };
        let dims = [p.n, p.c_in, p.h, p.w, p.c_out, p.h_out, p.w_out, op.stride].map(|d| d as i32);
        let relu = op.relu as i32;
        let mut launch = func.builder();
        launch.arg(&x).arg(&w).arg(&b).arg(&y);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&relu);
        let cfg = LaunchConfig {
            grid_dim: p.grid,
            block_dim: p.block,
            shared_mem_bytes: p.shared_bytes,
        };
        // SAFETY: the argument list matches conv3x3_direct's signature and `plan` sized the
        // grid, the output and the shared memory for these shapes.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), p.out_shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, relu: bool) -> Tensor {
        let y = x
            .conv2d(w, 1, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    #[test]
    fn matches_candles_conv_on_odd_sizes_both_strides_and_a_partial_tile() {
        let d = Device::Cpu;
        for (n, c_in, c_out, h, w, stride, relu) in [
            (2, 3, 16, 13, 11, 1, true),
            (1, 16, 6, 9, 14, 2, false),
            (3, 1, 5, 7, 7, 2, true),
            (1, 32, 32, 5, 6, 1, false),
        ] {
            let x = Tensor::randn(0f32, 1., (n, c_in, h, w), &d).unwrap();
            let wt = Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &d).unwrap();
            let b = Tensor::randn(0f32, 1., c_out, &d).unwrap();
            let op = DirectConv { stride, relu };
            let ours = op.apply(&x, &wt, &b).unwrap();
            let theirs = reference(&x, &wt, &b, stride, relu);
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                crate::gpu::max_abs_diff(&ours, &theirs) < 1e-4,
                "{n} {c_in}->{c_out} {h}x{w}/{stride}"
            );
        }
    }

    #[test]
    fn the_launch_covers_every_pixel_and_channel_tile() {
        let op = DirectConv {
            stride: 2,
            relu: false,
        };
        let p = op.plan(&[8, 16, 224, 224], &[6, 16, 3, 3], &[6]).unwrap();
        assert_eq!((p.h_out, p.w_out), (112, 112));
        assert!(p.grid.0 as usize * THREADS as usize >= 8 * 112 * 112);
        assert!((p.grid.0 as usize - 1) * (THREADS as usize) < 8 * 112 * 112);
        assert_eq!(p.grid.1, 1);
        let p = DirectConv {
            stride: 1,
            relu: true,
        }
        .plan(&[1, 3, 224, 224], &[16, 3, 3, 3], &[16])
        .unwrap();
        assert_eq!((p.h_out, p.grid.1), (224, 2));
        // One tile's weights and biases, as f32, within the 48 KB every GPU gives a block.
        let widest = DirectConv {
            stride: 1,
            relu: true,
        }
        .plan(&[1, 32, 8, 8], &[32, 32, 3, 3], &[32])
        .unwrap();
        assert!(widest.shared_bytes <= 48 * 1024, "{}", widest.shared_bytes);
    }

    /// NVRTC needs no GPU: the kernel source is checked wherever the `cuda` feature builds.
    #[cfg(feature = "cuda")]
    #[test]
    fn nvrtc_compiles_the_kernel_for_xavier_orin_and_hopper() {
        for cc in [(7, 2), (8, 7), (9, 0)] {
            let ptx = super::KERNELS.compile(cc).unwrap();
            assert!(ptx.contains(".entry conv3x3_direct"), "{cc:?}");
        }
    }

    #[test]
    fn shapes_it_cannot_take_are_refused_not_miscomputed() {
        let op = DirectConv {
            stride: 1,
            relu: true,
        };
        assert!(op.plan(&[1, 64, 8, 8], &[64, 64, 3, 3], &[64]).is_err());
        assert!(op.plan(&[1, 3, 8, 8], &[16, 4, 3, 3], &[16]).is_err());
        assert!(op.plan(&[1, 3, 8, 8], &[16, 3, 5, 5], &[16]).is_err());
        assert!(op.plan(&[1, 3, 8, 8], &[16, 3, 3, 3], &[15]).is_err());
        assert!(op.plan(&[3, 8, 8], &[16, 3, 3, 3], &[16]).is_err());
        assert!(DirectConv {
            stride: 3,
            relu: true
        }
        .plan(&[1, 3, 8, 8], &[16, 3, 3, 3], &[16])
        .is_err());
        assert!(!suits(3, 64) && suits(3, 16) && suits(16, 6));
    }
}
