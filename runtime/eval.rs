//! Test-set evaluation through the same inference path as `classify`: accuracy, per-class
//! accuracy and the confusion matrix.

use candle_core::Tensor;
use serde::Serialize;

use crate::classifier::Classifier;
use crate::dataset::Dataset;

/// Accuracy figures of a model on a labelled dataset.
#[derive(Serialize, Clone, Debug)]
pub struct EvalReport {
    /// Fraction of images whose top-1 class is right.
    pub accuracy: f64,
    /// Number of images.
    pub n: usize,
    /// Accuracy of each class (NaN-free: classes with no images get 0).
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Class names.
    pub labels: Vec<String>,
    /// Fraction of the images that would draw a domain warning (`classify` on pictures far
    /// from the training ones), where the model records its training pictures' statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_warnings: Option<f64>,
    /// Each image's top-1 probability, in dataset order (for calibration; not printed).
    #[serde(skip)]
    pub top1: Vec<f32>,
}

/// Why a dataset cannot be evaluated by a model.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Image geometry or class count differs from the model's.
    #[error("dataset ({got}) does not fit the model ({expected})")]
    Mismatch {
        /// Model's expectation.
        expected: String,
        /// Dataset's geometry.
        got: String,
    },
    /// Inference failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Normalised `[n, C, H, W]` tensor of the images at `idx`.
pub fn batch_tensor(clf: &Classifier, ds: &Dataset, idx: &[usize]) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(idx.len() * ds.image(0).len());
    for &i in idx {
        clf.preprocessor().normalize_planar(ds.image(i), &mut data);
    }
    Tensor::from_vec(
        data,
        (idx.len(), ds.channels, ds.height, ds.width),
        clf.input_device(),
    )
}

/// Classifies every image of `ds` in batches of `batch` and tallies the results.
pub fn evaluate(
    clf: &Classifier,
    ds: &Dataset,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    let input = clf.config().input;
    if (input.channels, input.height, input.width) != (ds.channels, ds.height, ds.width)
        || ds.classes.len() > clf.config().classes
    {
        return Err(EvalError::Mismatch {
            expected: format!(
                "{}x{}x{}, {} classes",
                input.channels,
                input.height,
                input.width,
                clf.config().classes
            ),
            got: format!(
                "{}x{}x{}, {} classes",
                ds.channels,
                ds.height,
                ds.width,
                ds.classes.len()
            ),
        });
    }
    let k = clf.config().classes;
    let mut confusion = vec![vec![0usize; k]; k];
    let mut top1 = Vec::with_capacity(ds.len());
    let mut warned = 0usize;
    let stats = clf.config().domain.as_ref();
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let logits = clf.logits(&batch_tensor(clf, ds, chunk)?)?;
        for (&i, row) in chunk.iter().zip(&logits) {
            let pred = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |p| p.0);
            confusion[ds.labels[i] as usize][pred] += 1;
            // Softmax of the top logit.
            let sum: f32 = row.iter().map(|v| (v - row[pred]).exp()).sum();
            top1.push(1.0 / sum);
            if let Some(s) = stats {
                let img = ds.image(i);
                let f = crate::domain::features(
                    img,
                    ds.channels,
                    ds.height,
                    ds.width,
                    crate::domain::planar_saturation(img, ds.channels),
                );
                warned += usize::from(s.check(&f).is_some());
            }
        }
        progress(chunk.len());
    }
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let n: usize = row.iter().sum();
            if n == 0 {
                0.0
            } else {
                row[c] as f64 / n as f64
            }
        })
        .collect();
    Ok(EvalReport {
        accuracy: correct as f64 / ds.len().max(1) as f64,
        n: ds.len(),
        per_class,
        confusion,
        labels: clf.config().labels.clone(),
        domain_warnings: stats.map(|_| warned as f64 / ds.len().max(1) as f64),
        top1,
    })
}
