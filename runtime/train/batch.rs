//! Training batches: a deterministic shuffle, a validation split drawn per class, class-balanced
//! sampling, and normalised batches with one of two augmentation recipes: Fashion-MNIST's
//! (flip, shift) or the photo recipe (random resized crop, flip, colour jitter).

use candle_core::{Device, Tensor};
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::preprocess::Preprocessor;

/// Which augmentations a run applies (when augmenting at all).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// Fashion-MNIST's: horizontal flip, shift by up to 2 px (zero fill).
    #[default]
    FlipShift,
    /// For photos: random resized crop (8-100% of the area, aspect 3:4 to 4:3), horizontal
    /// flip, brightness, contrast and saturation jitter (each x0.7 to x1.3).
    Photo,
}

/// Smallest share of the picture's area a random resized crop keeps.
const CROP_MIN_AREA: f64 = 0.35;
/// Colour jitter factors are drawn from `1 +- JITTER`.
const JITTER: f32 = 0.3;

/// Deterministic shuffle of `0..n` for a seed.
pub(super) fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Splits `0..labels.len()` into (validation, training) indices, drawing about `val` images
/// from each class in proportion to its size (at least one from a class of two or more, never
/// a whole class), shuffled by `seed`.
pub(super) fn split_per_class(labels: &[u8], val: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let order = shuffled(labels.len(), seed);
    let n = labels.len().max(1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); 256];
    for &i in &order {
        by_class[labels[i] as usize].push(i);
    }
    let (mut val_idx, mut train_idx) = (Vec::new(), Vec::new());
    for members in by_class.iter().filter(|m| !m.is_empty()) {
        let share = (val * members.len()).div_ceil(n);
        let take = if val == 0 {
            0
        } else {
            share.max(1).min(members.len() - 1)
        };
        val_idx.extend_from_slice(&members[..take]);
        train_idx.extend_from_slice(&members[take..]);
    }
    // Class by class above; the shuffle mixes them again (training reshuffles every epoch).
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    train_idx.shuffle(&mut rng);
    (val_idx, train_idx)
}

/// One epoch's worth of indices drawn from `train_idx` with replacement, each class equally
/// likely (weights 1 / class size): a class with few pictures is seen as often as the rest.
pub(super) fn balanced_epoch(train_idx: &[usize], labels: &[u8], rng: &mut StdRng) -> Vec<usize> {
    let mut counts = [0usize; 256];
    for &i in train_idx {
        counts[labels[i] as usize] += 1;
    }
    let weights = train_idx
        .iter()
        .map(|&i| 1.0 / counts[labels[i] as usize] as f64);
    match WeightedIndex::new(weights) {
        Ok(dist) => (0..train_idx.len())
            .map(|_| train_idx[dist.sample(rng)])
            .collect(),
        Err(_) => train_idx.to_vec(),
    }
}

/// Normalised batch and labels; with `rng`, each image is augmented by `recipe`.
pub fn make_batch(
    pre: &Preprocessor,
    ds: &Dataset,
    idx: &[usize],
    rng: Option<(&mut StdRng, Recipe)>,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let mut data = Vec::with_capacity(idx.len() * c * h * w);
    let mut aug = rng;
    let mut moved = vec![0u8; c * h * w];
    let mut resizer = Resizer::new();
    for &i in idx {
        let img = ds.image(i);
        match aug.as_mut() {
            None => pre.normalize_planar(img, &mut data),
            Some((r, Recipe::FlipShift)) => {
                flip_shift(img, (c, h, w), r, &mut moved);
                pre.normalize_planar(&moved, &mut data);
            }
            Some((r, Recipe::Photo)) => {
                photo(img, (c, h, w), r, &mut resizer, &mut moved)?;
                pre.normalize_planar(&moved, &mut data);
            }
        }
    }
    let x = Tensor::from_vec(data, (idx.len(), c, h, w), dev)?;
    let y = Tensor::from_vec(
        idx.iter().map(|&i| ds.labels[i] as u32).collect::<Vec<_>>(),
        idx.len(),
        dev,
    )?;
    Ok((x, y))
}

/// Flips (p = 0.5) and shifts by up to 2 px with zero fill, planar `img` into `out`.
fn flip_shift(img: &[u8], (c, h, w): (usize, usize, usize), r: &mut StdRng, out: &mut [u8]) {
    let flip = r.random_bool(0.5);
    let (dy, dx) = (r.random_range(-2i64..=2), r.random_range(-2i64..=2));
    for ch in 0..c {
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let (sy, sx0) = (y - dy, x - dx);
                let sx = if flip { w as i64 - 1 - sx0 } else { sx0 };
                let v = if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
                    img[ch * h * w + (sy as usize) * w + sx as usize]
                } else {
                    0
                };
                out[ch * h * w + (y as usize) * w + x as usize] = v;
            }
        }
    }
}

/// The photo recipe on planar `img` into `out` (same size): a random crop resized back
/// (fast_image_resize, bilinear), a flip, then saturation, contrast and brightness jitter.
fn photo(
    img: &[u8],
    (c, h, w): (usize, usize, usize),
    r: &mut StdRng,
    resizer: &mut Resizer,
    out: &mut [u8],
) -> candle_core::Result<()> {
    let area = r.random_range(CROP_MIN_AREA..=1.0);
    let ratio = r.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln()).exp();
    let cw = ((area * ratio).sqrt() * w as f64).clamp(1.0, w as f64);
    let chh = ((area / ratio).sqrt() * h as f64).clamp(1.0, h as f64);
    let left = r.random_range(0.0..=w as f64 - cw);
    let top = r.random_range(0.0..=h as f64 - chh);
    let flip = r.random_bool(0.5);
    let mut factor = || r.random_range(1.0 - JITTER..=1.0 + JITTER);
    let (sat, contrast, bright) = (factor(), factor(), factor());

    let plane = h * w;
    let mut interleaved = vec![0u8; c * plane];
    for (i, px) in interleaved.chunks_exact_mut(c).enumerate() {
        for (ch, v) in px.iter_mut().enumerate() {
            *v = img[ch * plane + i];
        }
    }
    let kind = if c == 3 {
        PixelType::U8x3
    } else {
        PixelType::U8
    };
    let err = |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("augmentation: {e}"));
    let src = Image::from_vec_u8(w as u32, h as u32, interleaved, kind).map_err(|e| err(&e))?;
    let mut dst = Image::new(w as u32, h as u32, kind);
    let opts = ResizeOptions::new()
        .crop(left, top, cw, chh)
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    resizer.resize(&src, &mut dst, &opts).map_err(|e| err(&e))?;
    let px = dst.buffer();
    // Gray value of each pixel (luma weights), and of the whole crop for the contrast pivot.
    let gray = |i: usize| -> f32 {
        if c == 3 {
            0.299 * f32::from(px[3 * i])
                + 0.587 * f32::from(px[3 * i + 1])
                + 0.114 * f32::from(px[3 * i + 2])
        } else {
            f32::from(px[i])
        }
    };
    let mean = (0..plane).map(gray).sum::<f32>() / plane.max(1) as f32;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let sx = if flip { w - 1 - x } else { x };
            let s = y * w + sx;
            let g = gray(s);
            for ch in 0..c {
                let v = f32::from(px[s * c + ch]);
                let v = g + sat * (v - g);
                let v = mean + contrast * (v - mean);
                out[ch * plane + i] = (v * bright).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InputSpec, Preprocess, ResizeMode};

    fn colour_set() -> Dataset {
        let (c, h, w) = (3, 20, 24);
        let mut pixels = Vec::new();
        for i in 0..4u8 {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        pixels.push((i * 40 + ch as u8 * 30 + (x * 5 + y * 3) as u8) % 255);
                    }
                }
            }
        }
        Dataset {
            pixels,
            labels: vec![0, 1, 0, 1],
            channels: c,
            height: h,
            width: w,
            classes: vec!["a".into(), "b".into()],
        }
    }

    fn pre(ds: &Dataset) -> Preprocessor {
        Preprocessor::from_parts(
            InputSpec {
                channels: ds.channels,
                height: ds.height,
                width: ds.width,
            },
            Preprocess {
                resize: ResizeMode::Stretch,
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
        )
    }

    #[test]
    fn photo_augmentation_keeps_shapes_and_is_deterministic_by_seed() {
        let ds = colour_set();
        let p = pre(&ds);
        let batch = |seed: u64, recipe| {
            let mut r = StdRng::seed_from_u64(seed);
            let (x, y) =
                make_batch(&p, &ds, &[0, 1, 2, 3], Some((&mut r, recipe)), &Device::Cpu).unwrap();
            assert_eq!(x.dims(), [4, 3, 20, 24]);
            assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 1, 0, 1]);
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        for recipe in [Recipe::Photo, Recipe::FlipShift] {
            assert_eq!(batch(7, recipe), batch(7, recipe), "{recipe:?}");
            assert_ne!(batch(7, recipe), batch(8, recipe), "{recipe:?}");
        }
        let (plain, _) = make_batch(&p, &ds, &[0, 1, 2, 3], None, &Device::Cpu).unwrap();
        let plain = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(batch(7, Recipe::Photo), plain);
        // Values stay those of 8-bit pixels under the normalisation.
        assert!(batch(3, Recipe::Photo)
            .iter()
            .all(|v| (-2.0..=2.0 + 1e-6).contains(v)));
    }

    #[test]
    fn validation_is_drawn_from_every_class_and_balance_evens_classes() {
        // 90 of class 0, 10 of class 1, 2 of class 2.
        let labels: Vec<u8> = (0..102)
            .map(|i| {
                if i < 90 {
                    0
                } else if i < 100 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let (val, train) = split_per_class(&labels, 20, 1);
        let count = |idx: &[usize], c| idx.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!(val.len() + train.len(), 102);
        assert_eq!([count(&val, 0), count(&val, 1), count(&val, 2)], [18, 2, 1]);
        assert_eq!(count(&train, 2), 1, "a class is never wholly held out");
        assert_eq!(split_per_class(&labels, 0, 1).0.len(), 0);
        assert_eq!(
            split_per_class(&labels, 20, 1),
            split_per_class(&labels, 20, 1)
        );

        let mut r = StdRng::seed_from_u64(0);
        let epoch = balanced_epoch(&train, &labels, &mut r);
        assert_eq!(epoch.len(), train.len());
        let rare = count(&epoch, 2) as f64 / epoch.len() as f64;
        assert!((0.2..0.45).contains(&rare), "class 2 drawn {rare}");
    }
}
