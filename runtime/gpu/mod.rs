//! The NVIDIA GPU path: the network captured once into a CUDA graph and replayed per frame
//! ([`mode`] decides whether it can be), and direct kernels where candle's im2col + GEMM is weak
//! ([`direct_conv`]: the encoder's few-channel full-resolution convs and the stride-2 split;
//! [`gemm_conv`]: the wider convs without candle's extra passes), composed by [`direct_net`].
//! The decisions and the kernels' shape logic are plain Rust and tested on any machine; what
//! touches the GPU sits behind the `cuda` feature ([`net`]).

pub mod direct_conv;
pub mod direct_net;
pub mod gemm_conv;
pub mod mode;
#[cfg(feature = "cuda")]
pub mod net;
#[cfg(feature = "cuda")]
pub mod nvrtc;

pub use mode::{Execution, GraphError, GraphMode};

/// The contiguous f32 values of a CPU storage, for the kernels' CPU twins.
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::Msg(
            "the kernels' CPU twins take f32".into(),
        ));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("the kernels take contiguous tensors".into()))?;
    Ok(&v[a..b])
}

/// Largest absolute difference between two tensors of one shape (for the tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}
