//! Kernel sources compiled at run time by NVRTC for the device's own compute capability, once
//! per process, and loaded as candle custom functions: one binary serves every GPU (Orin's sm_87
//! included) and building needs no step beyond candle's own.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};
use half::f16;

/// One `.cu` source and its compiled PTX.
pub struct Kernels {
    source: &'static str,
    name: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Kernels {
    /// A source (`f16.cuh` then the kernels, `concat!`ed `include_str!`s) and its file name, for
    /// NVRTC's messages and the module cache.
    pub const fn new(source: &'static str, name: &'static str) -> Kernels {
        Kernels {
            source,
            name,
            ptx: OnceLock::new(),
        }
    }

    /// PTX for compute capability `cc`; where this NVRTC does not know the device (a GPU newer
    /// than the toolkit), for the newest architecture tried that it knows, which the driver then
    /// JIT-compiles.
    pub fn compile(&self, cc: (i32, i32)) -> std::result::Result<String, String> {
        let mut last = String::new();
        for arch in [format!("{}{}", cc.0, cc.1), "80".into(), "75".into()] {
            let opts = CompileOptions {
                options: vec![format!("--gpu-architecture=compute_{arch}")],
                name: Some(self.name.into()),
                ..Default::default()
            };
            match compile_ptx_with_opts(self.source, opts) {
                Ok(p) => return Ok(p.to_src()),
                Err(e) => last = format!("{e:?}"),
            }
        }
        Err(format!("NVRTC could not compile {}: {last}", self.name))
    }

    /// The PTX for `dev` (compiled at the first call), for
    /// `dev.get_or_load_custom_func(function, kernels.name(), ptx)`.
    pub fn ptx(&self, dev: &CudaDevice) -> Result<&str> {
        let cc = dev.cuda_stream().context().compute_capability().w()?;
        self.ptx
            .get_or_init(|| self.compile(cc))
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The module's name in candle's cache of custom modules.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The contiguous f16 values of a CUDA storage.
pub fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f16>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("the kernel takes contiguous tensors".into()))?;
    Ok(s.as_cuda_slice::<f16>()?.slice(a..b))
}
