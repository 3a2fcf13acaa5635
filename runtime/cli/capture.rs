//! `wae-edge capture`: pictures of one class from any source (a camera, a video, files,
//! synthetic frames) saved as JPEG into `DIR/train/LABEL/` and, for a share of them,
//! `DIR/test/LABEL/`: the layout `train --dataset DIR` reads, as jetson-inference's
//! `camera-capture` collects a dataset.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use wae_edge::decode::decode_frame;
use wae_edge::sources::{open_source, SourceOptions};
use wae_edge::terminal::Escaped;

/// Arguments of `capture`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the frames come from (any `stream` source).
    source: String,
    /// Dataset directory; pictures go to DIR/train/LABEL and DIR/test/LABEL.
    #[arg(long)]
    out: PathBuf,
    /// The class the pictures show (a folder name: no path separators).
    #[arg(long)]
    label: String,
    /// Pictures to save.
    #[arg(long, default_value_t = 100, value_parser = super::at_least_one)]
    count: usize,
    /// Keep every Kth frame (a camera's neighbouring frames are near copies).
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one)]
    every: usize,
    /// Share of the pictures that go to the test split, spread evenly.
    #[arg(long, default_value_t = 0.2, value_parser = share)]
    test_share: f64,
    /// Seconds without a frame before the capture fails as stalled.
    #[arg(long, default_value_t = 5.0, value_parser = super::seconds)]
    timeout: f64,
}

/// clap parser for a share in [0, 1).
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 up to (not including) 1".into()),
    }
}

/// Refuses labels that are not a single, ordinary folder name.
fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label != "."
        && label != ".."
        && !label.contains(['/', '\\'])
        && !label.chars().any(char::is_control);
    if !ok {
        bail!(
            "--label {:?}: a class name must be one folder name, without path separators or control characters",
            label
        );
    }
    Ok(())
}

/// The next free picture number in `dir` (after the highest `NNNNNN.jpg` there), so that a
/// second capture of the same class adds to the first.
fn next_number(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_suffix(".jpg")?
                        .parse()
                        .ok()
                })
                .map(|n: u64| n + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

pub fn run(a: Args) -> Result<ExitCode> {
    check_label(&a.label)?;
    let dirs = [
        a.out.join("train").join(&a.label),
        a.out.join("test").join(&a.label),
    ];
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut next = dirs.each_ref().map(|d| next_number(d));
    let opts = SourceOptions {
        timeout: Duration::from_secs_f64(a.timeout),
        ..SourceOptions::default()
    };
    let mut source = open_source(&a.source, &opts)?;
    eprintln!("source: {}", Escaped(source.describe()));
    let stop = Arc::new(AtomicBool::new(false));
    super::interrupt::stop_with(stop.clone());
    let bar = ProgressBar::new(a.count as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} pictures of {msg} {elapsed}")
            .expect("static template"),
    );
    bar.set_message(Escaped(&a.label).to_string());
    let (mut saved, mut seen, mut in_split) = (0usize, 0u64, [0usize; 2]);
    while saved < a.count && !stop.load(Ordering::Relaxed) {
        let Some(frame) = source.next_frame()? else {
            break;
        };
        seen += 1;
        if (seen - 1) % a.every as u64 != 0 {
            continue;
        }
        let name = frame.name.clone();
        let img = match decode_frame(frame.data, None, &name) {
            Ok(img) => img,
            Err(e) => {
                bar.suspend(|| eprintln!("skipping a frame: {}", Escaped(&e)));
                continue;
            }
        };
        // Every 1/share-th picture to the test split, evenly through the run.
        let split = usize::from(
            ((saved + 1) as f64 * a.test_share).floor() > (saved as f64 * a.test_share).floor(),
        );
        let path = dirs[split].join(format!("{:06}.jpg", next[split]));
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(img.to_rgb8())
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .context("encoding a picture")?;
        wae_edge::atomic::write(&path, &jpeg)
            .with_context(|| format!("writing {}", path.display()))?;
        next[split] += 1;
        in_split[split] += 1;
        saved += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "saved {saved} pictures of {}: {} to {}, {} to {}",
        Escaped(&a.label),
        in_split[0],
        Escaped(dirs[0].display()),
        in_split[1],
        Escaped(dirs[1].display())
    );
    if saved < a.count && !stop.load(Ordering::Relaxed) {
        bail!("the source ended after {saved} of {} pictures", a.count);
    }
    Ok(ExitCode::SUCCESS)
}
