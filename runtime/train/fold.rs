//! Export: batch norm, used while training, folded into the convs it follows.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::model::BN_EPS;

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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededInit;
    use candle_core::{DType, Device};
    use candle_nn::{ModuleT, VarBuilder};

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
}
