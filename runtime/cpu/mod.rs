//! wae-edge's own CPU inference path for the inference network. Candle's CPU conv2d re-lays out
//! the input (NCHW -> NHWC) and re-flattens the kernel on every call, which dominates small maps;
//! here activations stay NHWC end to end and kernels are laid out once at load for the kernel
//! chosen per conv (`conv.rs`): Winograd F(4x4,3x3) (F(2x2,3x3) on maps under 8) for stride-1
//! convs with 16+ input channels (`winograd.rs`), a direct register-blocked SIMD kernel for few
//! channels (`direct.rs`), and otherwise a tiled im2col + one GEMM per tile (`im2col.rs`).
//! Bias and ReLU are fused into each kernel's output pass, buffers come from a pool kept between
//! frames (`buffers.rs`), and the first fully connected layer of each head has its columns
//! permuted at load so the NHWC flatten feeds it directly (`dense.rs`). This file assembles the
//! network from a model file and runs a frame through it. Results match the candle path within
//! f32 rounding (tests compare).

use std::sync::PoisonError;
use std::time::{Duration, Instant};

mod buffers;
mod conv;
mod dense;
mod direct;
mod im2col;
mod parallel;
mod pooling;
mod profile;
mod winograd;

use crate::config::{ArchKind, ModelConfig};
use crate::model::StageTimes;
use crate::weights::{ModelFile, WeightsError};
use buffers::{Buf, Buffers, Map};
use conv::{out_side, Conv3, Packed};
use dense::{mlp, Dense};
pub(crate) use im2col::{gemm_into, View};
use parallel::{band_rows, for_each_chunk, SendPtr, COPY_SPLIT_MIN};
use pooling::{max_pool, pooled, split_2x2};
use profile::{conv_step, Recorder};
pub use profile::{time_conv3, LayerTime};

enum Split {
    Identity,
    Average,
    Haar,
    Learned {
        convs: Vec<Conv3>,
        /// `encoder.low` and `encoder.high` as one conv: they read the same map, so one pass
        /// makes both (I_L in the first half of the channels, I_H in the second).
        split: Conv3,
    },
}

/// The inference network compiled for the CPU.
pub struct CpuNet {
    config: ModelConfig,
    split: Split,
    backbone: Vec<Vec<Conv3>>,
    branch: Option<Vec<Vec<Conv3>>>,
    head_low: Vec<Dense>,
    head_fuse: Option<Vec<Dense>>,
    bufs: Buffers,
}

/// The conv stages under `at`, for input maps whose smaller side is `side` (each stage ends in a
/// 2x2 pool, ceil mode if `ceil`).
fn stack(
    file: &ModelFile,
    at: &str,
    stages: &[Vec<usize>],
    side: usize,
    ceil: bool,
) -> Result<Vec<Vec<Conv3>>, WeightsError> {
    let mut side = side;
    stages
        .iter()
        .enumerate()
        .map(|(s, st)| {
            let convs = (0..st.len())
                .map(|i| Conv3::load(file, &format!("{at}.s{s}.c{i}"), 1, true, side))
                .collect();
            side = pooled(side, ceil);
            convs
        })
        .collect()
}

fn head(
    file: &ModelFile,
    at: &str,
    hidden: usize,
    c: usize,
    hw: usize,
) -> Result<Vec<Dense>, WeightsError> {
    let mut layers = (0..=hidden)
        .map(|i| Dense::load(file, &format!("{at}.fc{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    layers[0].permute_from_nchw(c, hw);
    Ok(layers)
}

/// Applies `f` to `x`, giving `x`'s buffer back to the pool.
fn step(x: Map, bufs: &Buffers, f: impl FnOnce(&Map) -> Map) -> Map {
    let y = f(&x);
    bufs.give(x.data);
    y
}

fn run_stack(
    stages: &[Vec<Conv3>],
    x: Map,
    ceil: bool,
    bufs: &Buffers,
    at: &str,
    rec: Option<&Recorder>,
) -> Map {
    let mut x = x;
    for (s, stage) in stages.iter().enumerate() {
        for (i, conv) in stage.iter().enumerate() {
            x = conv_step(x, conv, bufs, rec, || format!("{at}.s{s}.c{i}"));
        }
        x = step(x, bufs, |x| max_pool(x, ceil, bufs));
    }
    x
}

impl CpuNet {
    /// Compiles a validated model file: reads every inference weight once, packs, permutes.
    pub fn from_file(file: &ModelFile) -> Result<CpuNet, WeightsError> {
        let c = file.config().clone();
        let a = &c.arch;
        let side = c.input.height.min(c.input.width);
        let split = match a.kind {
            ArchKind::Plain => Split::Identity,
            ArchKind::NaiveHalf => Split::Average,
            ArchKind::Haar => Split::Haar,
            ArchKind::Wae => Split::Learned {
                convs: (0..a.encoder.len())
                    .map(|i| Conv3::load(file, &format!("encoder.conv{i}"), 1, true, side))
                    .collect::<Result<_, _>>()?,
                split: Packed::load(file, "encoder.low")?
                    .concat(Packed::load(file, "encoder.high")?)
                    .build(2, false, side),
            },
        };
        let (fh, fw) = c.feature_size();
        let c_low = *a
            .backbone
            .last()
            .and_then(|s| s.last())
            .expect("validated backbone");
        // The backbone and the branch see the full frame (plain) or a half-size split of it.
        let side = match a.kind {
            ArchKind::Plain => side,
            ArchKind::Wae => out_side(side, 2),
            _ => side / 2,
        };
        let backbone = stack(file, "backbone", &a.backbone, side, a.pool_ceil)?;
        let head_low = head(file, "head_low", a.head_low.len(), c_low, fh * fw)?;
        let (branch, head_fuse) = if a.kind.has_branch() {
            let stages = c.branch_stages();
            let c_high = *stages
                .last()
                .and_then(|s| s.last())
                .expect("validated backbone");
            (
                Some(stack(file, "branch", &stages, side, a.pool_ceil)?),
                Some(head(
                    file,
                    "head_fuse",
                    a.head_fuse.len(),
                    c_low + c_high,
                    fh * fw,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(CpuNet {
            config: c,
            split,
            backbone,
            branch,
            head_low,
            head_fuse,
            bufs: Buffers::default(),
        })
    }

    /// The config compiled from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `[n, classes]` (row-major) of a normalised NCHW batch, with stage times summed
    /// over the batch.
    pub fn forward(&self, nchw: &[f32], n: usize) -> (Vec<f32>, StageTimes) {
        // The whole pass runs on a pool thread: its joins and parallel loops then hand work to
        // the other worker through the pool's deque, instead of each one waking the pool from
        // outside and blocking this thread (measured: a quarter of a small model's time went to
        // those wake-ups).
        rayon::scope(|_| self.forward_on_pool(nchw, n, None))
    }

    /// Every conv's time in one pass of the first image of a normalised NCHW batch, in network
    /// order (encoder, I_L backbone, I_H branch). The branch runs beside the backbone as in
    /// [`CpuNet::forward`], so the layers it overlaps share the cores with it.
    pub fn profile(&self, nchw: &[f32]) -> Vec<LayerTime> {
        let i = self.config.input;
        let rec = Recorder::default();
        rayon::scope(|_| {
            self.forward_on_pool(&nchw[..i.channels * i.height * i.width], 1, Some(&rec))
        });
        let mut layers = rec.into_inner().unwrap_or_else(PoisonError::into_inner);
        let rank = |n: &str| {
            ["encoder", "backbone", "branch"]
                .iter()
                .position(|p| n.starts_with(p))
        };
        layers.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
        layers
    }

    fn forward_on_pool(
        &self,
        nchw: &[f32],
        n: usize,
        rec: Option<&Recorder>,
    ) -> (Vec<f32>, StageTimes) {
        let i = self.config.input;
        let per = i.channels * i.height * i.width;
        assert_eq!(nchw.len(), n * per, "input is not [n, C, H, W]");
        let mut times = StageTimes::default();
        let mut logits = Vec::with_capacity(n * self.config.classes);
        let bufs = &self.bufs;
        for img in nchw.chunks_exact(per) {
            let t = Instant::now();
            let plane = i.height * i.width;
            let mut x = bufs.map(i.height, i.width, i.channels);
            // NCHW -> NHWC in bands of rows on all cores (measured, VGG16 224x224x3, four
            // alternating pairs: 0.106-0.163 -> 0.084-0.110 ms).
            let c = i.channels;
            let rows_per = band_rows(i.height, per >= COPY_SPLIT_MIN, 2);
            for_each_chunk(&mut x.data, rows_per * i.width * c, |(b, band)| {
                let p0 = b * rows_per * i.width;
                for (p, px) in band.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = img[ch * plane + p0 + p];
                    }
                }
            });
            let (low, high) = match &self.split {
                Split::Identity => (x, None),
                Split::Average | Split::Haar => {
                    let halves = split_2x2(&x, matches!(self.split, Split::Haar), bufs);
                    bufs.give(x.data);
                    halves
                }
                Split::Learned { convs, split } => {
                    for (i, conv) in convs.iter().enumerate() {
                        x = conv_step(x, conv, bufs, rec, || format!("encoder.conv{i}"));
                    }
                    let both = conv_step(x, split, bufs, rec, || "encoder.split".into());
                    let (low, high) = both.split_channels(split.cout / 2, bufs);
                    bufs.give(both.data);
                    (low, Some(high))
                }
            };
            let t1 = Instant::now();
            let ceil = self.config.arch.pool_ceil;
            let timed = |stages: &[Vec<Conv3>], x: Map, at: &str| {
                let t = Instant::now();
                let y = run_stack(stages, x, ceil, bufs, at, rec);
                (y, t.elapsed())
            };
            // The I_H branch runs beside the I_L backbone (a second core is otherwise idle during
            // the backbone's small convs); their stage times overlap.
            let ((f_low, t_low), high) = match (&self.branch, high) {
                (Some(b), Some(h)) => {
                    let (l, h) = rayon::join(
                        || timed(&self.backbone, low, "backbone"),
                        || timed(b, h, "branch"),
                    );
                    (l, Some(h))
                }
                _ => (timed(&self.backbone, low, "backbone"), None),
            };
            let (f_high, t_high) = high.map_or((None, Duration::ZERO), |(f, t)| (Some(f), t));
            let t3 = Instant::now();
            // The two heads read 2-3 MB of weights each: on two cores they share the memory
            // bandwidth rather than queue for it.
            let fused = |fuse: &[Dense], fh: &Map| {
                let mut cat = Vec::with_capacity(f_low.data.len() + fh.data.len());
                for (l, h) in f_low
                    .data
                    .chunks_exact(f_low.c)
                    .zip(fh.data.chunks_exact(fh.c))
                {
                    cat.extend_from_slice(l);
                    cat.extend_from_slice(h);
                }
                mlp(fuse, &cat)
            };
            let y = match (&self.head_fuse, &f_high) {
                (Some(fuse), Some(fh)) => {
                    let (mut y, y2) =
                        rayon::join(|| mlp(&self.head_low, &f_low.data), || fused(fuse, fh));
                    y.iter_mut().zip(y2).for_each(|(a, b)| *a += b);
                    y
                }
                _ => mlp(&self.head_low, &f_low.data),
            };
            let t4 = Instant::now();
            bufs.give(f_low.data);
            if let Some(fh) = f_high {
                bufs.give(fh.data);
            }
            times.encoder += t1 - t;
            times.backbone += t_low;
            times.branch += t_high;
            times.heads += t4 - t3;
            logits.extend(y);
        }
        (logits, times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use buffers::tests::poisoned;
    use candle_core::{Device, Tensor};

    /// Every kind and the presets' layer shapes: the CPU path equals the candle path.
    #[test]
    fn matches_the_candle_path() {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind, wide_head, side) in [
            ("wae-fashion", ArchKind::Wae, false, 28),
            ("wae-fashion", ArchKind::Wae, true, 28),
            ("wae-fashion", ArchKind::Haar, false, 28),
            ("plain-fashion", ArchKind::Plain, false, 28),
            ("plain-fashion", ArchKind::NaiveHalf, false, 28),
            // A frame big enough for the input copy and the pools to split into bands of rows.
            ("wae-fashion", ArchKind::Wae, false, 260),
        ] {
            let mut cfg = preset(name).unwrap();
            cfg.arch.kind = kind;
            if side != 28 {
                cfg.input.height = side;
                cfg.input.width = side;
                cfg.arch.backbone = vec![vec![8], vec![8], vec![8], vec![8], vec![8]];
            }
            if wide_head {
                // Over DENSE_F16_MIN weights: the f16 GEMV, after the NCHW -> NHWC permutation.
                cfg.arch.head_low = vec![1100];
            }
            if kind == ArchKind::Haar {
                cfg.arch.encoder.clear();
            }
            if !kind.has_branch() {
                cfg.arch.head_fuse.clear();
            }
            // An odd feature map exercises ceil pooling; floor is checked with the plain net.
            cfg.arch.pool_ceil = kind != ArchKind::Plain;
            let (cfg, tensors) = crate::weights::random_model(&cfg, 11).unwrap();
            let p = dir
                .path()
                .join(format!("{kind:?}-{wide_head}-{side}.safetensors"));
            crate::weights::save(&p, &cfg, &tensors).unwrap();
            let file = ModelFile::open(&p).unwrap();
            let mut cpu = CpuNet::from_file(&file).unwrap();
            cpu.bufs = poisoned();
            let net = file.build(&Device::Cpu).unwrap();
            let x = || Tensor::randn(0f32, 1., (3, 1, side, side), &Device::Cpu).unwrap();
            let run = |x: &Tensor| {
                cpu.forward(&x.flatten_all().unwrap().to_vec1().unwrap(), 3)
                    .0
            };
            // The second batch runs on the buffers the first left behind.
            for x in [x(), x()] {
                let want = net.forward_t(&x, false).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = run(&x);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let diff = want
                    .iter()
                    .zip(&got)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "{kind:?}: max diff {diff} (scale {scale})"
                );
            }
            // Once warm, a frame allocates nothing: the pool holds the same buffers after it.
            // (One thread, so that the order of takes, and so the pool, is deterministic.)
            let held = || {
                let mut caps: Vec<usize> = cpu
                    .bufs
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|b| b.v.capacity())
                    .collect();
                caps.sort();
                caps
            };
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            one.install(|| run(&x()));
            let warm = held();
            one.install(|| run(&x()));
            assert_eq!(held(), warm, "{kind:?}: the pool grew on a warm frame");
        }
    }
}
