//! Writes a procedural colour dataset in the layout `wae-edge train` reads: four classes (ball,
//! box, grass, stripes) of noisy pictures, `train/<class>/` and `test/<class>/`. A way to try
//! "your own classes" end to end without a camera.
//!
//! `cargo run --release --example shapes_dataset -- OUT_DIR [TRAIN_PER_CLASS] [TEST_PER_CLASS] [WxH]`
//! (defaults: 150, 30, 160x120).

use std::path::PathBuf;

use anyhow::{Context, Result};

#[path = "../tests/support/shapes.rs"]
mod shapes;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first()
            .context("usage: shapes_dataset OUT_DIR [TRAIN_PER_CLASS] [TEST_PER_CLASS] [WxH]")?,
    );
    let count = |i: usize, default: usize| -> Result<usize> {
        args.get(i)
            .map_or(Ok(default), |v| v.parse().context("a count is a number"))
    };
    let (train, test) = (count(1, 150)?, count(2, 30)?);
    let size = match args.get(3) {
        Some(s) => {
            let (w, h) = s.split_once('x').context("size is WxH, e.g. 160x120")?;
            (w.parse()?, h.parse()?)
        }
        None => (160, 120),
    };
    shapes::write_dataset(&out, train, test, size, 2018);
    println!(
        "wrote {} pictures of {} classes to {}",
        (train + test) * shapes::CLASSES.len(),
        shapes::CLASSES.len(),
        out.display()
    );
    Ok(())
}
