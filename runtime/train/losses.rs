//! The WAE losses. Normalisation (not recoverable from the paper) is per element: L_rec is the
//! mean squared error of the reconstruction, L_energy the mean square of I_H.

use candle_core::{Result, Tensor};

/// L_rec = mean((I - I_hat)^2).
pub fn reconstruction(input: &Tensor, rebuilt: &Tensor) -> Result<Tensor> {
    (input - rebuilt)?.sqr()?.mean_all()
}

/// L_energy = mean(I_H^2): pushes information into I_L, like a wavelet's LL band.
pub fn energy(high: &Tensor) -> Result<Tensor> {
    high.sqr()?.mean_all()
}

/// Stage-1 loss: L_rec + lambda * L_energy.
pub fn wae(input: &Tensor, rebuilt: &Tensor, high: &Tensor, lambda: f64) -> Result<Tensor> {
    reconstruction(input, rebuilt)? + (energy(high)? * lambda)?
}

/// Stage-3 loss: L_cls + gamma * (L_rec + lambda * L_energy).
pub fn joint(cls: &Tensor, wae_loss: &Tensor, gamma: f64) -> Result<Tensor> {
    cls + (wae_loss * gamma)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn losses_by_hand() {
        let d = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &d).unwrap();
        let r = Tensor::new(&[[1f32, 0.], [3., 5.]], &d).unwrap();
        // (0 + 4 + 0 + 1) / 4
        assert_eq!(scalar(reconstruction(&x, &r).unwrap()), 1.25);
        let h = Tensor::new(&[1f32, -3.], &d).unwrap();
        // (1 + 9) / 2
        assert_eq!(scalar(energy(&h).unwrap()), 5.0);
        // 1.25 + 0.1 * 5
        assert!((scalar(wae(&x, &r, &h, 0.1).unwrap()) - 1.75).abs() < 1e-6);
        let cls = Tensor::new(2f32, &d).unwrap();
        let w = Tensor::new(1.75f32, &d).unwrap();
        assert!((scalar(joint(&cls, &w, 0.001).unwrap()) - 2.00175).abs() < 1e-6);
    }
}
