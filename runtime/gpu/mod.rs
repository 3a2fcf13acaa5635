//! The NVIDIA GPU path: the network captured once into a CUDA graph and replayed per frame
//! ([`mode`] decides whether it can be), and direct kernels where candle's im2col + GEMM is weak
//! ([`direct_conv`]: the encoder's few-channel full-resolution convs and the stride-2 split).
//! The decisions and the kernels' shape logic are plain Rust and tested on any machine; what
//! touches the GPU sits behind the `cuda` feature ([`net`]).

pub mod direct_conv;
pub mod direct_net;
pub mod mode;
#[cfg(feature = "cuda")]
pub mod net;

pub use mode::{Execution, GraphError, GraphMode};
