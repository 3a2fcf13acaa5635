//! A loaded network with its preprocessing: picture in, top-k labelled scores out.

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::Serialize;

use crate::config::ModelConfig;
use crate::model::{StageTimes, WaeNet};
use crate::preprocess::Preprocessor;
use crate::weights::{self, WeightsError};

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

/// Network + preprocessing + device.
pub struct Classifier {
    net: WaeNet,
    pre: Preprocessor,
    device: Device,
}

impl Classifier {
    /// Wraps a built network.
    pub fn new(net: WaeNet, device: Device) -> Self {
        let pre = Preprocessor::new(net.config());
        Classifier { net, pre, device }
    }

    /// Maps, validates and builds a model file on `device`.
    pub fn load(path: impl AsRef<std::path::Path>, device: &Device) -> Result<Self, WeightsError> {
        Ok(Classifier::new(
            weights::load(path, device)?,
            device.clone(),
        ))
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.net.config()
    }

    /// The network.
    pub fn net(&self) -> &WaeNet {
        &self.net
    }

    /// The preprocessing.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.pre
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits of a normalised `[N, C, H, W]` f32 batch, as f32 rows.
    pub fn logits(&self, batch: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        let x = batch.to_dtype(weights::compute_dtype(&self.device))?;
        self.net
            .forward_t(&x, false)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()
    }

    /// Top-k classes of each picture.
    pub fn classify(
        &self,
        imgs: &[DynamicImage],
        k: usize,
    ) -> candle_core::Result<Vec<Vec<Prediction>>> {
        let batch = self.pre.batch(imgs, &self.device)?;
        let labels = &self.config().labels;
        Ok(self
            .logits(&batch)?
            .iter()
            .map(|l| top_k(l, labels, k))
            .collect())
    }

    /// Top-k of one normalised `[1, C, H, W]` input with per-stage times.
    pub fn classify_timed(
        &self,
        input: &Tensor,
        k: usize,
    ) -> candle_core::Result<(Vec<Prediction>, StageTimes)> {
        let x = input.to_dtype(weights::compute_dtype(&self.device))?;
        let (logits, times) = self.net.forward_timed(&x)?;
        let row = logits
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
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
