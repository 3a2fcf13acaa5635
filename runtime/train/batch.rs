//! Training batches: a deterministic shuffle, and normalised batches with the Fashion-MNIST
//! augmentations (flip, shift).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::dataset::Dataset;
use crate::preprocess::Preprocessor;

/// Deterministic shuffle of `0..n` for a seed.
pub(super) fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Normalised batch and labels; with `rng`, each image is flipped (p = 0.5) and shifted by up
/// to 2 px (zero fill).
pub fn make_batch(
    pre: &Preprocessor,
    ds: &Dataset,
    idx: &[usize],
    rng: Option<&mut StdRng>,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let mut data = Vec::with_capacity(idx.len() * c * h * w);
    let mut aug_rng = rng;
    let mut moved = vec![0u8; c * h * w];
    for &i in idx {
        let img = ds.image(i);
        match aug_rng.as_deref_mut() {
            None => pre.normalize_planar(img, &mut data),
            Some(r) => {
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
                            moved[ch * h * w + (y as usize) * w + x as usize] = v;
                        }
                    }
                }
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
