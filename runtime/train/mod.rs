//! Training, as the paper does it: (1) the auto-encoder alone with L_rec + lambda * L_energy,
//! (2) the classifier on the frozen encoder's outputs, (3) everything jointly with
//! L_cls + gamma * (L_rec + lambda * L_energy). Single-branch kinds (plain, naive-half) and the
//! fixed Haar split train only the classifier stage. Batch norm is used while training and folded
//! into the convs at export. Every epoch ends with a checkpoint, so an interrupted run loses at
//! most one epoch (`--resume`). Adam moments are not checkpointed: a resumed stage restarts them.

mod batch;
mod fold;
pub mod losses;
mod plot;
mod run_dir;
mod step;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::config::{ArchKind, ModelConfig};
use crate::dataset::Dataset;
use crate::init::SeededInit;
use crate::model::{Decoder, WaeNet};
use crate::preprocess::Preprocessor;
use batch::{balanced_epoch, split_per_class};
pub use batch::{make_batch, Recipe};
pub use fold::fold_batch_norm;
pub use run_dir::RunDir;
use run_dir::{checkpoint, snapshot, RunState};
use step::{count_correct, stage_vars, Nets};

/// The three stages of the paper.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Encoder + decoder on L_rec + lambda * L_energy.
    AutoEncoder,
    /// Backbone, branch and heads on the (frozen) encoder's outputs.
    Classifier,
    /// Everything, on L_cls + gamma * L_wae.
    Joint,
}

/// Everything a run needs; stored in the checkpoint so `--resume` continues the same run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// The network (batch norm is switched on for training).
    pub config: ModelConfig,
    /// Dataset name, recorded in the exported model.
    pub dataset_name: String,
    /// Epochs of stage 1 (WAE only).
    pub ae_epochs: usize,
    /// Epochs of stage 2.
    pub cls_epochs: usize,
    /// Epochs of stage 3 (WAE only).
    pub joint_epochs: usize,
    /// Weight of the energy penalty.
    pub lambda: f64,
    /// Weight of the WAE loss in the joint stage (paper: 0.001).
    pub gamma: f64,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (cosine decay within each stage).
    pub lr: f64,
    /// The joint stage's peak learning rate as a fraction of `lr`: it fine-tunes networks the
    /// earlier stages trained, and a full restart undoes part of their progress.
    #[serde(default = "one")]
    pub joint_lr_scale: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed for weights, shuffling, validation split and augmentation.
    pub seed: u64,
    /// Images held out of the training set for validation.
    pub val: usize,
    /// Use at most this many training images (quick runs and tests).
    pub limit: Option<usize>,
    /// Augment the training images (per `recipe`).
    pub augment: bool,
    /// Which augmentations: Fashion-MNIST's flips and shifts, or the photo recipe.
    #[serde(default)]
    pub recipe: Recipe,
    /// Draw each epoch's images class-balanced (with replacement), for uneven classes.
    #[serde(default)]
    pub balance: bool,
}

/// Runs checkpointed before `joint_lr_scale` existed restarted the joint stage at full rate.
fn one() -> f64 {
    1.0
}

/// One epoch's numbers, one CSV row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EpochMetrics {
    /// Stage.
    pub stage: Stage,
    /// Epoch within the stage, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (none in stage 1).
    pub train_acc: Option<f64>,
    /// Validation accuracy (none in stage 1).
    pub val_acc: Option<f64>,
    /// Validation reconstruction loss (none without a decoder).
    pub val_rec: Option<f64>,
    /// Validation mean square of I_H (none without I_H).
    pub val_energy: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
}

/// The stages a kind trains, with their epoch budgets.
pub fn plan(o: &TrainOptions) -> Vec<(Stage, usize)> {
    if o.config.arch.kind == ArchKind::Wae {
        vec![
            (Stage::AutoEncoder, o.ae_epochs),
            (Stage::Classifier, o.cls_epochs),
            (Stage::Joint, o.joint_epochs),
        ]
    } else {
        vec![(Stage::Classifier, o.cls_epochs)]
    }
}

/// Images held out for validation from a training set of `n` when `val` are asked for: at
/// most a fifth of it.
pub fn validation_size(val: usize, n: usize) -> usize {
    val.min(n / 5)
}

/// Result of a finished run.
#[derive(Debug)]
pub struct TrainReport {
    /// The config written into the exported model.
    pub config: ModelConfig,
    /// Exported tensors (batch norm folded, decoder included).
    pub tensors: HashMap<String, Tensor>,
    /// All epochs.
    pub metrics: Vec<EpochMetrics>,
}

/// Asks glibc to keep freed tensor memory for reuse. A CPU training step allocates and frees
/// hundreds of multi-megabyte tensors; above glibc's default 128 KB threshold each one is a fresh
/// `mmap`, so every step paid for page faults, page zeroing and TLB shoot-downs between the two
/// cores (15% of a profile). 32 MB is glibc's largest threshold and above any tensor of the
/// presets' training batches. Measured: 100 steps of the 7-conv WAE went from 126 to 104 s.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Trains (or resumes) a run in `dir` on `train`, on `dev`; returns the exportable model. The
/// device is not part of the options: a run may resume on another one.
pub fn train(
    options: &TrainOptions,
    train_set: &Dataset,
    dir: &Path,
    resume: bool,
    dev: &Device,
) -> Result<TrainReport> {
    let run = RunDir(dir.to_path_buf());
    if dev.is_cpu() {
        keep_freed_memory();
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut state = if resume && run.state().exists() {
        let text = crate::regular_file::read_bounded(&run.state(), 64 << 20)
            .with_context(|| format!("reading {}", run.state().display()))?;
        let s: RunState = serde_json::from_slice(&text).context("reading run state")?;
        if s.options != *options {
            bail!("{}: the run was started with other options; resume with the same flags or use a new --out", run.state().display());
        }
        s
    } else {
        if run.state().exists() && !resume {
            bail!(
                "{} holds a run already; pass --resume to continue it or choose another --out",
                dir.display()
            );
        }
        RunState {
            options: options.clone(),
            done: vec![],
            metrics: vec![],
        }
    };
    let mut cfg = options.config.clone();
    cfg.arch.batch_norm = true;
    cfg.validate()?;
    // Create every tensor deterministically, then train them as variables.
    let init = SeededInit::new(options.seed);
    WaeNet::new(&cfg, init.var_builder())?;
    if cfg.arch.kind == ArchKind::Wae {
        Decoder::new(&cfg, init.var_builder().pp("decoder"))?;
    }
    let mut vm = init.into_varmap(dev)?;
    if !state.done.is_empty() {
        vm.load(run.checkpoint())
            .with_context(|| format!("loading {}", run.checkpoint().display()))?;
        eprintln!(
            "resuming {} after {:?}",
            crate::terminal::Escaped(dir.display()),
            state.done.last()
        );
    }
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let nets = Nets {
        net: WaeNet::new(&cfg, vb.clone())?,
        decoder: if cfg.arch.kind == ArchKind::Wae {
            Some(Decoder::new(&cfg, vb.pp("decoder"))?)
        } else {
            None
        },
    };
    let pre = Preprocessor::new(&cfg);
    // Validation split carved from the training set, class by class; the test set is never
    // looked at here.
    let val_n = validation_size(options.val, train_set.len());
    let (val_idx, mut train_idx) = split_per_class(&train_set.labels, val_n, options.seed);
    let val = train_set.subset(&val_idx);
    if let Some(l) = options.limit {
        train_idx.truncate(l);
    }
    let steps_per_epoch = train_idx.len().div_ceil(options.batch);
    for (stage_no, (stage, epochs)) in plan(options).into_iter().enumerate() {
        let done = state
            .done
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0, |d| d.1);
        if done >= epochs {
            continue;
        }
        let vars = stage_vars(&vm, stage, cfg.arch.kind);
        let peak = match stage {
            Stage::Joint => options.lr * options.joint_lr_scale,
            _ => options.lr,
        };
        let params = ParamsAdamW {
            lr: peak,
            weight_decay: options.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars, params)?;
        let total_steps = (epochs * steps_per_epoch).max(1);
        let epoch_run = Epoch {
            options,
            nets: &nets,
            pre: &pre,
            train_set,
            val: &val,
            dev,
            stage,
            epochs,
            peak,
            steps_per_epoch,
            total_steps,
        };
        for epoch in done..epochs {
            let rng =
                StdRng::seed_from_u64(options.seed ^ ((stage_no as u64) << 32) ^ epoch as u64);
            let m = epoch_run.run(epoch, rng, &mut opt, &mut train_idx)?;
            state.metrics.push(m);
            state.done.retain(|(s, _)| *s != stage);
            state.done.push((stage, epoch + 1));
            checkpoint(&run, &vm, &state)?;
        }
    }
    let tensors = snapshot(&vm)?;
    let mut config = options.config.clone();
    config.arch.batch_norm = false;
    config.untrained = false;
    Ok(TrainReport {
        config,
        tensors: fold_batch_norm(&tensors)?,
        metrics: state.metrics,
    })
}

/// One stage's epochs: what they share.
struct Epoch<'a> {
    options: &'a TrainOptions,
    nets: &'a Nets,
    pre: &'a Preprocessor,
    train_set: &'a Dataset,
    val: &'a Dataset,
    dev: &'a Device,
    stage: Stage,
    /// The stage's epoch budget.
    epochs: usize,
    /// The stage's peak learning rate, decayed by a cosine over its steps.
    peak: f64,
    steps_per_epoch: usize,
    total_steps: usize,
}

impl Epoch<'_> {
    /// Trains epoch `epoch` (from 0) over `train_idx`, shuffled by `rng`, with a progress bar,
    /// then validates; returns the epoch's metrics.
    fn run(
        &self,
        epoch: usize,
        mut rng: StdRng,
        opt: &mut AdamW,
        train_idx: &mut [usize],
    ) -> Result<EpochMetrics> {
        let (stage, epochs, steps_per_epoch) = (self.stage, self.epochs, self.steps_per_epoch);
        let t0 = Instant::now();
        train_idx.shuffle(&mut rng);
        let balanced;
        let order: &[usize] = if self.options.balance {
            balanced = balanced_epoch(train_idx, &self.train_set.labels, &mut rng);
            &balanced
        } else {
            train_idx
        };
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {elapsed}<{eta} {msg}")
                .expect("static template"),
        );
        bar.set_prefix(format!("{stage:?} {}/{epochs}", epoch + 1));
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = self.peak;
        for (step, chunk) in order.chunks(self.options.batch).enumerate() {
            let t = (epoch * steps_per_epoch + step) as f64 / self.total_steps as f64;
            lr = self.peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
            opt.set_learning_rate(lr);
            let (x, y) = make_batch(
                self.pre,
                self.train_set,
                chunk,
                self.options
                    .augment
                    .then_some((&mut rng, self.options.recipe)),
                self.dev,
            )?;
            let (loss, logits) = self.nets.step_loss(stage, &x, &y, self.options)?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!(
                    "{stage:?} epoch {}: the loss became {l}; lower --lr",
                    epoch + 1
                );
            }
            loss_sum += l * chunk.len() as f64;
            seen += chunk.len();
            if let Some(logits) = logits {
                correct += count_correct(&logits, &y)?;
            }
            bar.inc(1);
            if step % 10 == 0 {
                let msg = format!(
                    "loss {:.4} acc {:.3}",
                    loss_sum / seen as f64,
                    correct as f64 / seen as f64
                );
                // indicatif draws nothing off a terminal; logs still get a line now and then.
                if bar.is_hidden() && step % 100 == 0 {
                    eprintln!(
                        "{stage:?} {}/{epochs} step {step}/{steps_per_epoch} {msg} ({:.0} s)",
                        epoch + 1,
                        t0.elapsed().as_secs_f64()
                    );
                }
                bar.set_message(msg);
            }
        }
        bar.finish_and_clear();
        let has_cls = stage != Stage::AutoEncoder;
        // `--val 0` trains on every image (after choosing settings on a split) and reports
        // no validation numbers rather than zeros.
        let (val_acc, val_rec, val_energy) = if self.val.is_empty() {
            (None, None, None)
        } else {
            let (acc, rec, energy) = self.nets.validate(self.pre, self.val, self.dev)?;
            (has_cls.then_some(acc), rec, energy)
        };
        let m = EpochMetrics {
            stage,
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: has_cls.then_some(correct as f64 / seen.max(1) as f64),
            val_acc,
            val_rec,
            val_energy,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        eprintln!(
            "{:?} {}/{}: loss {:.4} train acc {} val acc {} val rec {} energy {} ({:.0} s)",
            stage,
            m.epoch,
            epochs,
            m.train_loss,
            f(m.train_acc),
            f(m.val_acc),
            f(m.val_rec),
            f(m.val_energy),
            m.seconds
        );
        Ok(m)
    }
}
