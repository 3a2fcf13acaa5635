//! What a model's training pictures looked like, and whether a picture is far from them. A
//! classifier answers for any picture, and a Fashion-MNIST model calls the Eiffel tower a bag
//! with full confidence; confidence cannot tell, so the pictures themselves are compared. Four
//! features of each picture, at the model's input size and before normalisation: its mean
//! brightness, its contrast, the brightness of its border, and its colour saturation. The
//! model file records the range of each over the training images (the 0.1% and 99.9%
//! quantiles, widened by a small margin); a picture outside any range draws one warning.

use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;

/// The features, in order.
pub const FEATURES: [&str; 4] = ["brightness", "contrast", "border", "saturation"];

/// Quantiles that bound a feature's accepted range.
const LOW_QUANTILE: f64 = 0.001;
const HIGH_QUANTILE: f64 = 0.999;
/// Added on both sides of a range, in the features' 0-1 units: room for the rounding of a
/// re-encoded picture (a JPEG of a gray picture is not exactly gray).
const MARGIN: f32 = 0.02;

/// The training inputs' statistics, stored in the model file's config.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DomainStats {
    /// Per-channel mean of the preprocessed (normalised) training pixels.
    pub channel_mean: Vec<f32>,
    /// Per-channel standard deviation of the preprocessed training pixels.
    pub channel_std: Vec<f32>,
    /// Accepted `[low, high]` of each of [`FEATURES`], in 0-1 units.
    pub ranges: Vec<[f32; 2]>,
    /// Top-1 probability on held-out images at the 1%, 5%, 25% and 50% quantiles.
    pub top1_quantiles: [f32; 4],
    /// Training images the ranges come from.
    pub images: usize,
}

/// The four features of a planar 8-bit picture at the input size (`[C, H, W]`), with the
/// saturation measured on the picture as it came (before any gray conversion).
pub fn features(planar: &[u8], channels: usize, h: usize, w: usize, saturation: f32) -> [f32; 4] {
    let plane = h * w;
    let n = planar.len().max(1) as f64;
    let mean = planar.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = planar
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let (mut border, mut count) = (0f64, 0usize);
    for c in 0..channels {
        for y in 0..h {
            for x in 0..w {
                if y == 0 || x == 0 || y + 1 == h || x + 1 == w {
                    border += f64::from(planar[c * plane + y * w + x]);
                    count += 1;
                }
            }
        }
    }
    [
        (mean / 255.0) as f32,
        (var.sqrt() / 255.0) as f32,
        (border / count.max(1) as f64 / 255.0) as f32,
        saturation,
    ]
}

/// Mean colour saturation (`max - min` of R, G, B, 0-1) over at most 64 x 64 evenly spread
/// pixels; 0 for gray pictures.
pub fn saturation(img: &DynamicImage) -> f32 {
    if !img.color().has_color() {
        return 0.0;
    }
    let (w, h) = (img.width().max(1), img.height().max(1));
    let rgb = img.as_rgb8();
    let (sx, sy) = ((w / 64).max(1), (h / 64).max(1));
    let (mut sum, mut n) = (0f64, 0u64);
    for y in (0..h).step_by(sy as usize) {
        for x in (0..w).step_by(sx as usize) {
            let [r, g, b] = match rgb {
                Some(i) => i.get_pixel(x, y).0,
                None => {
                    let p = image::GenericImageView::get_pixel(img, x, y).0;
                    [p[0], p[1], p[2]]
                }
            };
            let (hi, lo) = (r.max(g).max(b), r.min(g).min(b));
            sum += f64::from(hi - lo);
            n += 1;
        }
    }
    (sum / n.max(1) as f64 / 255.0) as f32
}

/// Saturation of a planar RGB picture (a colour dataset's image); 0 for one channel.
pub fn planar_saturation(planar: &[u8], channels: usize) -> f32 {
    if channels < 3 {
        return 0.0;
    }
    let plane = planar.len() / channels;
    let sum: f64 = (0..plane)
        .map(|i| {
            let (r, g, b) = (planar[i], planar[plane + i], planar[2 * plane + i]);
            f64::from(r.max(g).max(b) - r.min(g).min(b))
        })
        .sum();
    (sum / plane.max(1) as f64 / 255.0) as f32
}

/// The value at quantile `q` of sorted values.
fn quantile(sorted: &[f32], q: f64) -> f32 {
    let i = ((sorted.len().max(1) - 1) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

impl DomainStats {
    /// Measures a training set (its images already at the input size) and the top-1
    /// probabilities of held-out images; `mean` and `std` are the model's normalisation.
    pub fn measure(ds: &Dataset, mean: &[f32], std: &[f32], top1: &[f32]) -> DomainStats {
        let (c, h, w) = (ds.channels, ds.height, ds.width);
        let mut per_feature: Vec<Vec<f32>> = vec![Vec::with_capacity(ds.len()); FEATURES.len()];
        for i in 0..ds.len() {
            let img = ds.image(i);
            let f = features(img, c, h, w, planar_saturation(img, c));
            for (v, x) in per_feature.iter_mut().zip(f) {
                v.push(x);
            }
        }
        let (channel_mean, channel_std) = ds.channel_moments(mean, std);
        let ranges = per_feature
            .iter_mut()
            .map(|v| {
                v.sort_by(f32::total_cmp);
                [
                    (quantile(v, LOW_QUANTILE) - MARGIN).max(0.0),
                    (quantile(v, HIGH_QUANTILE) + MARGIN).min(1.0),
                ]
            })
            .collect();
        let mut t = top1.to_vec();
        t.sort_by(f32::total_cmp);
        DomainStats {
            channel_mean,
            channel_std,
            ranges,
            top1_quantiles: [0.01, 0.05, 0.25, 0.5].map(|q| quantile(&t, q)),
            images: ds.len(),
        }
    }

    /// What sets a picture with these features apart from the training images, if anything:
    /// each feature outside its range, with its value and the range.
    pub fn check(&self, f: &[f32; 4]) -> Option<String> {
        let out: Vec<String> = FEATURES
            .iter()
            .zip(f)
            .zip(&self.ranges)
            .filter(|((_, v), r)| **v < r[0] || **v > r[1])
            .map(|((name, v), r)| format!("{name} {v:.2} outside {:.2}-{:.2}", r[0], r[1]))
            .collect();
        (!out.is_empty()).then(|| {
            format!(
                "unlike the model's training pictures ({}); its answer may mean nothing",
                out.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_pictures_with_known_values() {
        // 4x4 gray: border 200, centre 0.
        let mut p = vec![200u8; 16];
        for (y, x) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            p[y * 4 + x] = 0;
        }
        let f = features(&p, 1, 4, 4, 0.0);
        assert!((f[0] - 150.0 / 255.0).abs() < 1e-6);
        assert!((f[2] - 200.0 / 255.0).abs() < 1e-6);
        // std of 12 x 200 and 4 x 0: sqrt(mean of squares - mean^2) = sqrt(30000 - 22500).
        assert!((f[1] - 7500f32.sqrt() / 255.0).abs() < 1e-5);
        let red =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(10, 10, image::Rgb([255, 0, 0])));
        assert!((saturation(&red) - 1.0).abs() < 1e-6);
        let gray =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(10, 10, image::Rgb([9, 9, 9])));
        assert_eq!(saturation(&gray), 0.0);
    }

    #[test]
    fn ranges_come_from_the_data_and_outliers_are_named() {
        let ds = Dataset {
            pixels: (0..1000u32)
                .flat_map(|i| vec![(i % 100) as u8; 4])
                .collect(),
            labels: vec![0; 1000],
            channels: 1,
            height: 2,
            width: 2,
            classes: vec!["a".into()],
        };
        let s = DomainStats::measure(&ds, &[0.0], &[1.0], &[0.9, 0.5, 0.99]);
        assert_eq!(s.images, 1000);
        assert!(s.ranges[0][1] > 98.0 / 255.0 && s.ranges[0][1] < 0.42);
        assert!(s.check(&[0.2, 0.0, 0.2, 0.0]).is_none());
        let w = s.check(&[0.9, 0.0, 0.2, 0.5]).unwrap();
        assert!(
            w.contains("brightness 0.90") && w.contains("saturation 0.50"),
            "{w}"
        );
        assert!((s.channel_mean[0] - 49.5 / 255.0).abs() < 1e-4);
    }
}
