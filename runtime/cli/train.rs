//! `wae-edge train` and `wae-edge eval`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::ProgressBar;

use wae_edge::config::{preset, ArchKind, PRESETS};
use wae_edge::dataset::{self, Dataset, Split};
use wae_edge::device::{self, DeviceRequest};
use wae_edge::eval::evaluate;
use wae_edge::terminal::Escaped;
use wae_edge::train::{self, TrainOptions};
use wae_edge::{weights, Classifier};

use super::{model_path, Placement};

/// Network family to train from a preset's layout.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    /// Learned encoder, three stages.
    Wae,
    /// Full resolution baseline.
    Plain,
    /// Input averaged 2x2 ("VGG16 (112)").
    NaiveHalf,
    /// Fixed Haar split ("Wavelet+CNN").
    Haar,
}

/// Arguments of `train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture preset.
    #[arg(long, default_value = "wae-fashion", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    /// Train another kind with the preset's backbone and heads.
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Override the backbone, e.g. "32,32/64,64/128" (stages split by '/').
    #[arg(long)]
    backbone: Option<String>,
    /// Width of the I_H branch as a fraction of the backbone's, in (0, 1] (presets: 0.25).
    #[arg(long)]
    branch_width: Option<f32>,
    /// `fashion-mnist` (Debian's dataset-fashion-mnist), a directory of IDX files, or a
    /// directory with `train/` and `test/` image folders (one sub-directory per class).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Run directory: checkpoint, state, metrics.csv, curve.svg, model.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stage 1 epochs (auto-encoder; WAE only).
    #[arg(long, default_value_t = 2)]
    ae_epochs: usize,
    /// Stage 2 epochs (classifier).
    #[arg(long, default_value_t = 12)]
    cls_epochs: usize,
    /// Stage 3 epochs (joint; WAE only).
    #[arg(long, default_value_t = 3)]
    joint_epochs: usize,
    /// Weight of the I_H energy penalty.
    #[arg(long, default_value_t = 0.1)]
    lambda: f64,
    /// Weight of the WAE loss in the joint stage.
    #[arg(long, default_value_t = 0.001)]
    gamma: f64,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = super::at_least_one)]
    batch: usize,
    /// Peak learning rate (cosine decay per stage).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Peak learning rate of the joint stage as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    joint_lr_scale: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training images held out for validation (0: train on all, after choosing settings).
    #[arg(long, default_value_t = 5000)]
    val: usize,
    /// Use at most N training images.
    #[arg(long)]
    limit: Option<usize>,
    /// Disable flips and shifts.
    #[arg(long)]
    no_augment: bool,
    /// Where to write the fp16 model (default: OUT/model.safetensors).
    #[arg(long)]
    export: Option<PathBuf>,
    /// Device to train on (f32 everywhere); auto picks CUDA, then Metal, then the CPU. A run
    /// may resume on another device.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceRequest,
}

/// Arguments of `eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model file (default: the shipped model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `fashion-mnist` or a directory of IDX files; the test split is used.
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// One JSON object.
    #[arg(long)]
    json: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 256, value_parser = super::at_least_one)]
    batch: usize,
    #[command(flatten)]
    pub(super) placement: Placement,
}

/// The dataset directory for a `--dataset` value.
pub fn dataset_dir(spec: &str) -> PathBuf {
    if spec == "fashion-mnist" {
        std::env::var_os("WAE_EDGE_FASHION_MNIST")
            .map_or_else(|| PathBuf::from(dataset::FASHION_MNIST_DIR), PathBuf::from)
    } else {
        PathBuf::from(spec)
    }
}

/// Loads one split at the input size, with a hint when Debian's package is missing.
pub fn load_split(spec: &str, split: Split, input: wae_edge::config::InputSpec) -> Result<Dataset> {
    let dir = dataset_dir(spec);
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: dataset directory not found{}",
            dir.display(),
            if spec == "fashion-mnist" {
                " (install it: apt-get install dataset-fashion-mnist)"
            } else {
                ""
            }
        );
    }
    Ok(dataset::load(&dir, split, input)?)
}

fn parse_backbone(s: &str) -> Result<Vec<Vec<usize>>> {
    s.split('/')
        .map(|st| {
            st.split(',')
                .map(|w| {
                    w.trim()
                        .parse::<usize>()
                        .with_context(|| format!("bad width `{w}` in --backbone"))
                })
                .collect()
        })
        .collect()
}

fn test_accuracy(model: &Path, spec: &str, batch: usize) -> Result<wae_edge::eval::EvalReport> {
    let clf = Classifier::load(model, &Device::Cpu)?;
    let test = load_split(spec, Split::Test, clf.config().input)?;
    Ok(evaluate(&clf, &test, batch, |_| ())?)
}

pub fn run_train(a: TrainArgs) -> Result<ExitCode> {
    let mut config = preset(&a.preset).context("unknown preset")?;
    if let Some(k) = a.kind {
        config.arch.kind = match k {
            Kind::Wae => ArchKind::Wae,
            Kind::Plain => ArchKind::Plain,
            Kind::NaiveHalf => ArchKind::NaiveHalf,
            Kind::Haar => ArchKind::Haar,
        };
        if config.arch.kind != ArchKind::Wae {
            config.arch.encoder.clear();
        } else if config.arch.encoder.is_empty() {
            config.arch.encoder = vec![16];
        }
        if !config.arch.kind.has_branch() {
            config.arch.head_fuse.clear();
        } else if config.arch.head_fuse.is_empty() {
            config.arch.head_fuse = config.arch.head_low.clone();
        }
        config.name = format!("{}-{:?}", a.preset, k).to_lowercase();
    }
    if let Some(b) = &a.backbone {
        config.arch.backbone = parse_backbone(b)?;
    }
    if let Some(w) = a.branch_width {
        config.arch.branch_width = w;
    }
    config.validate()?;
    // Before the dataset loads: a device this build lacks fails at once.
    let dev = device::select(a.device)?;
    let train_set = load_split(&a.dataset, Split::Train, config.input)?;
    let options = TrainOptions {
        config,
        dataset_name: a.dataset.clone(),
        ae_epochs: a.ae_epochs,
        cls_epochs: a.cls_epochs,
        joint_epochs: a.joint_epochs,
        lambda: a.lambda,
        gamma: a.gamma,
        batch: a.batch,
        lr: a.lr,
        joint_lr_scale: a.joint_lr_scale,
        weight_decay: a.weight_decay,
        seed: a.seed,
        val: a.val,
        limit: a.limit,
        augment: !a.no_augment,
    };
    eprintln!("training on {}", device::describe(&dev));
    let t = Instant::now();
    let report = train::train(&options, &train_set, &a.out, a.resume, &dev)?;
    let export = a.export.unwrap_or_else(|| a.out.join("model.safetensors"));
    let mut config = report.config.clone();
    let last_val = report.metrics.iter().rev().find_map(|m| m.val_acc);
    let epochs: serde_json::Map<String, serde_json::Value> = train::plan(&options)
        .into_iter()
        .map(|(s, e)| {
            (
                serde_json::to_value(s)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e.into(),
            )
        })
        .collect();
    let mut facts = serde_json::json!({
        "dataset": options.dataset_name,
        "epochs": epochs,
        "lambda": options.lambda,
        "gamma": options.gamma,
        "batch": options.batch,
        "lr": options.lr,
        "joint_lr_scale": options.joint_lr_scale,
        "weight_decay": options.weight_decay,
        "seed": options.seed,
        "augment": options.augment,
        "val_images": options.val,
        "val_accuracy": last_val,
        "train_seconds_this_sitting": t.elapsed().as_secs_f64().round(),
        "train_device": device::describe(&dev),
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    config.training = Some(facts.clone());
    weights::save(&export, &config, &report.tensors)?;
    // Test accuracy through the exported fp16 file, then recorded in it.
    let eval = test_accuracy(&export, &a.dataset, 256)?;
    facts["test_accuracy"] = eval.accuracy.into();
    facts["test_images"] = eval.n.into();
    config.training = Some(facts);
    // What the training pictures looked like, so that classify warns on pictures far from them.
    config.domain = Some(wae_edge::domain::DomainStats::measure(
        &train_set,
        &config.preprocess.mean,
        &config.preprocess.std,
        &eval.top1,
    ));
    weights::save(&export, &config, &report.tensors)?;
    eprintln!(
        "wrote {}: test accuracy {:.4} on {} images",
        Escaped(export.display()),
        eval.accuracy,
        eval.n
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_eval(a: EvalArgs) -> Result<ExitCode> {
    let device = a.placement.open()?;
    let model = model_path(a.model);
    let clf = Classifier::load(&model, &device)?;
    let test = load_split(&a.dataset, Split::Test, clf.config().input)?;
    let bar = ProgressBar::new(test.len() as u64);
    let r = evaluate(&clf, &test, a.batch, |n| bar.inc(n as u64))
        .with_context(|| model.display().to_string())?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: accuracy {:.4} on {} test images",
        Escaped(model.display()),
        r.accuracy,
        r.n
    );
    for (c, acc) in r.per_class.iter().enumerate() {
        println!("  {:>2} {:<12} {:.4}", c, Escaped(&r.labels[c]), acc);
    }
    println!("confusion (rows: true, columns: predicted)");
    for row in &r.confusion {
        println!(
            "  {}",
            row.iter().map(|v| format!("{v:>5}")).collect::<String>()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `calibrate`.
#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// Model file (default: the shipped model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model's training data: `fashion-mnist`, IDX files or image folders.
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Where to write the calibrated model (default: over the model, atomically).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// `calibrate`: the training split's picture statistics and the test split's top-1
/// probabilities, written into the model's config.
pub fn run_calibrate(a: CalibrateArgs) -> Result<ExitCode> {
    let model = model_path(a.model);
    let clf = Classifier::load(&model, &Device::Cpu)?;
    let input = clf.config().input;
    let train_set = load_split(&a.dataset, Split::Train, input)?;
    let test = load_split(&a.dataset, Split::Test, input)?;
    let report = evaluate(&clf, &test, 256, |_| {}).with_context(|| model.display().to_string())?;
    let mut config = clf.config().clone();
    let p = &config.preprocess;
    config.domain = Some(wae_edge::domain::DomainStats::measure(
        &train_set,
        &p.mean,
        &p.std,
        &report.top1,
    ));
    let out = a.output.unwrap_or_else(|| model.clone());
    weights::rewrite_config(&model, &out, &config)?;
    let d = config.domain.as_ref().expect("set above");
    eprintln!(
        "wrote {}: ranges from {} training pictures, top-1 median {:.3} on {} test pictures",
        Escaped(out.display()),
        d.images,
        d.top1_quantiles[3],
        test.len()
    );
    Ok(ExitCode::SUCCESS)
}
