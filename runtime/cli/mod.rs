//! Sub-commands of the `wae-edge` binary: argument parsing and printing only; the work is in
//! the library.

mod bench;
mod capture;
mod classify;
mod inspect;
mod interrupt;
#[cfg(feature = "mqtt")]
mod publish;
mod stream;
#[cfg(feature = "train")]
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};

use wae_edge::classifier::EngineKind;
use wae_edge::config::{preset, PRESETS};
use wae_edge::device::{self, DeviceRequest};
use wae_edge::profiles::Profile;
use wae_edge::terminal::Escaped;
use wae_edge::weights;
use wae_edge::Classifier;

/// The version and the git commit the binary was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("WAE_EDGE_COMMIT"),
    ")"
);

/// Run WAE image classifiers on edge devices.
#[derive(Parser, Debug)]
#[command(name = "wae-edge", version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to run: a profile, a device flag, or both (the flag wins).
#[derive(clap::Args, Debug, Clone)]
pub struct Placement {
    /// Device: auto picks CUDA, then Metal, then CPU.
    #[arg(long, value_enum)]
    device: Option<DeviceRequest>,
    /// Firmware profile: a shipped name (`wae-edge profiles`) or a .toml path.
    #[arg(long)]
    profile: Option<String>,
    /// CUDA graphs (--device cuda): auto replays a graph captured once where the GPU supports
    /// it, on insists, off launches every kernel each frame.
    #[arg(long, value_enum, default_value = "auto")]
    pub(super) cuda_graph: wae_edge::gpu::GraphMode,
}

impl Placement {
    /// Applies the profile's thread count and opens the device; says which on stderr.
    fn open(&self) -> Result<Device> {
        // The profile's thread count was applied when the pool started (`Command::threads`).
        let profile = self.profile.as_deref().map(Profile::resolve).transpose()?;
        let dev = match (self.device, &profile) {
            (Some(req), _) => device::select(req)?,
            (None, Some(p)) => p.device()?,
            (None, None) => device::select(DeviceRequest::Auto)?,
        };
        let how = match (&profile, self.device) {
            (_, Some(r)) => format!("--device {r:?}").to_lowercase(),
            (Some(p), None) => format!("profile {}", Escaped(&p.name)),
            (None, None) => "auto".into(),
        };
        eprintln!("device: {} ({how})", device::describe(&dev));
        wae_edge::gpu::mode::check_device(self.cuda_graph, device::describe(&dev))?;
        Ok(dev)
    }

    /// Loads a model for this placement's device and graph mode; says how a CUDA engine runs.
    fn load(
        &self,
        model: &std::path::Path,
        device: &Device,
        kind: EngineKind,
    ) -> Result<Classifier> {
        let clf = Classifier::load_graph(model, device, kind, self.cuda_graph)?;
        if let Some(ex) = clf.engine().execution() {
            eprintln!("cuda: {ex}");
        }
        Ok(clf)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Classify image files, directories or globs with a model.
    Classify(classify::Args),
    /// Classify a camera, files or a synthetic source in real time, with fps and per-stage latency.
    Stream(stream::Args),
    /// Time a model (and a baseline, alternating): percentiles, fps, GFLOP/s, per stage.
    Bench(bench::Args),
    /// Save pictures of one class from any source into DIR/train/LABEL and DIR/test/LABEL,
    /// the layout `train --dataset DIR` reads.
    Capture(capture::Args),
    /// Write a randomly initialised fp16 model from a preset (marked untrained).
    New {
        /// Preset name.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: String,
        /// Output model file.
        #[arg(short, long)]
        output: PathBuf,
        /// Seed for the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print a model's config, parameters and multiply-accumulates against its plain counterpart.
    Inspect(inspect::Args),
    /// Train a model on a dataset (three WAE stages), checkpointing every epoch.
    #[cfg(feature = "train")]
    Train(train::TrainArgs),
    /// Test-set accuracy, per-class accuracy and confusion matrix of a model.
    #[cfg(feature = "train")]
    Eval(train::EvalArgs),
    /// Record what a model's training pictures look like in its file, so that classify and
    /// stream warn on pictures far from them (weights unchanged).
    #[cfg(feature = "train")]
    Calibrate(train::CalibrateArgs),
    /// Write I_L, I_H (contrast-stretched), the reconstruction and a side-by-side strip as PNG.
    Decompose {
        /// Model file with its decoder (default: the shipped model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        /// Image to split.
        image: PathBuf,
    },
    /// Dataset entropy as EBCLE computes it (mean per-image Shannon entropy, nats).
    #[cfg(feature = "train")]
    Entropy {
        /// `fashion-mnist` or a directory of IDX files; the training split is used.
        #[arg(long, default_value = "fashion-mnist")]
        dataset: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Export the inference network (decoder excluded) as ONNX with f32 weights.
    ExportOnnx {
        /// Model file (default: the shipped model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output .onnx file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Logits of normalised inputs given as raw little-endian f32 `[N, C, H, W]`, written as raw
    /// f32 `[N, classes]`: for checking other runtimes against wae-edge.
    Logits {
        /// Model file (default: the shipped model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Raw f32 input file.
        #[arg(long)]
        input: PathBuf,
        /// Raw f32 output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// EBCLE layer analysis: per backbone conv, relative change and CKA with the previous layer.
    #[cfg(feature = "train")]
    Layers {
        /// Model file (default: the shipped model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// `fashion-mnist` or a directory of IDX files; test images are used.
        #[arg(long, default_value = "fashion-mnist")]
        dataset: String,
        /// Number of images.
        #[arg(long, default_value_t = 512)]
        images: usize,
        /// One JSON object per layer.
        #[arg(long)]
        json: bool,
    },
    /// List the shipped firmware profiles.
    Profiles {
        /// One JSON object per profile.
        #[arg(long)]
        json: bool,
    },
}

/// An error and its causes as one line for a terminal: newlines and control characters in it
/// (a file name, a label) are escaped, so it can neither span lines nor drive the terminal.
pub fn one_line(e: &anyhow::Error) -> String {
    wae_edge::terminal::escape(&format!("{e:#}")).into_owned()
}

/// clap parser for counts that must be at least 1 (`--top-k`, `--iters`, `--batch`).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The longest time a time flag takes, in seconds (a year): long enough for any run, short
/// enough to be a `Duration`.
const MAX_SECONDS: f64 = 365.0 * 86_400.0;

/// clap parser for a number of seconds: positive, finite, at most a year.
pub fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= MAX_SECONDS {
        Ok(v)
    } else {
        Err(format!(
            "must be a number of seconds above 0 and at most {MAX_SECONDS}"
        ))
    }
}

impl Command {
    /// Threads the command line asks for: `bench --threads`, else a profile's, unless the
    /// user's own `RAYON_NUM_THREADS` is set.
    fn threads(&self) -> Result<Option<usize>> {
        let placement = match self {
            Command::Bench(a) if a.threads.is_some() => return Ok(a.threads),
            Command::Bench(a) => &a.placement,
            Command::Classify(a) => &a.placement,
            Command::Stream(a) => &a.placement,
            #[cfg(feature = "train")]
            Command::Eval(a) => &a.placement,
            _ => return Ok(None),
        };
        if std::env::var_os("RAYON_NUM_THREADS").is_some() {
            return Ok(None);
        }
        let profile = placement
            .profile
            .as_deref()
            .map(Profile::resolve)
            .transpose()?;
        Ok(profile.map(|p| p.threads).filter(|&n| n > 0))
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    interrupt::install();
    // Before anything touches rayon, so that an impossible thread count is an error, not a
    // panic on first use.
    wae_edge::threads::init(cli.command.threads()?)?;
    match cli.command {
        Command::Classify(args) => classify::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Capture(args) => capture::run(args),
        #[cfg(feature = "train")]
        Command::Train(args) => train::run_train(args),
        #[cfg(feature = "train")]
        Command::Eval(args) => train::run_eval(args),
        #[cfg(feature = "train")]
        Command::Calibrate(args) => train::run_calibrate(args),
        Command::New {
            preset: name,
            output,
            seed,
        } => {
            let Some(config) = preset(&name) else {
                bail!("unknown preset {name}")
            };
            let (config, tensors) =
                weights::random_model(&config, seed).context("initialising weights")?;
            weights::save(&output, &config, &tensors)?;
            let params = weights::param_count(&weights::inference_tensors(&config));
            eprintln!(
                "wrote {} ({name}, {params} inference parameters, UNTRAINED random weights)",
                Escaped(output.display())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Decompose {
            model,
            output,
            image,
        } => {
            let model = model_path(model);
            let (net, dec) = weights::ModelFile::open(&model)?.build_with_decoder(&Device::Cpu)?;
            let pre = wae_edge::preprocess::Preprocessor::new(net.config());
            let img = wae_edge::preprocess::load_image(&image)?;
            let d = wae_edge::decompose::decompose(&net, &dec, &pre, &img, &Device::Cpu)
                .with_context(|| format!("decomposing {}", image.display()))?;
            std::fs::create_dir_all(&output)
                .with_context(|| format!("creating {}", output.display()))?;
            let stem = image
                .file_stem()
                .map_or("image".into(), |s| s.to_string_lossy().into_owned());
            let strip = wae_edge::decompose::strip(&d, 224);
            for (part, pic) in [
                ("input", &d.input),
                ("low", &d.low),
                ("high", &d.high),
                ("rec", &d.rebuilt),
                ("strip", &strip),
            ] {
                let path = output.join(format!("{stem}_{part}.png"));
                wae_edge::atomic::write_png(&path, pic)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", Escaped(path.display()));
            }
            eprintln!(
                "I_L holds {:.1}% of the split's energy",
                100.0 * d.low_energy_share
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "train")]
        Command::Entropy { dataset, json } => {
            // Entropy is of the pixels as stored: IDX images as they are, folders at 28x28 gray.
            let input = wae_edge::config::InputSpec {
                channels: 1,
                height: 28,
                width: 28,
            };
            let folder =
                wae_edge::dataset::FolderSpec::new(input, wae_edge::config::ResizeMode::Stretch);
            let ds = train::load_split(&dataset, wae_edge::dataset::Split::Train, folder)?;
            let r = wae_edge::entropy::dataset_entropy(&ds);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: mean entropy {:.4} nats (std {:.4}, min {:.4}, max {:.4}) over {} training images; 8-bit bound ln 256 = {:.4}",
                    Escaped(&dataset),
                    r.mean_nats,
                    r.std_nats,
                    r.min_nats,
                    r.max_nats,
                    r.n,
                    r.bound_nats
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ExportOnnx { model, output } => {
            let model = model_path(model);
            let bytes = wae_edge::onnx::export(&weights::ModelFile::open(&model)?)?;
            wae_edge::atomic::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "wrote {} ({} bytes, opset {})",
                Escaped(output.display()),
                bytes.len(),
                wae_edge::onnx::OPSET
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Logits {
            model,
            input,
            output,
        } => {
            let model = model_path(model);
            // The same engine `bench` times, so the peer check validates what is measured.
            let clf = wae_edge::Classifier::load(&model, &Device::Cpu)?;
            let i = clf.config().input;
            let per = 4 * i.channels * i.height * i.width;
            // At most a few thousand inputs: a file is a batch to check, not a dataset.
            let max = (per as u64 * 4096).min(1 << 30);
            let raw = wae_edge::regular_file::read_bounded(&input, max)
                .with_context(|| format!("reading {}", input.display()))?;
            if raw.is_empty() || raw.len() % per != 0 {
                bail!(
                    "{}: {} bytes is not a whole number of {}x{}x{} f32 inputs",
                    input.display(),
                    raw.len(),
                    i.channels,
                    i.height,
                    i.width
                );
            }
            let vals: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let x = candle_core::Tensor::from_vec(
                vals,
                (raw.len() / per, i.channels, i.height, i.width),
                &Device::Cpu,
            )?;
            let bytes: Vec<u8> = clf
                .logits(&x)?
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            wae_edge::atomic::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "train")]
        Command::Layers {
            model,
            dataset,
            images,
            json,
        } => {
            let model = model_path(model);
            // Layer traces come from candle's modules.
            let clf = wae_edge::Classifier::load_with(
                &model,
                &Device::Cpu,
                wae_edge::classifier::EngineKind::Candle,
            )?;
            let wae_edge::classifier::Engine::Candle(net) = clf.engine() else {
                bail!("layer analysis needs the candle engine")
            };
            let test =
                train::load_for_model(&dataset, wae_edge::dataset::Split::Test, clf.config())?;
            let idx: Vec<usize> = (0..images.max(2).min(test.len())).collect();
            let xs = wae_edge::eval::batch_tensor(&clf, &test, &idx)?;
            for l in wae_edge::depth::analyse(net, &xs)? {
                if json {
                    println!("{}", serde_json::to_string(&l)?);
                } else {
                    let rc = l.relative_change.map_or("-".into(), |v| format!("{v:.3}"));
                    println!(
                        "conv {:>2} {:>14}  relative change {rc:>6}  CKA with previous {:.3}",
                        l.layer,
                        format!("{:?}", l.shape),
                        l.cka_previous
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Profiles { json } => {
            for p in Profile::shipped()? {
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    let built = if device::built_with(p.device) {
                        ""
                    } else {
                        "  [not in this build]"
                    };
                    println!(
                        "{:<18} {:<6} {}{built}",
                        Escaped(&p.name),
                        format!("{:?}", p.device).to_lowercase(),
                        Escaped(&p.description)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The model to use: the flag, or the shipped default.
fn model_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(wae_edge::default_model_path)
}
