//! One CPU training step (forward, backward and AdamW, batch 128) of the Fashion-MNIST WAE, with
//! wae-edge's training ops (`wae_edge::model::train_ops`) against candle's own, alternating in
//! rounds so the machine's drift hits both.
//!     cargo bench --bench train_step
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use wae_edge::config::preset;
use wae_edge::model::{train_ops, WaeNet};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (batch, rounds, steps) = (128, 4, 3);
    for backbone in [
        vec![vec![64, 64], vec![128, 128], vec![256]],
        vec![vec![64, 64, 64], vec![128, 128], vec![256, 256]],
    ] {
        let mut cfg = preset("wae-fashion").expect("preset");
        cfg.arch.backbone = backbone;
        cfg.arch.batch_norm = true;
        let vm = VarMap::new();
        let net = WaeNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW::default())?;
        let xs = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &dev)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
        let ys = Tensor::new(labels, &dev)?;
        let mut step = || -> candle_core::Result<()> {
            let logits = net.forward_t(&xs, true)?;
            opt.backward_step(&candle_nn::loss::cross_entropy(&logits, &ys)?)
        };
        let mut times = [vec![], vec![]];
        for round in 0..=rounds {
            for (i, on) in [false, true].into_iter().enumerate() {
                train_ops::set_enabled(on);
                for _ in 0..steps {
                    let t = Instant::now();
                    step()?;
                    // Round 0 warms up.
                    if round > 0 {
                        times[i].push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (candle, ours) = (median(&mut times[0]), median(&mut times[1]));
        println!(
            "backbone {:?}: step median {candle:.0} ms with candle's ops, {ours:.0} ms with wae-edge's ({:.2}x), batch {batch}",
            cfg.arch.backbone,
            candle / ours
        );
    }
    Ok(())
}
