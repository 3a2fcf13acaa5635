//! How deep is deep enough: EBCLE (Gowdra et al., 2021) claims layers beyond an entropy-given
//! depth learn near-identity maps. This measures it per backbone conv: the relative change
//! ||f(x) - x|| / ||x|| against the previous conv's output (same shape only), and linear CKA
//! (Kornblith et al., 2019) between consecutive layers' representations.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::model::WaeNet;

/// One backbone conv's numbers.
#[derive(Serialize, Clone, Debug)]
pub struct LayerStat {
    /// Conv index in the backbone, from 0.
    pub layer: usize,
    /// Output shape `[C, H, W]`.
    pub shape: Vec<usize>,
    /// ||f(x) - x|| / ||x|| against the previous conv's output, where shapes match.
    pub relative_change: Option<f64>,
    /// Linear CKA with the previous layer (the backbone's input for layer 0); 1 = same geometry.
    pub cka_previous: f64,
}

/// Linear CKA of two representations of the same `n` examples (`[n, p]` and `[n, q]`), through
/// the n x n Gram matrices so wide layers stay cheap.
pub fn linear_cka(x: &Tensor, y: &Tensor) -> candle_core::Result<f64> {
    let gram = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.to_dtype(DType::F64)?;
        let t = t.broadcast_sub(&t.mean_keepdim(0)?)?;
        t.matmul(&t.t()?)
    };
    let (kx, ky) = (gram(x)?, gram(y)?);
    let dot = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
        (a * b)?.sum_all()?.to_scalar::<f64>()
    };
    let (xy, xx, yy) = (dot(&kx, &ky)?, dot(&kx, &kx)?, dot(&ky, &ky)?);
    Ok(if xx > 0.0 && yy > 0.0 {
        xy / (xx.sqrt() * yy.sqrt())
    } else {
        0.0
    })
}

/// Relative change ||a - b|| / ||b||.
pub fn relative_change(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let num = (a - b)?
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt();
    let den = b
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt();
    Ok(if den > 0.0 { num / den } else { f64::INFINITY })
}

/// Per-conv statistics of the backbone on a normalised input batch.
pub fn analyse(net: &WaeNet, xs: &Tensor) -> candle_core::Result<Vec<LayerStat>> {
    let (low, _) = net.split(xs, false)?;
    let acts = net.backbone_stack().trace(&low)?;
    let mut out = Vec::new();
    let mut prev = low;
    for (i, a) in acts.iter().enumerate() {
        let relative_change = if a.dims() == prev.dims() {
            Some(relative_change(a, &prev)?)
        } else {
            None
        };
        let cka_previous = linear_cka(&a.flatten_from(1)?, &prev.flatten_from(1)?)?;
        out.push(LayerStat {
            layer: i,
            shape: a.dims()[1..].to_vec(),
            relative_change,
            cka_previous,
        });
        prev = a.clone();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cka_is_one_for_scaled_copies_and_small_for_noise() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (64, 20), &d).unwrap();
        assert!((linear_cka(&x, &x).unwrap() - 1.0).abs() < 1e-9);
        let y = ((&x * 3.0).unwrap() + 1.0).unwrap();
        assert!(
            (linear_cka(&x, &y).unwrap() - 1.0).abs() < 1e-9,
            "invariant to scale and shift"
        );
        let z = Tensor::randn(0f32, 1., (64, 20), &d).unwrap();
        assert!(linear_cka(&x, &z).unwrap() < 0.6);
    }

    #[test]
    fn relative_change_by_hand() {
        let d = Device::Cpu;
        let b = Tensor::new(&[3f32, 4.], &d).unwrap();
        let a = Tensor::new(&[3f32, 4.5], &d).unwrap();
        assert!((relative_change(&a, &b).unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(relative_change(&b, &b).unwrap(), 0.0);
    }
}
