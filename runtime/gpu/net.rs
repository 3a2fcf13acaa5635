//! The CUDA engine: the network on a dedicated stream with event tracking off, the encoder on
//! the direct kernels, and (where [`super::mode`] allows) the whole forward pass captured once
//! per batch size into a CUDA graph. A frame is then one host-to-device copy into a persistent
//! input buffer, one graph launch and one copy of the logits back. Events recorded between the
//! stages (as graph nodes when captured) time each stage on the GPU without synchronising the
//! host in between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaGraph, CudaStream, DevicePtr,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use half::{f16, slice::HalfFloatSliceExt};

use super::direct_net::DirectNet;
use super::mode::{self, Execution, GraphMode};
use crate::config::ModelConfig;
use crate::model::{StageTimes, WaeNet};

/// Batch sizes kept captured at once; a new size past this evicts the others.
const MAX_GRAPHS: usize = 4;
/// Eager passes before a capture: they populate candle's parameter and upload caches, which a
/// capture may only read.
const WARMUP: usize = 2;

/// Five timing events: before the encoder and after each of the four stages.
struct Marks([CudaEvent; 5]);

impl Marks {
    fn new(stream: &CudaStream) -> Result<Marks> {
        let ev = || {
            stream
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .w()
        };
        Ok(Marks([ev()?, ev()?, ev()?, ev()?, ev()?]))
    }

    /// Records mark `i`; `external` makes it a node of a graph being captured (a plain record
    /// during capture only orders work and is never timed).
    fn record(&self, i: usize, stream: &CudaStream, external: bool) -> Result<()> {
        let e = &self.0[i];
        if external {
            let flags = sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as std::ffi::c_uint;
            // SAFETY: a live event and a live stream of the same context.
            unsafe { sys::cuEventRecordWithFlags(e.cu_event(), stream.cu_stream(), flags) }
                .result()
                .w()
        } else {
            e.record(stream).w()
        }
    }

    /// GPU time of each stage of the last pass (waits for it).
    fn stages(&self) -> Result<StageTimes> {
        let ms = |a: usize| -> Result<Duration> {
            let t = self.0[a].elapsed_ms(&self.0[a + 1]).w()?;
            Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
        };
        Ok(StageTimes {
            encoder: ms(0)?,
            backbone: ms(1)?,
            branch: ms(2)?,
            heads: ms(3)?,
        })
    }
}

/// One captured forward pass for one batch size.
struct Captured {
    graph: CudaGraph,
    /// Persistent f16 input the graph reads.
    input: Tensor,
    /// f32 logits the graph writes (allocated inside the capture; freed and rewritten at the
    /// same address on every launch).
    output: Tensor,
    marks: Marks,
}

// SAFETY: a CUDA graph may be launched from any thread as long as calls on it are serialised;
// every use goes through the `Mutex` in `GpuNet`.
unsafe impl Send for Captured {}

/// The network on a CUDA device, eager or replayed from graphs.
pub struct GpuNet {
    net: DirectNet,
    device: Device,
    cuda: CudaDevice,
    stream: Arc<CudaStream>,
    mode: GraphMode,
    execution: Mutex<Execution>,
    graphs: Mutex<HashMap<usize, Captured>>,
    eager_marks: Marks,
}

impl GpuNet {
    /// Builds the network from `vb` (on a CUDA device) and plans graph or eager execution.
    pub fn new(config: &ModelConfig, vb: VarBuilder, mode: GraphMode) -> Result<GpuNet> {
        let device = vb.device().clone();
        let Device::Cuda(cuda) = &device else {
            return Err(candle_core::Error::Msg(
                "the CUDA engine needs a CUDA device".into(),
            ));
        };
        let cuda = cuda.clone();
        let stream = cuda.cuda_stream();
        let execution = mode::plan(mode, stream.context().has_async_alloc())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let net = DirectNet::new(WaeNet::new(config, vb)?)?;
        Ok(GpuNet {
            net,
            eager_marks: Marks::new(&stream)?,
            device,
            cuda,
            stream,
            mode,
            execution: Mutex::new(execution),
            graphs: Mutex::new(HashMap::new()),
        })
    }

    /// The config this network was built from.
    pub fn config(&self) -> &ModelConfig {
        self.net.config()
    }

    /// How passes run now (a failed capture under `auto` turns this to eager).
    pub fn execution(&self) -> Execution {
        self.execution
            .lock()
            .map(|e| e.clone())
            .unwrap_or(Execution::Eager {
                reason: "poisoned lock".into(),
            })
    }

    /// How many convs of a pass run on the direct kernel.
    pub fn direct_convs(&self) -> usize {
        self.net.direct_convs()
    }

    /// The forward pass on an f16 `[n, C, H, W]` device tensor, f32 logits out; records the
    /// stage marks.
    fn forward(&self, x: &Tensor, marks: &Marks, capturing: bool) -> Result<Tensor> {
        // candle's small uploads (shapes, strides) come from its cache while this is held, as a
        // capture requires. Per thread, and never around the frame's own upload: the cache
        // keys on content, so frames would fill it.
        let _cache = self.cuda.enable_cuda_graph_htod_cache();
        self.net
            .forward_marked(x, |i| marks.record(i, &self.stream, capturing))?
            .to_dtype(DType::F32)
    }

    /// Warms up and captures the pass for batch `n`.
    fn capture(&self, n: usize) -> Result<Captured> {
        let i = self.config().input;
        let input = Tensor::zeros((n, i.channels, i.height, i.width), DType::F16, &self.device)?;
        let marks = Marks::new(&self.stream)?;
        for _ in 0..WARMUP {
            self.forward(&input, &marks, false)?;
        }
        self.device.synchronize()?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let traced = self.forward(&input, &marks, true);
        // The capture must end whatever happened, or the stream stays unusable.
        let ended = self.stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let output = traced?;
        let graph = ended
            .w()?
            .ok_or_else(|| candle_core::Error::Msg("the capture recorded nothing".into()))?;
        graph.upload().w()?;
        Ok(Captured {
            graph,
            input,
            output,
            marks,
        })
    }

    /// Logits `[n * classes]` and GPU stage times of `n` normalised f32 inputs on the host.
    pub fn logits(&self, x: &[f32], n: usize) -> Result<(Vec<f32>, StageTimes)> {
        let mut host = vec![f16::ZERO; x.len()];
        host.convert_from_f32_slice(x);
        if matches!(self.execution.lock().as_deref(), Ok(Execution::Graph)) {
            match self.logits_graph(&host, n) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let fallback = mode::after_failed_capture(self.mode, &e.to_string())
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    eprintln!("cuda: {fallback}");
                    if let Ok(mut ex) = self.execution.lock() {
                        *ex = fallback;
                    }
                    // A failed capture may leave the context with an error: start clean.
                    self.device.synchronize()?;
                }
            }
        }
        self.logits_eager(&host, n)
    }

    fn logits_eager(&self, host: &[f16], n: usize) -> Result<(Vec<f32>, StageTimes)> {
        let i = self.config().input;
        let x = Tensor::from_slice(host, (n, i.channels, i.height, i.width), &self.device)?;
        let y = self.forward(&x, &self.eager_marks, false)?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((out, self.eager_marks.stages()?))
    }

    fn logits_graph(&self, host: &[f16], n: usize) -> Result<(Vec<f32>, StageTimes)> {
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| candle_core::Error::Msg("graph cache lock poisoned".into()))?;
        if !graphs.contains_key(&n) {
            if graphs.len() >= MAX_GRAPHS {
                graphs.clear();
            }
            let captured = self.capture(n)?;
            graphs.insert(n, captured);
        }
        let c = &graphs[&n];
        // One copy in, into the buffer the graph reads.
        {
            let (storage, layout) = c.input.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(candle_core::Error::Msg("graph input is not on CUDA".into()));
            };
            let slice = cs.as_cuda_slice::<f16>()?;
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            let dst = ptr + (layout.start_offset() * std::mem::size_of::<f16>()) as u64;
            if host.len() != layout.shape().elem_count() {
                return Err(candle_core::Error::Msg("graph input size mismatch".into()));
            }
            // SAFETY: `dst` spans the input's `host.len()` f16 values on this stream's context.
            unsafe { result::memcpy_htod_async(dst, host, self.stream.cu_stream()) }.w()?;
        }
        // One launch.
        c.graph.launch().w()?;
        // One copy out (synchronous for pageable memory).
        let out = {
            let (storage, layout) = c.output.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(candle_core::Error::Msg(
                    "graph output is not on CUDA".into(),
                ));
            };
            let (a, b) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("graph output is not contiguous".into()))?;
            let out = self
                .stream
                .clone_dtoh(&cs.as_cuda_slice::<f32>()?.slice(a..b))
                .w()?;
            self.stream.synchronize().w()?;
            out
        };
        Ok((out, c.marks.stages()?))
    }
}
