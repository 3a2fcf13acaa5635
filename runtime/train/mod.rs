//! Training, as the paper does it: (1) the auto-encoder alone with L_rec + lambda * L_energy,
//! (2) the classifier on the frozen encoder's outputs, (3) everything jointly with
//! L_cls + gamma * (L_rec + lambda * L_energy). Single-branch kinds (plain, naive-half) and the
//! fixed Haar split train only the classifier stage. Batch norm is used while training and folded
//! into the convs at export. Every epoch ends with a checkpoint, so an interrupted run loses at
//! most one epoch (`--resume`). Adam moments are not checkpointed: a resumed stage restarts them.

pub mod losses;
mod plot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{ArchKind, ModelConfig};
use crate::dataset::Dataset;
use crate::init::SeededInit;
use crate::model::{Decoder, WaeNet, BN_EPS};
use crate::preprocess::Preprocessor;

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
    /// Random flips and +-2 px shifts.
    pub augment: bool,
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

/// What has been done so far; written with every checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct RunState {
    options: TrainOptions,
    /// Stages with their epochs completed.
    done: Vec<(Stage, usize)>,
    metrics: Vec<EpochMetrics>,
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

/// Files of a run directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.safetensors")
    }
    fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    /// Per-epoch metrics.
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.csv")
    }
    /// Training-curve picture.
    pub fn curve(&self) -> PathBuf {
        self.0.join("curve.svg")
    }
}

/// Deterministic shuffle of `0..n` for a seed.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Normalised batch and labels; with `rng`, each image is flipped (p = 0.5) and shifted by up
/// to 2 px (zero fill).
pub fn make_batch(
    pre: &Preprocessor,
    ds: &Dataset,
    idx: &[usize],
    rng: Option<&mut StdRng>,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let mut data = Vec::with_capacity(idx.len() * c * h * w);
    let mut aug_rng = rng;
    let mut moved = vec![0u8; c * h * w];
    for &i in idx {
        let img = ds.image(i);
        match aug_rng.as_deref_mut() {
            None => pre.normalize_planar(img, &mut data),
            Some(r) => {
                let flip = r.random_bool(0.5);
                let (dy, dx) = (r.random_range(-2i64..=2), r.random_range(-2i64..=2));
                for ch in 0..c {
                    for y in 0..h as i64 {
                        for x in 0..w as i64 {
                            let (sy, sx0) = (y - dy, x - dx);
                            let sx = if flip { w as i64 - 1 - sx0 } else { sx0 };
                            let v = if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
                                img[ch * h * w + (sy as usize) * w + sx as usize]
                            } else {
                                0
                            };
                            moved[ch * h * w + (y as usize) * w + x as usize] = v;
                        }
                    }
                }
                pre.normalize_planar(&moved, &mut data);
            }
        }
    }
    let x = Tensor::from_vec(data, (idx.len(), c, h, w), dev)?;
    let y = Tensor::from_vec(
        idx.iter().map(|&i| ds.labels[i] as u32).collect::<Vec<_>>(),
        idx.len(),
        dev,
    )?;
    Ok((x, y))
}

/// How many rows of `logits` have their maximum at the label in `y`.
fn count_correct(logits: &Tensor, y: &Tensor) -> candle_core::Result<usize> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Ok(hits.to_scalar::<f32>()? as usize)
}

/// Trainable variables of a stage (batch-norm running statistics are never trained).
fn stage_vars(vm: &VarMap, stage: Stage, kind: ArchKind) -> Vec<candle_core::Var> {
    let data = vm.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .filter(|n| {
            let ae = n.starts_with("encoder.") || n.starts_with("decoder.");
            match stage {
                Stage::AutoEncoder => ae,
                Stage::Classifier if kind == ArchKind::Wae => !ae,
                _ => true,
            }
        })
        .collect();
    names.sort();
    names.into_iter().map(|n| data[n].clone()).collect()
}

/// The model's networks over one VarMap.
struct Nets {
    net: WaeNet,
    decoder: Option<Decoder>,
}

impl Nets {
    /// Training-mode split and reconstruction: I_L, I_H and L_rec + lambda * L_energy.
    fn auto_encode(
        &self,
        x: &Tensor,
        lambda: f64,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (low, high) = self.net.split(x, true)?;
        let high = high.expect("WAE has I_H");
        let rebuilt = self
            .decoder
            .as_ref()
            .expect("WAE has a decoder")
            .forward(&low, &high)?;
        let loss = losses::wae(x, &rebuilt, &high, lambda)?;
        Ok((low, high, loss))
    }

    /// Loss, correct count and the split's by-products for one batch.
    fn step_loss(
        &self,
        stage: Stage,
        x: &Tensor,
        y: &Tensor,
        o: &TrainOptions,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let net = &self.net;
        match stage {
            Stage::AutoEncoder => Ok((self.auto_encode(x, o.lambda)?.2, None)),
            Stage::Classifier => {
                let logits = if o.config.arch.kind == ArchKind::Wae {
                    // Frozen encoder: running statistics, no gradient.
                    let (low, high) = net.split(x, false)?;
                    let (low, high) = (low.detach(), high.map(|h| h.detach()));
                    let f_low = net.backbone(&low, true)?;
                    let f_high = net.branch(high.as_ref(), true)?;
                    net.heads(&f_low, f_high.as_ref(), true)?
                } else {
                    net.forward_t(x, true)?
                };
                Ok((candle_nn::loss::cross_entropy(&logits, y)?, Some(logits)))
            }
            Stage::Joint => {
                let (low, high, wae) = self.auto_encode(x, o.lambda)?;
                let f_low = net.backbone(&low, true)?;
                let f_high = net.branch(Some(&high), true)?;
                let logits = net.heads(&f_low, f_high.as_ref(), true)?;
                let cls = candle_nn::loss::cross_entropy(&logits, y)?;
                Ok((losses::joint(&cls, &wae, o.gamma)?, Some(logits)))
            }
        }
    }

    /// Validation accuracy, reconstruction loss and I_H energy.
    fn validate(
        &self,
        pre: &Preprocessor,
        ds: &Dataset,
        dev: &Device,
    ) -> candle_core::Result<(f64, Option<f64>, Option<f64>)> {
        let (mut correct, mut rec, mut energy, mut batches) = (0usize, 0f64, 0f64, 0usize);
        let idx: Vec<usize> = (0..ds.len()).collect();
        for chunk in idx.chunks(500) {
            let (x, y) = make_batch(pre, ds, chunk, None, dev)?;
            let (low, high) = self.net.split(&x, false)?;
            if let (Some(dec), Some(h)) = (&self.decoder, &high) {
                rec +=
                    losses::reconstruction(&x, &dec.forward(&low, h)?)?.to_scalar::<f32>()? as f64;
            }
            if let Some(h) = &high {
                energy += losses::energy(h)?.to_scalar::<f32>()? as f64;
            }
            let f_low = self.net.backbone(&low, false)?;
            let f_high = self.net.branch(high.as_ref(), false)?;
            let logits = self.net.heads(&f_low, f_high.as_ref(), false)?;
            correct += count_correct(&logits, &y)?;
            batches += 1;
        }
        let n = batches.max(1) as f64;
        let mean_if = |has: bool, v: f64| has.then_some(v / n);
        Ok((
            correct as f64 / ds.len().max(1) as f64,
            mean_if(self.decoder.is_some(), rec),
            mean_if(self.net.config().arch.kind.has_branch(), energy),
        ))
    }
}

/// Folds every `P.bn.*` batch norm into the conv at `P` (eval-mode statistics) and drops it.
pub fn fold_batch_norm(
    tensors: &HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = tensors.clone();
    let prefixes: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".bn.running_mean"))
        .map(str::to_string)
        .collect();
    for p in prefixes {
        let get = |s: &str| {
            out.get(&format!("{p}.{s}"))
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("fold: {p}.{s} missing")))
        };
        let (w, b) = (get("weight")?, get("bias")?);
        let (g, beta, mean, var) = (
            get("bn.weight")?,
            get("bn.bias")?,
            get("bn.running_mean")?,
            get("bn.running_var")?,
        );
        let scale = (g / (var + BN_EPS)?.sqrt()?)?;
        let w2 = w.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        let b2 = ((b - mean)? * &scale)?.add(&beta)?;
        for s in ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"] {
            out.remove(&format!("{p}.{s}"));
        }
        out.insert(format!("{p}.weight"), w2);
        out.insert(format!("{p}.bias"), b2);
    }
    Ok(out)
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
        let s: RunState = serde_json::from_str(&std::fs::read_to_string(run.state())?)
            .context("reading run state")?;
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
        eprintln!("resuming {} after {:?}", dir.display(), state.done.last());
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
    // Validation split carved from the training set; the test set is never looked at here.
    let order = shuffled(train_set.len(), options.seed);
    let val_n = options.val.min(train_set.len() / 5);
    let val = train_set.subset(&order[..val_n]);
    let mut train_idx: Vec<usize> = order[val_n..].to_vec();
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
        for epoch in done..epochs {
            let t0 = Instant::now();
            let mut rng =
                StdRng::seed_from_u64(options.seed ^ ((stage_no as u64) << 32) ^ epoch as u64);
            train_idx.shuffle(&mut rng);
            let bar = ProgressBar::new(steps_per_epoch as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {elapsed}<{eta} {msg}")
                    .expect("static template"),
            );
            bar.set_prefix(format!("{stage:?} {}/{epochs}", epoch + 1));
            let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
            let mut lr = peak;
            for (step, chunk) in train_idx.chunks(options.batch).enumerate() {
                let t = (epoch * steps_per_epoch + step) as f64 / total_steps as f64;
                lr = peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                opt.set_learning_rate(lr);
                let (x, y) = make_batch(
                    &pre,
                    train_set,
                    chunk,
                    options.augment.then_some(&mut rng),
                    dev,
                )?;
                let (loss, logits) = nets.step_loss(stage, &x, &y, options)?;
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
            let (val_acc, val_rec, val_energy) = if val.is_empty() {
                (None, None, None)
            } else {
                let (acc, rec, energy) = nets.validate(&pre, &val, dev)?;
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

/// Current values of every variable, by name, copied to the CPU for writing.
fn snapshot(vm: &VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let data = vm.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect()
}

/// Writes the checkpoint, state, metrics CSV and curve, each atomically.
fn checkpoint(run: &RunDir, vm: &VarMap, state: &RunState) -> Result<()> {
    let tensors = snapshot(vm)?;
    let bytes = safetensors_f32(&tensors)?;
    crate::atomic::write(&run.checkpoint(), &bytes)?;
    crate::atomic::write(
        &run.state(),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let mut csv =
        String::from("stage,epoch,train_loss,train_acc,val_acc,val_rec,val_energy,lr,seconds\n");
    for m in &state.metrics {
        let stage = serde_json::to_value(m.stage)?
            .as_str()
            .unwrap_or_default()
            .to_string();
        let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        csv += &format!(
            "{stage},{},{:.6},{},{},{},{},{:.3e},{:.1}\n",
            m.epoch,
            m.train_loss,
            f(m.train_acc),
            f(m.val_acc),
            f(m.val_rec),
            f(m.val_energy),
            m.lr,
            m.seconds
        );
    }
    crate::atomic::write(&run.metrics(), csv.as_bytes())?;
    let svg = plot::curve_svg(&state.metrics, &state.options.config.name)?;
    crate::atomic::write(&run.curve(), svg.as_bytes())?;
    Ok(())
}

/// Serialises f32 tensors (checkpoints keep full precision).
fn safetensors_f32(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    Ok(safetensors::serialize(named, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use candle_nn::ModuleT;

    #[test]
    fn folding_batch_norm_keeps_eval_outputs() {
        let init = SeededInit::new(7);
        let vb = init.var_builder();
        let conv = crate::model::conv3x3(2, 3, 1, true, false, vb.pp("c")).unwrap();
        // Non-trivial statistics and affine parameters.
        let mut t = init.tensors();
        t.insert(
            "c.bn.running_mean".into(),
            Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap(),
        );
        t.insert(
            "c.bn.running_var".into(),
            Tensor::new(&[4.0f32, 0.25, 1.0], &Device::Cpu).unwrap(),
        );
        t.insert(
            "c.bn.weight".into(),
            Tensor::new(&[1.5f32, -0.5, 1.0], &Device::Cpu).unwrap(),
        );
        t.insert(
            "c.bn.bias".into(),
            Tensor::new(&[0.1f32, 0.2, -0.3], &Device::Cpu).unwrap(),
        );
        let with_bn = crate::model::conv3x3(
            2,
            3,
            1,
            true,
            false,
            VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu).pp("c"),
        )
        .unwrap();
        let folded = fold_batch_norm(&t).unwrap();
        assert!(!folded.keys().any(|k| k.contains(".bn.")));
        let plain = crate::model::conv3x3(
            2,
            3,
            1,
            false,
            false,
            VarBuilder::from_tensors(folded, DType::F32, &Device::Cpu).pp("c"),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1., (2, 2, 5, 5), &Device::Cpu).unwrap();
        let a = with_bn.forward_t(&x, false).unwrap();
        let b = plain.forward_t(&x, false).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        drop(conv);
    }

    #[test]
    fn stages_pick_their_variables() {
        let cfg = preset("wae-fashion").unwrap();
        let init = SeededInit::new(0);
        WaeNet::new(&cfg, init.var_builder()).unwrap();
        Decoder::new(&cfg, init.var_builder().pp("decoder")).unwrap();
        let vm = init.into_varmap(&Device::Cpu).unwrap();
        let total = stage_vars(&vm, Stage::Joint, ArchKind::Wae).len();
        let ae = stage_vars(&vm, Stage::AutoEncoder, ArchKind::Wae).len();
        let cls = stage_vars(&vm, Stage::Classifier, ArchKind::Wae).len();
        assert_eq!(ae + cls, total);
        assert!(ae > 0 && cls > ae);
    }
}
