//! Deterministic weight initialisation. Candle cannot seed its CPU generator, so every tensor
//! is drawn from its own generator seeded by (seed, tensor name): the same seed gives the same
//! weights whatever order the builders ask in.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

/// A VarBuilder back-end that creates seeded tensors on first request and remembers them.
#[derive(Clone)]
pub struct SeededInit {
    seed: u64,
    tensors: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SeededInit {
    /// A fresh store for `seed`.
    pub fn new(seed: u64) -> Self {
        SeededInit {
            seed,
            tensors: Arc::default(),
        }
    }

    /// A VarBuilder (f32, CPU) drawing from this store.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    /// Everything created so far.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.tensors.lock().expect("init lock").clone()
    }

    /// Copies everything created so far into a VarMap on `device`, as trainable variables.
    pub fn into_varmap(&self, device: &Device) -> Result<VarMap> {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().expect("varmap lock");
            for (name, t) in self.tensors() {
                data.insert(name, Var::from_tensor(&t.to_device(device)?)?);
            }
        }
        Ok(vm)
    }

    fn draw(&self, shape: &Shape, name: &str, init: Init) -> Result<Tensor> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.seed, name).hash(&mut h);
        let mut rng = rand::rngs::StdRng::seed_from_u64(h.finish());
        let n = shape.elem_count();
        let err = |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("init {name}: {e}"));
        let data: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => {
                let u = Uniform::new(lo as f32, up as f32).map_err(|e| err(&e))?;
                (0..n).map(|_| u.sample(&mut rng)).collect()
            }
            Init::Randn { mean, stdev } => {
                let d = Normal::new(mean as f32, stdev as f32).map_err(|e| err(&e))?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            }
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = (non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt()) as f32;
                match dist {
                    NormalOrUniform::Normal => {
                        let d = Normal::new(0.0, std).map_err(|e| err(&e))?;
                        (0..n).map(|_| d.sample(&mut rng)).collect()
                    }
                    NormalOrUniform::Uniform => {
                        let b = 3f32.sqrt() * std;
                        (0..n).map(|_| rng.random_range(-b..=b)).collect()
                    }
                }
            }
        };
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(t) = self.tensors.lock().expect("init lock").get(name) {
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = self.draw(&s, name, init)?;
        self.tensors
            .lock()
            .expect("init lock")
            .insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.tensors.lock().expect("init lock").get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no initialiser for unshaped tensor {name}"),
        }
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.lock().expect("init lock").contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_different_seed_different() {
        let draw = |seed| {
            let s = SeededInit::new(seed);
            candle_nn::conv2d(3, 8, 3, Default::default(), s.var_builder().pp("c")).unwrap();
            s.tensors()["c.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        // He-normal: std = sqrt(2 / fan_in) = sqrt(2 / 27).
        let w = draw(3);
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        assert!((var - 2.0 / 27.0).abs() < 0.03, "{var}");
    }
}
