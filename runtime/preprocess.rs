//! Preprocessing: decoding images with size caps, and turning a picture into the normalised
//! input tensor the model's config asks for (gray/RGB, resize policy, mean/std).

use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::config::{InputSpec, ModelConfig, Preprocess, ResizeMode};

/// Largest width or height we decode; a header claiming more is refused before allocation.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most pixels we decode (8192 x 8192): with [`MAX_IMAGE_BYTES`] this bounds every buffer
/// derived from one image (its 8-bit RGB copy is at most 192 MiB).
pub const MAX_IMAGE_PIXELS: u64 = 64 << 20;
/// Largest decode buffer in bytes, and the largest image file read.
pub const MAX_IMAGE_BYTES: u64 = 256 * 1024 * 1024;

/// Why an image cannot be used. Every variant names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened or read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Zero bytes.
    #[error("{}: empty file (0 bytes), not an image", path.display())]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// The header claims dimensions beyond the decode caps.
    #[error("{}: image too large to decode ({reason}; limit {MAX_IMAGE_SIDE} a side, {} megapixels, {} MiB)", path.display(), MAX_IMAGE_PIXELS >> 20, MAX_IMAGE_BYTES >> 20)]
    TooLarge {
        /// The image.
        path: PathBuf,
        /// What the decoder reported.
        reason: String,
    },
    /// Corrupt, truncated or unsupported data.
    #[error("{}: cannot decode image: {reason}", path.display())]
    Decode {
        /// The image.
        path: PathBuf,
        /// What the decoder reported.
        reason: String,
    },
}

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_IMAGE_BYTES);
    l
}

fn decode_reader<R: BufRead + Seek>(
    reader: ImageReader<R>,
    path: &Path,
) -> Result<DynamicImage, ImageError> {
    let map = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => ImageError::TooLarge {
            path: path.into(),
            reason: l.to_string(),
        },
        image::ImageError::IoError(cause) => ImageError::Io {
            path: path.into(),
            cause,
        },
        other => ImageError::Decode {
            path: path.into(),
            reason: other.to_string(),
        },
    };
    let mut reader = reader
        .with_guessed_format()
        .map_err(|cause| ImageError::Io {
            path: path.into(),
            cause,
        })?;
    reader.limits(limits());
    let mut decoder = reader.into_decoder().map_err(map)?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, decoder.total_bytes(), path)?;
    // Phones record how the picture is to be seen; classify it that way.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(map)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::Decode {
            path: path.into(),
            reason: "zero-sized image".into(),
        });
    }
    Ok(img)
}

/// Refuses a picture whose header claims more than the decode caps, before anything is
/// allocated for it.
pub fn check_size(w: u32, h: u32, bytes: u64, path: &Path) -> Result<(), ImageError> {
    let too_large = |reason: String| ImageError::TooLarge {
        path: path.into(),
        reason,
    };
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(too_large(format!("{w}x{h}")));
    }
    if bytes > MAX_IMAGE_BYTES {
        return Err(too_large(format!("{w}x{h}, {} MiB decoded", bytes >> 20)));
    }
    Ok(())
}

/// Decodes an image file (format guessed from its content, EXIF orientation applied),
/// refusing what is not a regular file and absurd dimensions.
pub fn load_image(path: &Path) -> Result<DynamicImage, ImageError> {
    let bytes = crate::regular_file::read_bounded(path, MAX_IMAGE_BYTES).map_err(|cause| {
        ImageError::Io {
            path: path.into(),
            cause,
        }
    })?;
    decode_bytes(&bytes, path)
}

/// Decodes an in-memory encoded image (an image file's bytes, an MJPEG frame); `name` appears
/// in errors. JPEGs without Huffman tables, as webcams send them, decode with the standard
/// ones.
pub fn decode_bytes(bytes: &[u8], name: &Path) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { path: name.into() });
    }
    let bytes = crate::mjpeg::with_standard_tables(bytes);
    decode_reader(ImageReader::new(Cursor::new(&bytes[..])), name)
}

/// Source pixels per output pixel and axis kept by the super-sampling resize.
const SUPER_SAMPLING: u8 = 4;

/// Turns pictures into the model's normalised `[C, H, W]` input.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    input: InputSpec,
    pre: Preprocess,
}

impl Preprocessor {
    /// The preprocessing a model's config asks for.
    pub fn new(config: &ModelConfig) -> Self {
        Self::from_parts(config.input, config.preprocess.clone())
    }

    /// Preprocessing for an input geometry and policy, without a whole model config.
    pub fn from_parts(input: InputSpec, pre: Preprocess) -> Self {
        Preprocessor { input, pre }
    }

    /// Resizes (per the resize policy) to the input size, keeping the input's channel count.
    pub fn resize(&self, img: &DynamicImage) -> DynamicImage {
        let (w, h) = (self.input.width as u32, self.input.height as u32);
        // Resize first, in the frame's own 8-bit layout, with fast_image_resize's SIMD
        // convolution (bilinear, support scaled with the ratio, so large shrinks are
        // anti-aliased); converting channels afterwards touches only the small image. Large
        // shrinks (a 640x480 frame to 28x28) super-sample: a nearest-neighbour pass to 4x the
        // target, then the convolution, so each output pixel still averages 16 or more source
        // pixels but the whole frame is not read (0.16 to 0.03 ms per frame; jetson-inference's
        // bilinear resize samples only 4).
        let src = match img {
            DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageRgb8(_)
            | DynamicImage::ImageRgba8(_) => None,
            // 16-bit and alpha layouts become 8-bit with as few channels as they carry, so the
            // copy of a large gray picture stays a third of an RGB one.
            other if other.color().has_color() => Some(DynamicImage::ImageRgb8(other.to_rgb8())),
            other => Some(DynamicImage::ImageLuma8(other.to_luma8())),
        };
        let src = src.as_ref().unwrap_or(img);
        let small = if src.width() == w && src.height() == h {
            src.clone()
        } else {
            let mut dst = DynamicImage::new(w, h, src.color());
            let alg = fast_image_resize::ResizeAlg::SuperSampling(
                fast_image_resize::FilterType::Bilinear,
                SUPER_SAMPLING,
            );
            let mut opts = fast_image_resize::ResizeOptions::new().resize_alg(alg);
            if self.pre.resize == ResizeMode::CenterCrop {
                opts = opts.fit_into_destination(Some((0.5, 0.5)));
            }
            match fast_image_resize::Resizer::new().resize(src, &mut dst, &opts) {
                Ok(()) => dst,
                // Only degenerate sizes get here (decoders refuse zero-sized images).
                Err(_) => src.resize_exact(w, h, image::imageops::FilterType::Triangle),
            }
        };
        if self.input.channels == 1 {
            DynamicImage::ImageLuma8(small.to_luma8())
        } else {
            DynamicImage::ImageRgb8(small.to_rgb8())
        }
    }

    /// Planar normalised values `(p / 255 - mean[c]) / std[c]` of a picture.
    pub fn to_vec(&self, img: &DynamicImage) -> Vec<f32> {
        let planar = self.planar_u8(img);
        let mut out = Vec::with_capacity(planar.len());
        self.normalize_planar(&planar, &mut out);
        out
    }

    /// A picture resized to the input and laid out planar (`[C, H, W]`), still 8-bit.
    pub fn planar_u8(&self, img: &DynamicImage) -> Vec<u8> {
        let img = self.resize(img);
        let c = self.input.channels;
        let plane = self.input.height * self.input.width;
        let mut planar = vec![0u8; c * plane];
        for (i, px) in img.as_bytes().chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                planar[ch * plane + i] = v;
            }
        }
        planar
    }

    /// Appends the normalised values of planar u8 pixels already at the input size
    /// (dataset images) to `out`.
    pub fn normalize_planar(&self, planar: &[u8], out: &mut Vec<f32>) {
        let plane = self.input.height * self.input.width;
        for (i, &v) in planar.iter().enumerate() {
            let ch = (i / plane) % self.input.channels;
            out.push((v as f32 / 255.0 - self.pre.mean[ch]) / self.pre.std[ch]);
        }
    }

    /// The model's input geometry.
    pub fn input(&self) -> InputSpec {
        self.input
    }

    /// One picture as a `[1, C, H, W]` f32 tensor on `device`.
    pub fn to_tensor(&self, img: &DynamicImage, device: &Device) -> candle_core::Result<Tensor> {
        self.batch(std::slice::from_ref(img), device)
    }

    /// Several pictures as one `[N, C, H, W]` f32 tensor on `device`.
    pub fn batch(&self, imgs: &[DynamicImage], device: &Device) -> candle_core::Result<Tensor> {
        let InputSpec {
            channels,
            height,
            width,
        } = self.input;
        let data: Vec<f32> = imgs.iter().flat_map(|i| self.to_vec(i)).collect();
        Tensor::from_vec(data, (imgs.len(), channels, height, width), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn gray_normalisation_by_hand() {
        let cfg = preset("plain-fashion").unwrap();
        let p = Preprocessor::new(&cfg);
        let img =
            DynamicImage::ImageLuma8(image::GrayImage::from_pixel(28, 28, image::Luma([255])));
        let v = p.to_vec(&img);
        assert_eq!(v.len(), 28 * 28);
        let expect = (1.0 - 0.286) / 0.353;
        assert!(v.iter().all(|x| (x - expect).abs() < 1e-5));
    }

    #[test]
    fn rgb_is_planar_and_center_cropped() {
        let cfg = preset("vgg16").unwrap();
        let p = Preprocessor::new(&cfg);
        // 448x224: left half red, right half blue; the centre crop keeps both halves equally.
        let img = image::RgbImage::from_fn(448, 224, |x, _| {
            if x < 224 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let t = p
            .to_tensor(&DynamicImage::ImageRgb8(img), &Device::Cpu)
            .unwrap();
        assert_eq!(t.dims(), &[1, 3, 224, 224]);
        let red = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            red[100][10] > 2.0 && red[100][200] < -1.0,
            "left of centre red, right not"
        );
    }

    #[test]
    fn truncated_and_empty_images_are_errors() {
        let mut png = Vec::new();
        image::GrayImage::new(8, 8)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(decode_bytes(&png, Path::new("ok.png")).is_ok());
        let e = decode_bytes(&png[..png.len() / 2], Path::new("cut.png")).unwrap_err();
        assert!(
            matches!(e, ImageError::Decode { .. } | ImageError::Io { .. }),
            "{e}"
        );
        assert!(matches!(
            decode_bytes(&[], Path::new("e.png")),
            Err(ImageError::Empty { .. })
        ));
    }
}
