//! `wae-edge classify`: top-k labels of files, directories and globs, printed like
//! jetson-inference's `imagenet`, or as JSON Lines.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use wae_edge::classifier::EngineKind;
use wae_edge::preprocess::load_image;
use wae_edge::sources::expand_inputs;
use wae_edge::terminal::Escaped;
use wae_edge::Prediction;

use super::{model_path, Placement};

/// Arguments of `classify`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model file (default: the shipped models/fashion-wae/model.safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// How many classes to print per input.
    #[arg(long, default_value_t = 5, value_parser = super::at_least_one)]
    top_k: usize,
    /// One JSON object per input (JSON Lines) on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub(super) placement: Placement,
    /// Image files, directories or quoted globs.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Line<'a> {
    input: String,
    top: &'a [Prediction],
    ms: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    untrained: bool,
    /// Why the picture is far from the model's training pictures, if it is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let inputs = expand_inputs(&args.inputs)?;
    let device = args.placement.open()?;
    let model = model_path(args.model);
    let clf = args.placement.load(&model, &device, EngineKind::Auto)?;
    let untrained = clf.config().untrained;
    if untrained {
        eprintln!(
            "WARNING: {} is UNTRAINED (random weights from `wae-edge new`): its predictions are meaningless",
            Escaped(model.display())
        );
    }
    let k = args.top_k.min(clf.config().classes);
    let bar = if inputs.len() >= 50 {
        ProgressBar::new(inputs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("static template"),
    );
    let mut failed = 0usize;
    for path in &inputs {
        let t = Instant::now();
        let result = load_image(path)
            .map_err(anyhow::Error::from)
            .and_then(|img| {
                // One resize serves both the network's input and the domain check.
                let (x, warning) = clf.input_and_warning(&img)?;
                Ok((clf.classify_timed(&x, k)?.0, warning))
            });
        let ms = t.elapsed().as_secs_f64() * 1e3;
        bar.inc(1);
        match result {
            Ok((top, warning)) => {
                bar.suspend(|| {
                    if let Some(w) = &warning {
                        eprintln!("warning: {}: {w}", Escaped(path.display()));
                    }
                    if args.json {
                        let line = Line {
                            input: path.to_string_lossy().into_owned(),
                            top: &top,
                            ms,
                            untrained,
                            warnings: warning.into_iter().collect(),
                        };
                        println!(
                            "{}",
                            serde_json::to_string(&line).expect("plain data serialises")
                        );
                    } else {
                        println!("{}  ({ms:.2} ms)", Escaped(path.display()));
                        for p in &top {
                            println!(
                                "  {:6.2}%  class #{:<3} {}",
                                p.score * 100.0,
                                p.class,
                                Escaped(&p.label)
                            );
                        }
                    }
                });
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("error: {}", super::one_line(&e)));
            }
        }
    }
    bar.finish_and_clear();
    if failed > 0 {
        eprintln!("{failed} of {} inputs failed", inputs.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
