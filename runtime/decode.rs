//! Turning captured frames into pictures: MJPEG (decoded at reduced scale through JPEG DCT
//! scaling when the model input is small), YUYV 4:2:2, encoded files, and raw RGB.

use std::path::Path;

use image::{DynamicImage, RgbImage};

use crate::preprocess::{check_size, decode_bytes, ImageError};

/// A frame as it leaves the source, before decoding.
#[derive(Clone, Debug)]
pub enum FrameData {
    /// Already decoded RGB (synthetic frames).
    Rgb(RgbImage),
    /// An encoded image file (JPEG/PNG).
    Encoded(Vec<u8>),
    /// One Motion-JPEG frame.
    Mjpeg(Vec<u8>),
    /// YUYV 4:2:2: Y0 U Y1 V per two pixels.
    Yuyv {
        /// Width in pixels (even).
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height * 2` bytes.
        bytes: Vec<u8>,
    },
}

impl FrameData {
    /// Size of the frame's payload in bytes.
    pub fn len(&self) -> usize {
        match self {
            FrameData::Rgb(i) => i.len(),
            FrameData::Encoded(b) | FrameData::Mjpeg(b) => b.len(),
            FrameData::Yuyv { bytes, .. } => bytes.len(),
        }
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes a frame. `want` is the smallest size the model needs: MJPEG frames are decoded at
/// the smallest DCT scale (1/8, 1/4, 1/2 or 1) that still covers it.
pub fn decode_frame(
    data: FrameData,
    want: Option<(u32, u32)>,
    name: &Path,
) -> Result<DynamicImage, ImageError> {
    match data {
        FrameData::Rgb(img) => Ok(DynamicImage::ImageRgb8(img)),
        FrameData::Encoded(bytes) => decode_bytes(&bytes, name),
        FrameData::Mjpeg(bytes) => decode_mjpeg(&bytes, want, name),
        FrameData::Yuyv {
            width,
            height,
            bytes,
        } => yuyv_to_rgb(width, height, &bytes)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(|| ImageError::Decode {
                path: name.into(),
                reason: format!(
                    "YUYV frame of {} bytes is not {width}x{height}x2",
                    bytes.len()
                ),
            }),
    }
}

fn decode_mjpeg(
    bytes: &[u8],
    want: Option<(u32, u32)>,
    name: &Path,
) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { path: name.into() });
    }
    let err = |e: jpeg_decoder::Error| ImageError::Decode {
        path: name.into(),
        reason: e.to_string(),
    };
    let bytes = crate::mjpeg::with_standard_tables(bytes);
    let mut dec = jpeg_decoder::Decoder::new(&bytes[..]);
    dec.read_info().map_err(err)?;
    let info = dec.info().ok_or_else(|| ImageError::Decode {
        path: name.into(),
        reason: "no JPEG header".into(),
    })?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_size(w, h, u64::from(w) * u64::from(h) * 3, name)?;
    if let Some((w, h)) = want {
        dec.scale(w.min(u16::MAX as u32) as u16, h.min(u16::MAX as u32) as u16)
            .map_err(err)?;
    }
    let pixels = dec.decode().map_err(err)?;
    let info = dec.info().expect("info after decode");
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    if w == 0 || h == 0 {
        return Err(ImageError::Decode {
            path: name.into(),
            reason: "zero-sized JPEG frame".into(),
        });
    }
    let bad = || ImageError::Decode {
        path: name.into(),
        reason: "JPEG data shorter than its header".into(),
    };
    match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => image::GrayImage::from_raw(w, h, pixels)
            .map(DynamicImage::ImageLuma8)
            .ok_or_else(bad),
        jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(w, h, pixels)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(bad),
        other => Err(ImageError::Decode {
            path: name.into(),
            reason: format!("unsupported JPEG pixel format {other:?}"),
        }),
    }
}

/// YUYV 4:2:2 to RGB with the BT.601 limited-range matrix webcams use; None if the size is wrong.
pub fn yuyv_to_rgb(width: u32, height: u32, bytes: &[u8]) -> Option<RgbImage> {
    if width == 0
        || height == 0
        || !width.is_multiple_of(2)
        || bytes.len() != (width as usize) * (height as usize) * 2
    {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 2 * 3);
    let px = |y: u8, u: f32, v: f32, out: &mut Vec<u8>| {
        let c = 1.164 * (y as f32 - 16.0);
        out.push((c + 1.596 * v).round().clamp(0.0, 255.0) as u8);
        out.push((c - 0.392 * u - 0.813 * v).round().clamp(0.0, 255.0) as u8);
        out.push((c + 2.017 * u).round().clamp(0.0, 255.0) as u8);
    };
    for q in bytes.chunks_exact(4) {
        let (u, v) = (q[1] as f32 - 128.0, q[3] as f32 - 128.0);
        px(q[0], u, v, &mut out);
        px(q[2], u, v, &mut out);
    }
    RgbImage::from_raw(width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn mjpeg_decodes_at_reduced_scale() {
        let j = jpeg(640, 480);
        let full = decode_frame(FrameData::Mjpeg(j.clone()), None, Path::new("f")).unwrap();
        assert_eq!((full.width(), full.height()), (640, 480));
        // 28x28 input: 1/8 scale (80x60) is the smallest that covers it.
        let small =
            decode_frame(FrameData::Mjpeg(j.clone()), Some((28, 28)), Path::new("f")).unwrap();
        assert_eq!((small.width(), small.height()), (80, 60));
        let half = decode_frame(
            FrameData::Mjpeg(j.clone()),
            Some((300, 200)),
            Path::new("f"),
        )
        .unwrap();
        assert_eq!((half.width(), half.height()), (320, 240));
        assert!(decode_frame(
            FrameData::Mjpeg(j[..j.len() / 3].to_vec()),
            None,
            Path::new("cut")
        )
        .is_err());
        assert!(matches!(
            decode_frame(FrameData::Mjpeg(vec![]), None, Path::new("e")),
            Err(ImageError::Empty { .. })
        ));
    }

    #[test]
    fn yuyv_grey_and_colour() {
        // Y = 235 with neutral chroma is white; Y = 16 is black.
        let img = yuyv_to_rgb(2, 1, &[235, 128, 16, 128]).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [0, 0, 0]);
        // Strong V (red chroma) makes red dominate.
        let red = yuyv_to_rgb(2, 1, &[82, 90, 82, 240]).unwrap();
        let p = red.get_pixel(0, 0).0;
        assert!(p[0] > 200 && p[1] < 40 && p[2] < 40, "{p:?}");
        assert!(yuyv_to_rgb(2, 2, &[0; 4]).is_none());
        assert!(yuyv_to_rgb(3, 1, &[0; 6]).is_none());
        assert!(yuyv_to_rgb(0, 4, &[]).is_none());
    }
}
