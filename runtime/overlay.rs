//! Annotated frames: the top label and score drawn on the frame (8x8 bitmap font, scaled),
//! the way jetson-inference overlays `NN.NN% label`.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

/// Draws `text` in white on a black band at the top-left corner, glyphs `scale` pixels per dot.
pub fn annotate(img: &mut RgbImage, text: &str, scale: u32) {
    let scale = scale.max(1);
    let (w, h) = img.dimensions();
    let band_h = (10 * scale).min(h);
    let band_w = ((text.chars().count() as u32 * 8 + 4) * scale).min(w);
    for y in 0..band_h {
        for x in 0..band_w {
            img.put_pixel(x, y, Rgb([0, 0, 0]));
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = (2 + i as u32 * 8 + col) * scale + dx;
                        let y = (1 + row as u32) * scale + dy;
                        if x < w && y < h {
                            img.put_pixel(x, y, Rgb([255, 255, 255]));
                        }
                    }
                }
            }
        }
    }
}

/// The frame with its top class drawn on it (`NN.N% label`, scaled with the frame), as
/// `stream --save`, `--output` and `--serve` show it.
pub fn annotated(img: &image::DynamicImage, best: &crate::Prediction) -> RgbImage {
    let mut rgb = img.to_rgb8();
    let scale = (rgb.height() / 120).max(1);
    annotate(
        &mut rgb,
        &format!("{:.1}% {}", best.score * 100.0, best.label),
        scale,
    );
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_a_band() {
        let mut img = RgbImage::from_pixel(200, 60, Rgb([100, 100, 100]));
        annotate(&mut img, "97.1% Bag", 2);
        let white = img.pixels().filter(|p| p.0 == [255, 255, 255]).count();
        assert!(white > 50, "{white}");
        assert_eq!(
            img.get_pixel(199, 59).0,
            [100, 100, 100],
            "outside the band untouched"
        );
        // Tiny frames do not panic.
        annotate(&mut RgbImage::new(3, 3), "long text", 4);
    }
}
