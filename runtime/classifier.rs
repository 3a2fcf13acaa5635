//! A loaded network with its preprocessing: picture in, top-k labelled scores out.

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::Serialize;

use crate::config::ModelConfig;
use crate::cpu::CpuNet;
use crate::gpu::GraphMode;
use crate::model::{StageTimes, WaeNet};
use crate::preprocess::Preprocessor;
use crate::weights::{self, ModelFile, WeightsError};

/// One ranked class.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Label text.
    pub label: String,
    /// Class index.
    pub class: usize,
    /// Softmax probability.
    pub score: f32,
}

/// Softmax of one logit vector, then the `k` best classes, best first.
pub fn top_k(logits: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
    idx.into_iter()
        .take(k)
        .map(|class| Prediction {
            label: labels.get(class).cloned().unwrap_or_default(),
            class,
            score: exp[class] / sum,
        })
        .collect()
}

/// Which implementation runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum EngineKind {
    /// wae-edge's own NHWC path on the CPU, candle on GPUs.
    #[default]
    Auto,
    /// candle everywhere (the reference path).
    Candle,
}

/// A built network: candle's modules, the native CPU path, or the CUDA engine.
pub enum Engine {
    /// candle (CPU f32 or GPU f16), eager.
    Candle(WaeNet),
    /// wae-edge's own CPU path.
    Cpu(CpuNet),
    /// The CUDA engine: direct encoder kernels, graph replay where the device allows.
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::gpu::net::GpuNet>),
}

impl Engine {
    /// Builds a validated model file for `device`.
    pub fn build(
        file: ModelFile,
        device: &Device,
        kind: EngineKind,
    ) -> Result<Engine, WeightsError> {
        Engine::build_with(file, device, kind, GraphMode::Auto)
    }

    /// [`Engine::build`] with a CUDA graph mode (which only the CUDA engine reads).
    pub fn build_with(
        file: ModelFile,
        device: &Device,
        kind: EngineKind,
        graph: GraphMode,
    ) -> Result<Engine, WeightsError> {
        // Only the CUDA engine reads the graph mode.
        #[cfg(not(feature = "cuda"))]
        let _ = graph;
        if device.is_cpu() && kind == EngineKind::Auto {
            return Ok(Engine::Cpu(CpuNet::from_file(&file)?));
        }
        #[cfg(feature = "cuda")]
        if device.is_cuda() && kind == EngineKind::Auto {
            return Ok(Engine::Cuda(Box::new(
                file.build_with(device, |c, vb| crate::gpu::net::GpuNet::new(c, vb, graph))?,
            )));
        }
        Ok(Engine::Candle(file.build(device)?))
    }

    /// How a CUDA engine runs (`None` for the others).
    pub fn execution(&self) -> Option<crate::gpu::Execution> {
        match self {
            #[cfg(feature = "cuda")]
            Engine::Cuda(n) => Some(n.execution()),
            _ => None,
        }
    }

    /// Whether it wants its input on the host: the CUDA engine uploads a frame itself, in one
    /// copy into its persistent buffer.
    pub fn host_input(&self) -> bool {
        self.execution().is_some()
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        match self {
            Engine::Candle(n) => n.config(),
            Engine::Cpu(n) => n.config(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(n) => n.config(),
        }
    }

    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Candle(_) => "candle",
            Engine::Cpu(_) => "native-cpu",
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => "cuda",
        }
    }

    /// Logits `[n, classes]` and per-stage times of a normalised `[n, C, H, W]` batch.
    pub fn logits_timed(&self, batch: &Tensor) -> candle_core::Result<(Vec<Vec<f32>>, StageTimes)> {
        let n = batch.dim(0)?;
        let (flat, times) = match self {
            Engine::Candle(net) => {
                let x = batch.to_dtype(weights::compute_dtype(batch.device()))?;
                let (y, t) = net.forward_timed(&x)?;
                (
                    y.to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    t,
                )
            }
            Engine::Cpu(net) => {
                let x = batch
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                net.forward(&x, n)
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(net) => {
                let x = batch
                    .to_device(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                net.logits(&x, n)?
            }
        };
        let k = self.config().classes;
        Ok((flat.chunks_exact(k).map(<[f32]>::to_vec).collect(), times))
    }
}

/// Network + preprocessing + device.
pub struct Classifier {
    engine: Engine,
    pre: Preprocessor,
    device: Device,
    input_device: Device,
}

impl Classifier {
    /// Wraps a built engine.
    pub fn new(engine: Engine, device: Device) -> Self {
        let pre = Preprocessor::new(engine.config());
        let input_device = if engine.host_input() {
            Device::Cpu
        } else {
            device.clone()
        };
        Classifier {
            engine,
            pre,
            device,
            input_device,
        }
    }

    /// Maps, validates and builds a model file on `device` with the default engine.
    pub fn load(path: impl AsRef<std::path::Path>, device: &Device) -> Result<Self, WeightsError> {
        Self::load_with(path, device, EngineKind::Auto)
    }

    /// Maps, validates and builds a model file on `device` with the given engine.
    pub fn load_with(
        path: impl AsRef<std::path::Path>,
        device: &Device,
        kind: EngineKind,
    ) -> Result<Self, WeightsError> {
        Self::load_graph(path, device, kind, GraphMode::Auto)
    }

    /// [`Classifier::load_with`] with a CUDA graph mode.
    pub fn load_graph(
        path: impl AsRef<std::path::Path>,
        device: &Device,
        kind: EngineKind,
        graph: GraphMode,
    ) -> Result<Self, WeightsError> {
        let engine = Engine::build_with(ModelFile::open(path)?, device, kind, graph)?;
        Ok(Classifier::new(engine, device.clone()))
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The preprocessing.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.pre
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where its input tensors are built: the CPU for the CUDA engine, which uploads them
    /// itself; the device otherwise.
    pub fn input_device(&self) -> &Device {
        &self.input_device
    }

    /// Logits of a normalised `[N, C, H, W]` f32 batch, as f32 rows.
    pub fn logits(&self, batch: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        Ok(self.engine.logits_timed(batch)?.0)
    }

    /// Top-k classes of each picture.
    pub fn classify(
        &self,
        imgs: &[DynamicImage],
        k: usize,
    ) -> candle_core::Result<Vec<Vec<Prediction>>> {
        let batch = self.pre.batch(imgs, &self.input_device)?;
        let labels = &self.config().labels;
        Ok(self
            .logits(&batch)?
            .iter()
            .map(|l| top_k(l, labels, k))
            .collect())
    }

    /// The network's `[1, C, H, W]` input for one picture and, if the model records what its
    /// training pictures looked like ([`crate::domain`]), the warning a picture far from them
    /// draws; from a single resize.
    pub fn input_and_warning(
        &self,
        img: &DynamicImage,
    ) -> candle_core::Result<(Tensor, Option<String>)> {
        let planar = self.pre.planar_u8(img);
        let warning = self.warning_for(&planar, img);
        let mut data = Vec::with_capacity(planar.len());
        self.pre.normalize_planar(&planar, &mut data);
        let i = self.config().input;
        let x = Tensor::from_vec(data, (1, i.channels, i.height, i.width), &self.input_device)?;
        Ok((x, warning))
    }

    /// The domain warning of a picture given its planar 8-bit form at the input size.
    fn warning_for(&self, planar: &[u8], img: &DynamicImage) -> Option<String> {
        let stats = self.config().domain.as_ref()?;
        let i = self.config().input;
        let f = crate::domain::features(
            planar,
            i.channels,
            i.height,
            i.width,
            crate::domain::saturation(img),
        );
        stats.check(&f)
    }

    /// Top-k of one normalised `[1, C, H, W]` input with per-stage times.
    pub fn classify_timed(
        &self,
        input: &Tensor,
        k: usize,
    ) -> candle_core::Result<(Vec<Prediction>, StageTimes)> {
        let (rows, times) = self.engine.logits_timed(input)?;
        let row = rows.into_iter().next().unwrap_or_default();
        Ok((top_k(&row, &self.config().labels, k), times))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_softmax() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = top_k(&[0.0, 2.0_f32.ln(), 0.0], &labels, 2);
        assert_eq!(p[0].class, 1);
        assert!((p[0].score - 0.5).abs() < 1e-6);
        assert!((p[1].score - 0.25).abs() < 1e-6);
        assert_eq!(p.len(), 2);
        assert_eq!(top_k(&[1.0], &labels[..1], 5).len(), 1);
    }
}
