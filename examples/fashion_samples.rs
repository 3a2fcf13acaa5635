//! Writes the first image of each class from the Fashion-MNIST test split as PNG, named
//! `NN_<label>.png`: the sample frames shipped beside the models.
//!
//! `cargo run --release --example fashion_samples -- [DATASET_DIR] OUT_DIR`

use std::path::PathBuf;

use anyhow::{Context, Result};
use wae_edge::dataset::{fashion_mnist, Split, FASHION_MNIST_DIR};

fn main() -> Result<()> {
    let mut args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let out = args
        .pop()
        .context("usage: fashion_samples [DATASET_DIR] OUT_DIR")?;
    let dir = args.pop().unwrap_or_else(|| FASHION_MNIST_DIR.into());
    let test = fashion_mnist(&dir, Split::Test)?;
    std::fs::create_dir_all(&out)?;
    for class in 0..test.classes.len() {
        let i = (0..test.len())
            .find(|&i| test.labels[i] as usize == class)
            .context("class without images")?;
        let img = image::GrayImage::from_raw(
            test.width as u32,
            test.height as u32,
            test.image(i).to_vec(),
        )
        .context("image size")?;
        let slug: String = test.classes[class]
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = out.join(format!("{class:02}_{slug}.png"));
        wae_edge::atomic::write_png(&path, &image::DynamicImage::ImageLuma8(img))?;
        println!("{} (test image {i})", path.display());
    }
    Ok(())
}
