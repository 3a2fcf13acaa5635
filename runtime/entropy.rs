//! Dataset entropy as EBCLE (Gowdra et al., 2021) computes it: for each training image, the
//! Shannon entropy in nats of the histogram of its pixel values (all channels pooled, one bin per
//! distinct value, like scikit-image's `shannon_entropy(img, base=e)`), averaged over the set.

use serde::Serialize;

use crate::dataset::Dataset;

/// Shannon entropy in nats of the value histogram of 8-bit pixels.
pub fn image_entropy(pixels: &[u8]) -> f64 {
    if pixels.is_empty() {
        return 0.0;
    }
    let mut hist = [0usize; 256];
    for &p in pixels {
        hist[p as usize] += 1;
    }
    let n = pixels.len() as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| c as f64 / n)
        .map(|p| -p * p.ln())
        .sum::<f64>()
        .max(0.0)
}

/// Mean and spread of the per-image entropies of a dataset.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct EntropyReport {
    /// Images measured.
    pub n: usize,
    /// Mean entropy in nats (the dataset entropy).
    pub mean_nats: f64,
    /// Standard deviation in nats.
    pub std_nats: f64,
    /// Smallest per-image entropy.
    pub min_nats: f64,
    /// Largest per-image entropy.
    pub max_nats: f64,
    /// The upper bound for 8-bit data, ln 256.
    pub bound_nats: f64,
}

/// Per-image entropies of every image of `ds`, summarised.
pub fn dataset_entropy(ds: &Dataset) -> EntropyReport {
    let e: Vec<f64> = (0..ds.len()).map(|i| image_entropy(ds.image(i))).collect();
    let n = e.len().max(1) as f64;
    let mean = e.iter().sum::<f64>() / n;
    let var = e.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    EntropyReport {
        n: e.len(),
        mean_nats: mean,
        std_nats: var.sqrt(),
        min_nats: e.iter().copied().fold(f64::INFINITY, f64::min),
        max_nats: e.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        bound_nats: 256f64.ln(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_entropies() {
        assert_eq!(image_entropy(&[7; 100]), 0.0);
        assert!((image_entropy(&[0, 255, 0, 255]) - 2f64.ln()).abs() < 1e-12);
        let all: Vec<u8> = (0..=255).collect();
        assert!((image_entropy(&all) - 256f64.ln()).abs() < 1e-12);
        // 3:1 split: -(0.75 ln 0.75 + 0.25 ln 0.25)
        assert!((image_entropy(&[1, 1, 1, 9]) - 0.562_335_144_618_645).abs() < 1e-12);
    }

    #[test]
    fn dataset_mean_and_spread() {
        let ds = Dataset {
            pixels: vec![5, 5, 5, 5, 0, 255, 0, 255],
            labels: vec![0, 1],
            channels: 1,
            height: 2,
            width: 2,
            classes: vec!["a".into(), "b".into()],
        };
        let r = dataset_entropy(&ds);
        assert_eq!(r.n, 2);
        assert!((r.mean_nats - 2f64.ln() / 2.0).abs() < 1e-12);
        assert!((r.std_nats - 2f64.ln() / 2.0).abs() < 1e-12);
        assert_eq!((r.min_nats, r.max_nats), (0.0, 2f64.ln()));
    }
}
