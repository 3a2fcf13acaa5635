//! Pictures of the wavelet-like split: I_L and I_H (contrast-stretched) and the decoder's
//! reconstruction, so a person can see what the encoder learned.

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GenericImage};

use crate::model::{Decoder, WaeNet};
use crate::preprocess::Preprocessor;

/// The four pictures of one decomposition, at the model's input or half resolution.
pub struct Decomposition {
    /// The input after preprocessing (resized, channel-converted).
    pub input: DynamicImage,
    /// I_L, stretched to the full 0..255 range.
    pub low: DynamicImage,
    /// I_H (first C channels for Haar), stretched to 0..255.
    pub high: DynamicImage,
    /// The decoder's reconstruction, de-normalised.
    pub rebuilt: DynamicImage,
    /// Fraction of the split's energy (sum of squares) that lands in I_L.
    pub low_energy_share: f64,
}

/// `[C, H, W]` f32 values to an 8-bit picture through `f`.
fn to_image(t: &Tensor, f: impl Fn(usize, f32) -> f32) -> candle_core::Result<DynamicImage> {
    let (c, h, w) = t.dims3()?;
    let v = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let px = |ch: usize, i: usize| f(ch, v[ch * h * w + i]).round().clamp(0.0, 255.0) as u8;
    Ok(if c == 1 {
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
            image::Luma([px(0, y as usize * w + x as usize)])
        }))
    } else {
        DynamicImage::ImageRgb8(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb([px(0, i), px(1, i), px(2, i)])
        }))
    })
}

/// Min-max stretch of a whole tensor to 0..255 (a flat tensor becomes mid-grey).
pub fn stretch(t: &Tensor) -> candle_core::Result<DynamicImage> {
    let lo = t.min_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let hi = t.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let span = hi - lo;
    to_image(t, |_, v| {
        if span > 0.0 {
            (v - lo) / span * 255.0
        } else {
            127.0
        }
    })
}

/// Splits and rebuilds one picture.
pub fn decompose(
    net: &WaeNet,
    dec: &Decoder,
    pre: &Preprocessor,
    img: &DynamicImage,
    device: &Device,
) -> candle_core::Result<Decomposition> {
    let x = pre
        .to_tensor(img, device)?
        .to_dtype(crate::weights::compute_dtype(device))?;
    let (low, high) = net.split(&x, false)?;
    let high = high.ok_or_else(|| candle_core::Error::Msg("this model has no I_H".into()))?;
    let rebuilt = dec.forward(&low, &high)?;
    let energy = |t: &Tensor| -> candle_core::Result<f64> {
        Ok(t.to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64)
    };
    let (el, eh) = (energy(&low)?, energy(&high)?);
    let c = pre.input().channels;
    let cfg = net.config();
    let denorm = |ch: usize, v: f32| (v * cfg.preprocess.std[ch] + cfg.preprocess.mean[ch]) * 255.0;
    Ok(Decomposition {
        input: pre.resize(img),
        low: stretch(&low.get(0)?)?,
        high: stretch(&high.get(0)?.narrow(0, 0, c)?)?,
        rebuilt: to_image(&rebuilt.get(0)?, denorm)?,
        low_energy_share: el / (el + eh).max(f64::MIN_POSITIVE),
    })
}

/// Input | I_L | I_H | reconstruction side by side, each scaled to `side` pixels high.
pub fn strip(d: &Decomposition, side: u32) -> DynamicImage {
    let tiles = [&d.input, &d.low, &d.high, &d.rebuilt];
    let gap = side / 16;
    let mut out =
        image::RgbImage::from_pixel(4 * side + 3 * gap, side, image::Rgb([255, 255, 255]));
    for (i, t) in tiles.iter().enumerate() {
        let scaled = t
            .resize_exact(side, side, image::imageops::FilterType::Nearest)
            .to_rgb8();
        out.copy_from(&scaled, i as u32 * (side + gap), 0)
            .expect("tile fits the strip");
    }
    DynamicImage::ImageRgb8(out)
}
