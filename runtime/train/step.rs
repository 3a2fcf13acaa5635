//! One stage's step: which variables it trains, its loss and accuracy on a batch, and
//! validation.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;

use super::batch::make_batch;
use super::{losses, Stage, TrainOptions};
use crate::config::ArchKind;
use crate::dataset::Dataset;
use crate::model::{Decoder, WaeNet};
use crate::preprocess::Preprocessor;

/// How many rows of `logits` have their maximum at the label in `y`.
pub(super) fn count_correct(logits: &Tensor, y: &Tensor) -> candle_core::Result<usize> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Ok(hits.to_scalar::<f32>()? as usize)
}

/// Trainable variables of a stage (batch-norm running statistics are never trained).
pub(super) fn stage_vars(vm: &VarMap, stage: Stage, kind: ArchKind) -> Vec<candle_core::Var> {
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
pub(super) struct Nets {
    pub(super) net: WaeNet,
    pub(super) decoder: Option<Decoder>,
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
    pub(super) fn step_loss(
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
    pub(super) fn validate(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use crate::init::SeededInit;

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
