//! A run directory: the checkpoint, the run state, the metrics CSV and the training curve,
//! rewritten atomically after every epoch so that `--resume` loses at most one epoch.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::{plot, EpochMetrics, Stage, TrainOptions};

/// What has been done so far; written with every checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct RunState {
    pub(super) options: TrainOptions,
    /// Stages with their epochs completed.
    pub(super) done: Vec<(Stage, usize)>,
    pub(super) metrics: Vec<EpochMetrics>,
}

/// Files of a run directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub(super) fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.safetensors")
    }
    pub(super) fn state(&self) -> PathBuf {
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

/// Current values of every variable, by name, copied to the CPU for writing.
pub(super) fn snapshot(vm: &VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let data = vm.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect()
}

/// Writes the checkpoint, state, metrics CSV and curve, each atomically.
pub(super) fn checkpoint(run: &RunDir, vm: &VarMap, state: &RunState) -> Result<()> {
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
