//! Your own classes, end to end, with the CLI alone: a colour dataset of procedural pictures
//! (shapes and textures at another size and aspect than the model's input) is trained at
//! 32x32x3 with no flag but `--input`, evaluated, and held-out pictures are classified.
#![cfg(feature = "train")]

mod common;

use std::path::Path;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLASSES: [&str; 4] = ["ball", "box", "grass", "stripes"];

/// One picture of `class`, 72x56 with pixel noise: a warm disc or a warm rectangle on a cool
/// background, green grass texture, or diagonal stripes of two random colours.
fn picture(class: usize, r: &mut StdRng) -> image::RgbImage {
    let (w, h) = (72i32, 56i32);
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
    let (cx, cy) = (r.random_range(20..52), r.random_range(18..38));
    let size = r.random_range(9..17);
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
    let period = r.random_range(6..12);
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

/// `dir/train/<class>/` and `dir/test/<class>/`, JPEG and PNG mixed.
fn write_dataset(dir: &Path, train: usize, test: usize) {
    let mut r = StdRng::seed_from_u64(2018);
    for (c, name) in CLASSES.iter().enumerate() {
        for (split, n) in [("train", train), ("test", test)] {
            let d = dir.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let ext = if i % 3 == 0 { "png" } else { "jpg" };
                picture(c, &mut r)
                    .save(d.join(format!("{i:04}.{ext}")))
                    .unwrap();
            }
        }
    }
}

#[test]
fn a_colour_folder_trains_evaluates_and_classifies_with_the_cli_alone() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("shapes");
    write_dataset(&data, 80, 15);
    let model = d.path().join("shapes.safetensors");
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "32x32x3", "--out"])
        .arg(d.path().join("run"))
        .arg("--export")
        .arg(&model)
        .output()
        .unwrap();
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("320 training images in 4 classes: ball 80, box 80, grass 80, stripes 80"),
        "{err}"
    );

    // The file records the input, the folder names and the measured normalisation.
    let config = wae_edge::weights::ModelFile::open(&model)
        .unwrap()
        .config()
        .clone();
    assert_eq!(config.input.to_string(), "32x32x3");
    assert_eq!(config.labels, CLASSES);
    assert_eq!(
        config.preprocess.resize,
        wae_edge::config::ResizeMode::Stretch
    );
    assert!(config
        .preprocess
        .mean
        .iter()
        .all(|m| (0.1..0.9).contains(m) && *m != 0.5));
    assert!(config.domain.is_some());

    let out = bin()
        .args(["eval", "--json", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = report["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "test accuracy {acc}\n{err}");
    assert_eq!(report["n"], 60);

    // A held-out picture of each class, written where training never looked.
    let mut r = StdRng::seed_from_u64(99);
    for (c, name) in CLASSES.iter().enumerate() {
        let p = d.path().join(format!("new-{name}.jpg"));
        picture(c, &mut r).save(&p).unwrap();
        let out = classify_json(&model, &p, &[]);
        assert_success(&out);
        let v = &json_lines(&out)[0];
        assert_eq!(v["top"][0]["label"], *name, "{v}");
    }
}

#[test]
fn a_dataset_over_the_memory_budget_is_refused_before_training() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("shapes");
    write_dataset(&data, 10, 1);
    // 40 pictures at 512x512x3 need 30 MiB; the budget is 16.
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "512x512x3", "--memory-budget", "16", "--out"])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "need 30 MiB, over the 16 MiB memory budget");
    assert!(!d.path().join("run").exists());
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "33x32x3", "--out"])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "sides are even");
}
