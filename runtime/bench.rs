//! Honest timing of the bare network: warm-up excluded, init and first inference reported apart,
//! percentiles per stage, and a baseline measured in the same run, alternating in short rounds so
//! that drift on a shared machine hits both models alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::classifier::{Engine, EngineKind};
use crate::gpu::GraphMode;
use crate::model::macs;
use crate::stats::{summarize, Summary};
use crate::weights::ModelFile;

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// A fixed number of timed iterations (per model).
    Iters(usize),
    /// Wall time for the whole timed phase.
    Seconds(f64),
}

/// A model loaded for benchmarking, with what loading cost.
pub struct Bench {
    /// The network.
    pub engine: Engine,
    /// Fixed input batch.
    pub input: Tensor,
    /// mmap + validation + build.
    pub init: Duration,
    /// The first forward pass (allocations, page faults).
    pub first: Duration,
    /// Inference MACs per image.
    pub macs: u64,
    /// Model path.
    pub path: String,
    samples: Vec<Duration>,
    stages: BTreeMap<&'static str, Vec<Duration>>,
    /// Per pass, the sum of the stage times (GPU time for the CUDA engine).
    gpu: Vec<Duration>,
}

/// Results for one model.
#[derive(Serialize, Clone, Debug)]
pub struct BenchReport {
    /// Model path.
    pub model: String,
    /// Batch size.
    pub batch: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Median latency of one batch.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Fastest batch.
    pub min_ms: f64,
    /// Images per second at the median.
    pub fps: f64,
    /// 2 x MACs x batch / median.
    pub gflops: f64,
    /// mmap + validation + build, ms.
    pub init_ms: f64,
    /// First inference, ms.
    pub first_ms: f64,
    /// Per-stage percentiles (encoder, backbone, branch, heads).
    pub stages: BTreeMap<&'static str, Summary>,
    /// Inference MACs per image.
    pub macs: u64,
    /// How the CUDA engine ran: `graph` or `eager` (absent elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<String>,
    /// CUDA engine: median GPU time of a pass between events recorded around it (in graph mode
    /// the kernels run back to back, so about their summed time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_p50_ms: Option<f64>,
    /// Largest logit difference from the CPU engine on the same (f16-rounded) input, over the
    /// largest CPU logit; set by [`Bench::rel_diff_to_cpu`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_diff: Option<f64>,
    /// Per-conv medians, when asked for ([`Bench::layers`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerReport>>,
}

/// One conv's median time over profiled passes.
#[derive(Serialize, Clone, Debug)]
pub struct LayerReport {
    /// Tensor prefix, e.g. `backbone.s2.c1`.
    pub layer: String,
    /// Input map and channels, e.g. `28x28 256->256`.
    pub shape: String,
    /// The kernel that runs it.
    pub kernel: &'static str,
    /// Median over the passes.
    pub p50_ms: f64,
    /// Megabytes of weights the conv reads a pass, as its kernel lays them out.
    pub weight_mb: f64,
    /// Those weights' megabytes over the median time, in GB/s: near the machine's memory
    /// bandwidth, the conv waits on memory rather than arithmetic.
    pub weight_gb_s: f64,
    /// Millions of multiply-adds its kernel does a pass: Winograd's products (fewer than direct
    /// convolution's, more where tiles overhang the map), or direct convolution's.
    pub mults_m: f64,
    /// Those over the median, in G multiply-adds per second: set against the machine's FMA peak,
    /// how well the kernel runs whatever the transform saved.
    pub mults_g_s: f64,
}

impl Bench {
    /// Loads `path` on `device` with the `kind` engine (CUDA graphs per `graph`) and prepares a
    /// random input of `batch` images.
    pub fn load(
        path: &std::path::Path,
        device: &Device,
        batch: usize,
        kind: EngineKind,
        graph: GraphMode,
    ) -> Result<Bench, crate::weights::WeightsError> {
        let t = Instant::now();
        let file = ModelFile::open(path)?;
        let config = file.config().clone();
        let engine = Engine::build_with(file, device, kind, graph)?;
        let init = t.elapsed();
        let candle = |cause| crate::weights::WeightsError::Candle {
            path: path.into(),
            cause,
        };
        let i = config.input;
        let input_device = if engine.host_input() {
            &Device::Cpu
        } else {
            device
        };
        let input = Tensor::randn(
            0f32,
            1.0,
            (batch.max(1), i.channels, i.height, i.width),
            input_device,
        )
        .map_err(candle)?;
        let t = Instant::now();
        engine.logits_timed(&input).map_err(candle)?;
        let first = t.elapsed();
        Ok(Bench {
            engine,
            input,
            init,
            first,
            macs: macs::count(&config).total,
            path: path.display().to_string(),
            samples: vec![],
            stages: BTreeMap::new(),
            gpu: vec![],
        })
    }

    /// One timed forward pass with its per-stage split; returns its wall time.
    fn step(&mut self, record: bool) -> candle_core::Result<Duration> {
        let t = Instant::now();
        let (_, st) = self.engine.logits_timed(&self.input)?;
        let total = t.elapsed();
        if record {
            self.samples.push(total);
            for (name, d) in st.named() {
                self.stages.entry(name).or_default().push(d);
            }
            self.gpu.push(st.named().iter().map(|(_, d)| *d).sum());
        }
        Ok(total)
    }

    /// Largest logit difference between this engine and the CPU engine on the same input
    /// (rounded to f16, as a GPU engine sees it), over the largest CPU logit; `None` when this
    /// is the CPU engine.
    pub fn rel_diff_to_cpu(&self) -> Result<Option<f64>, crate::weights::WeightsError> {
        if matches!(self.engine, Engine::Cpu(_)) {
            return Ok(None);
        }
        let candle = |cause| crate::weights::WeightsError::Candle {
            path: self.path.clone().into(),
            cause,
        };
        let cpu = Engine::build(ModelFile::open(&self.path)?, &Device::Cpu, EngineKind::Auto)?;
        let x = self
            .input
            .to_device(&Device::Cpu)
            .and_then(|x| x.to_dtype(candle_core::DType::F16))
            .and_then(|x| x.to_dtype(candle_core::DType::F32))
            .map_err(candle)?;
        let (ours, _) = self
            .engine
            .logits_timed(&x.to_device(self.input.device()).map_err(candle)?)
            .map_err(candle)?;
        let (reference, _) = cpu.logits_timed(&x).map_err(candle)?;
        let (mut diff, mut top) = (0f64, 0f64);
        for (a, b) in ours.iter().flatten().zip(reference.iter().flatten()) {
            diff = diff.max(f64::from((a - b).abs()));
            top = top.max(f64::from(b.abs()));
        }
        Ok(Some(diff / top.max(f64::MIN_POSITIVE)))
    }

    /// The report of what was recorded.
    pub fn report(&self) -> BenchReport {
        let s = summarize(&self.samples);
        // Only the CUDA engine has an execution mode, and its stage times are GPU time.
        let execution = self.engine.execution();
        let gpu_p50_ms = execution.is_some().then(|| summarize(&self.gpu).p50_ms);
        let batch = self.input.dim(0).unwrap_or(1);
        BenchReport {
            model: self.path.clone(),
            batch,
            iters: s.n,
            p50_ms: s.p50_ms,
            p90_ms: s.p90_ms,
            p99_ms: s.p99_ms,
            min_ms: s.min_ms,
            fps: batch as f64 * 1e3 / s.p50_ms,
            gflops: 2.0 * self.macs as f64 * batch as f64 / (s.p50_ms * 1e6),
            init_ms: self.init.as_secs_f64() * 1e3,
            first_ms: self.first.as_secs_f64() * 1e3,
            stages: self
                .stages
                .iter()
                .map(|(k, v)| (*k, summarize(v)))
                .collect(),
            macs: self.macs,
            execution: execution.map(|e| e.name().to_string()),
            gpu_p50_ms,
            max_rel_diff: None,
            layers: None,
        }
    }

    /// Every conv's median time over `passes` profiled passes of the first image, in network
    /// order; `None` on the candle engine, whose convs are candle ops with no per-layer hook.
    pub fn layers(&self, passes: usize) -> candle_core::Result<Option<Vec<LayerReport>>> {
        let Engine::Cpu(net) = &self.engine else {
            return Ok(None);
        };
        let x = self.input.flatten_all()?.to_vec1::<f32>()?;
        let runs: Vec<_> = (0..passes.max(1)).map(|_| net.profile(&x)).collect();
        Ok(Some(
            runs[0]
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let p50_ms =
                        summarize(&runs.iter().map(|r| r[i].time).collect::<Vec<_>>()).p50_ms;
                    let weight_mb = l.weight_bytes as f64 / 1e6;
                    let mults_m = l.multiplies as f64 / 1e6;
                    let per_ms = |x: f64| if p50_ms > 0.0 { x / p50_ms } else { 0.0 };
                    LayerReport {
                        layer: l.name.clone(),
                        shape: l.shape.clone(),
                        kernel: l.kernel,
                        p50_ms,
                        weight_mb,
                        weight_gb_s: per_ms(weight_mb),
                        mults_m,
                        mults_g_s: per_ms(mults_m),
                    }
                })
                .collect(),
        ))
    }
}

/// Wall time each model gets per round when several are timed.
const ROUND: Duration = Duration::from_millis(200);

/// Warms up, then times `models` in alternating rounds of about [`ROUND`] each (A A A, B B B,
/// A A A, ...) within `budget`; `progress` sees the elapsed fraction. With several models each
/// round starts with one untimed pass: the other model has just evicted this one's weights and
/// activations from the caches, which a deployed model, running alone, never suffers. Alternating
/// single passes instead charged that eviction to every pass of both (WAE-VGG16 against VGG16:
/// 92 ms against 70 ms alone).
pub fn run(
    models: &mut [Bench],
    warmup: usize,
    budget: Budget,
    mut progress: impl FnMut(f64),
) -> candle_core::Result<()> {
    let mut last = vec![Duration::ZERO; models.len()];
    for _ in 0..warmup {
        for (m, l) in models.iter_mut().zip(&mut last) {
            *l = m.step(false)?;
        }
    }
    let per_round: Vec<usize> = last
        .iter()
        .map(|l| (ROUND.as_secs_f64() / l.as_secs_f64().max(1e-6)).clamp(1.0, 1e4) as usize)
        .collect();
    let rewarm = models.len() > 1;
    let t = Instant::now();
    loop {
        let frac = match budget {
            Budget::Iters(n) => {
                let done = models.iter().map(|m| m.samples.len()).min().unwrap_or(0);
                done as f64 / n.max(1) as f64
            }
            Budget::Seconds(s) => t.elapsed().as_secs_f64() / s,
        };
        if frac >= 1.0 && models.iter().all(|m| !m.samples.is_empty()) {
            break;
        }
        progress(frac.min(1.0));
        for (m, &r) in models.iter_mut().zip(&per_round) {
            if rewarm {
                m.step(false)?;
            }
            for _ in 0..r {
                if matches!(budget, Budget::Iters(n) if m.samples.len() >= n) {
                    break;
                }
                m.step(true)?;
            }
        }
    }
    Ok(())
}
