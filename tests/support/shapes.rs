//! Procedural colour pictures in four classes, for training on "your own classes" without a
//! camera: the end-to-end test (`tests/own_classes.rs`) and `examples/shapes_dataset.rs`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The class names, in label order.
pub const CLASSES: [&str; 4] = ["ball", "box", "grass", "stripes"];

/// One picture of `class`, `w` x `h` with pixel noise: a warm disc or a warm rectangle on a cool
/// background, green grass texture, or diagonal stripes of two random colours.
pub fn picture(class: usize, (w, h): (u32, u32), r: &mut StdRng) -> image::RgbImage {
    let (w, h) = (w as i32, h as i32);
    // Positions and sizes scale with the picture (72x56 is the unit).
    let k = |v: i32| v * w / 72;
    let cool = [
        r.random_range(0..90),
        r.random_range(60..160),
        r.random_range(120..255),
    ];
    let warm = [
        r.random_range(180..255),
        r.random_range(40..160),
        r.random_range(0..60),
    ];
    let (cx, cy) = (k(r.random_range(20..52)), r.random_range(18..38) * h / 56);
    let size = k(r.random_range(9..17));
    let (a, b) = (
        [
            r.random_range(0..255),
            r.random_range(0..255),
            r.random_range(0..255),
        ],
        [
            r.random_range(0..255),
            r.random_range(0..255),
            r.random_range(0..255),
        ],
    );
    let period = k(r.random_range(6..12)).max(2);
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x - cx, y - cy);
            let px: [i32; 3] = match class {
                0 if dx * dx + dy * dy <= size * size => warm,
                1 if dx.abs() <= size && dy.abs() <= size * 2 / 3 => warm,
                0 | 1 => cool,
                2 => {
                    let blade = ((x * 7 + y * 3) % 5 == 0) as i32;
                    [40 + 30 * blade, 110 + 80 * blade, 30]
                }
                _ => {
                    if ((x + y) / period) % 2 == 0 {
                        a
                    } else {
                        b
                    }
                }
            };
            let noise = r.random_range(-20..=20);
            img.put_pixel(
                x as u32,
                y as u32,
                image::Rgb(px.map(|v| (v + noise).clamp(0, 255) as u8)),
            );
        }
    }
    img
}

/// `dir/train/<class>/` and `dir/test/<class>/` of `size` pictures, JPEG and PNG mixed.
pub fn write_dataset(dir: &Path, train: usize, test: usize, size: (u32, u32), seed: u64) {
    let mut r = StdRng::seed_from_u64(seed);
    for (c, name) in CLASSES.iter().enumerate() {
        for (split, n) in [("train", train), ("test", test)] {
            let d = dir.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let ext = if i % 3 == 0 { "png" } else { "jpg" };
                picture(c, size, &mut r)
                    .save(d.join(format!("{i:04}.{ext}")))
                    .unwrap();
            }
        }
    }
}
