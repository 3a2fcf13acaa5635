//! `wae-edge train` and `wae-edge eval`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::ProgressBar;

use wae_edge::config::{preset, ArchKind, InputSpec, ModelConfig, ResizeMode, PRESETS};
use wae_edge::dataset::{self, Dataset, FolderSpec, Split};
use wae_edge::device::{self, DeviceRequest};
use wae_edge::eval::evaluate;
use wae_edge::terminal::Escaped;
use wae_edge::train::{self, Recipe, TrainOptions};
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

/// How pictures of another shape become the input (stored in the model).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Resize {
    /// The whole picture, aspect ignored (jetson-inference).
    Stretch,
    /// The short side to the input, then the centre (torchvision).
    CenterCrop,
}

impl From<Resize> for ResizeMode {
    fn from(r: Resize) -> Self {
        match r {
            Resize::Stretch => ResizeMode::Stretch,
            Resize::CenterCrop => ResizeMode::CenterCrop,
        }
    }
}

/// Whether each epoch draws its images class-balanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Balance {
    /// On when the largest class has 1.5 times the images of the smallest or more.
    Auto,
    /// Always.
    On,
    /// Never: every image once per epoch.
    Off,
}

/// Images per step on an image folder: a few hundred pictures still give several steps an epoch.
const FOLDER_BATCH: usize = 32;

/// Largest class over smallest at which `--balance auto` turns balancing on.
const IMBALANCE: f64 = 1.5;

/// Arguments of `train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture preset.
    #[arg(long, default_value = "wae-fashion", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    /// Train another kind with the preset's backbone and heads.
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Input of a model for image folders, HxWxC (even sides 16-512, C 1 or 3), e.g. 64x64x3:
    /// the backbone scales to it. Without it, the preset's input.
    #[arg(long)]
    input: Option<InputSpec>,
    /// How image-folder pictures are resized to the input (stored in the model).
    #[arg(long, value_enum, default_value = "stretch")]
    resize: Resize,
    /// Class-balanced sampling for uneven image folders.
    #[arg(long, value_enum, default_value = "auto")]
    balance: Balance,
    /// Memory the decoded training pictures may take, in MiB (default: half the machine's).
    #[arg(long, value_parser = super::at_least_one)]
    memory_budget: Option<usize>,
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
    /// Stage 1 epochs (auto-encoder; WAE only). Default: 2 on Fashion-MNIST; on an image
    /// folder, enough for 100 steps (and at least 2).
    #[arg(long)]
    ae_epochs: Option<usize>,
    /// Stage 2 epochs (classifier). Default: 12 on Fashion-MNIST; on an image folder, enough
    /// for 400 steps (and at least 12).
    #[arg(long)]
    cls_epochs: Option<usize>,
    /// Stage 3 epochs (joint; WAE only). Default: 3 on Fashion-MNIST; on an image folder,
    /// enough for 100 steps (and at least 3).
    #[arg(long)]
    joint_epochs: Option<usize>,
    /// Weight of the I_H energy penalty.
    #[arg(long, default_value_t = 0.1)]
    lambda: f64,
    /// Weight of the WAE loss in the joint stage.
    #[arg(long, default_value_t = 0.001)]
    gamma: f64,
    /// Batch size (default: 128 on Fashion-MNIST, 32 on an image folder).
    #[arg(long, value_parser = super::at_least_one)]
    batch: Option<usize>,
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
    /// No augmentation (Fashion-MNIST: flips and shifts; image folders: crops, flips and
    /// colour jitter).
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

/// Loads one split as a model sees it (input size and resize mode).
pub fn load_for_model(spec: &str, split: Split, config: &ModelConfig) -> Result<Dataset> {
    load_split(
        spec,
        split,
        FolderSpec::new(config.input, config.preprocess.resize),
    )
}

/// Loads one split at the input size, with a hint when Debian's package is missing.
pub fn load_split(spec: &str, split: Split, folder: FolderSpec) -> Result<Dataset> {
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
    Ok(dataset::load(&dir, split, folder)?)
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
    let test = load_for_model(spec, Split::Test, clf.config())?;
    Ok(evaluate(&clf, &test, batch, |_| ())?)
}

fn arch_kind(k: Kind) -> ArchKind {
    match k {
        Kind::Wae => ArchKind::Wae,
        Kind::Plain => ArchKind::Plain,
        Kind::NaiveHalf => ArchKind::NaiveHalf,
        Kind::Haar => ArchKind::Haar,
    }
}

/// The preset's network, switched to `kind`.
fn preset_config(a: &TrainArgs) -> Result<ModelConfig> {
    let mut config = preset(&a.preset).context("unknown preset")?;
    if let Some(k) = a.kind {
        config.set_kind(arch_kind(k));
        config.name = format!("{}-{:?}", a.preset, k).to_lowercase();
    }
    Ok(config)
}

/// The network for image folder `dir`: `config` (the preset's) at `--input` with the backbone
/// scaled, or as it is; labels from the folder names, normalisation measured on the pictures.
fn folder_config(
    a: &TrainArgs,
    mut config: ModelConfig,
    dir: &Path,
    train_set: &Dataset,
    folder: FolderSpec,
) -> ModelConfig {
    let FolderSpec { input, resize, .. } = folder;
    if a.input.is_some() {
        let stem = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let kind = a.kind.map_or(ArchKind::Wae, arch_kind);
        let name = format!("{stem}-{}-{input}", format!("{kind:?}").to_lowercase());
        config = wae_edge::config::for_input(&name, input, kind, train_set.classes.clone(), resize);
    } else {
        config.classes = train_set.classes.len();
        config.labels = train_set.classes.clone();
        config.preprocess.resize = resize;
    }
    let (mean, std) =
        train_set.channel_moments(&vec![0.0; input.channels], &vec![1.0; input.channels]);
    config.preprocess.mean = mean;
    // A constant channel would divide by zero; 1/255 is one grey level.
    config.preprocess.std = std.into_iter().map(|s| s.max(1.0 / 255.0)).collect();
    config
}

/// Prints the images per class and says whether balancing is on; returns whether it is.
fn report_classes(train_set: &Dataset, balance: Balance) -> bool {
    let counts = train_set.class_counts();
    let list: Vec<String> = train_set
        .classes
        .iter()
        .zip(&counts)
        .map(|(c, n)| format!("{} {n}", Escaped(c)))
        .collect();
    let (lo, hi) = (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    );
    let ratio = hi as f64 / lo.max(1) as f64;
    let on = match balance {
        Balance::On => true,
        Balance::Off => false,
        Balance::Auto => ratio >= IMBALANCE,
    };
    eprintln!(
        "{} training images in {} classes: {}",
        train_set.len(),
        counts.len(),
        list.join(", ")
    );
    if lo == 0 {
        eprintln!("warning: a class has no training images; the model will never predict it");
    }
    if ratio >= IMBALANCE || balance != Balance::Auto {
        eprintln!(
            "largest class / smallest: {ratio:.1}; class-balanced sampling {} (--balance)",
            if on { "on" } else { "off" }
        );
    }
    on
}

pub fn run_train(a: TrainArgs) -> Result<ExitCode> {
    let dir = dataset_dir(&a.dataset);
    let folders = dataset::is_image_folder(&dir);
    let mut config = preset_config(&a)?;
    if let (Some(i), false) = (a.input, folders) {
        if i != config.input {
            anyhow::bail!(
                "--input {i}: {} holds IDX files of a fixed size; --input applies to image folders (train/<class>/*.jpg)",
                Escaped(dir.display())
            );
        }
    }
    let input = a.input.unwrap_or(config.input);
    let folder = FolderSpec {
        input,
        // A folder's resize mode is the flag's; IDX files are at the input size already.
        resize: if folders {
            a.resize.into()
        } else {
            config.preprocess.resize
        },
        budget: a
            .memory_budget
            .map_or_else(dataset::default_memory_budget, |m| (m as u64) << 20),
    };
    // Before the dataset loads: a device this build lacks fails at once.
    let dev = device::select(a.device)?;
    let train_set = load_split(&a.dataset, Split::Train, folder)?;
    if folders {
        config = folder_config(&a, config, &dir, &train_set, folder);
    }
    if let Some(b) = &a.backbone {
        config.arch.backbone = parse_backbone(b)?;
    }
    if let Some(w) = a.branch_width {
        config.arch.branch_width = w;
    }
    config.validate()?;
    let balance = report_classes(&train_set, a.balance);
    let batch = a.batch.unwrap_or(if folders { FOLDER_BATCH } else { 128 });
    let val = train::validation_size(a.val, train_set.len());
    let steps = (train_set.len() - val)
        .min(a.limit.unwrap_or(usize::MAX))
        .div_ceil(batch)
        .max(1);
    // A folder of a few hundred pictures gives a few steps per epoch; the stages get a number
    // of steps instead, and never fewer epochs than Fashion-MNIST's recipe.
    let epochs = |given: Option<usize>, fashion: usize, min_steps: usize| {
        given.unwrap_or(if folders {
            min_steps.div_ceil(steps).max(fashion)
        } else {
            fashion
        })
    };
    let options = TrainOptions {
        config,
        dataset_name: a.dataset.clone(),
        ae_epochs: epochs(a.ae_epochs, 2, 100),
        cls_epochs: epochs(a.cls_epochs, 12, 400),
        joint_epochs: epochs(a.joint_epochs, 3, 100),
        lambda: a.lambda,
        gamma: a.gamma,
        batch,
        lr: a.lr,
        joint_lr_scale: a.joint_lr_scale,
        weight_decay: a.weight_decay,
        seed: a.seed,
        val: a.val,
        limit: a.limit,
        augment: !a.no_augment,
        recipe: if folders {
            Recipe::Photo
        } else {
            Recipe::FlipShift
        },
        balance,
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
        "augment": options.augment.then_some(options.recipe),
        "balanced_sampling": options.balance,
        "class_counts": train_set.class_counts(),
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
    let test = load_for_model(&a.dataset, Split::Test, clf.config())?;
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
    let train_set = load_for_model(&a.dataset, Split::Train, clf.config())?;
    let test = load_for_model(&a.dataset, Split::Test, clf.config())?;
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
