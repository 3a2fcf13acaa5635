//! wae-edge's own CPU inference path for the inference network. Candle's CPU conv2d re-lays out
//! the input (NCHW -> NHWC) and re-flattens the kernel on every call, which dominates small maps;
//! here activations stay NHWC end to end, kernels are packed once at load into `[9 * C_in, C_out]`,
//! each conv is a tiled im2col + one GEMM per tile through the `gemm` crate (candle's own GEMM,
//! near the machine's FMA peak), bias and ReLU are fused into the GEMM's output pass, and the
//! first fully connected layer of each head has its columns permuted at load so the NHWC
//! flatten feeds it directly. Results match the candle path within f32 rounding (tests compare).

use std::time::Instant;

use rayon::prelude::*;

use crate::config::{ArchKind, ModelConfig};
use crate::model::StageTimes;
use crate::weights::{ModelFile, WeightsError};

/// Output pixels per im2col tile: keeps the patch buffer within L2 for typical widths.
const TILE_BYTES: usize = 256 * 1024;

/// A 3x3 conv (pad 1) with packed weights.
struct Conv3 {
    cin: usize,
    cout: usize,
    stride: usize,
    relu: bool,
    /// `[9 * cin, cout]`, row `(ky * 3 + kx) * cin + ci`.
    w: Vec<f32>,
    b: Vec<f32>,
}

/// A fully connected layer, weights `[out, in]` as stored.
struct Dense {
    n_in: usize,
    n_out: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// An activation map, NHWC for one image.
#[derive(Clone, Debug)]
struct Map {
    h: usize,
    w: usize,
    c: usize,
    data: Vec<f32>,
}

fn out_side(n: usize, stride: usize) -> usize {
    (n + 2 - 3) / stride + 1
}

impl Conv3 {
    fn load(file: &ModelFile, at: &str, stride: usize, relu: bool) -> Result<Conv3, WeightsError> {
        let (shape, w) = file.tensor_f32(&format!("{at}.weight"))?;
        let (_, b) = file.tensor_f32(&format!("{at}.bias"))?;
        let (cout, cin) = (shape[0], shape[1]);
        let mut packed = vec![0f32; 9 * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for k in 0..9 {
                    packed[(k * cin + ci) * cout + co] = w[(co * cin + ci) * 9 + k];
                }
            }
        }
        Ok(Conv3 {
            cin,
            cout,
            stride,
            relu,
            w: packed,
            b,
        })
    }

    fn forward(&self, x: &Map) -> Map {
        let (oh, ow) = (out_side(x.h, self.stride), out_side(x.w, self.stride));
        let k = 9 * self.cin;
        let pixels = oh * ow;
        let mut tile = (TILE_BYTES / (4 * k)).clamp(16, pixels.max(16));
        // A map that fits one tile but is worth splitting: one tile per core.
        let threads = rayon::current_num_threads().max(1);
        if pixels <= tile * threads && pixels * k * self.cout > (1 << 20) {
            tile = pixels.div_ceil(threads).max(16);
        }
        let single = pixels <= tile;
        let mut out = vec![0f32; pixels * self.cout];
        let run_tile = |(t, dst): (usize, &mut [f32])| {
            let p0 = t * tile;
            let rows = dst.len() / self.cout;
            let mut patch = vec![0f32; rows * k];
            for r in 0..rows {
                let (oy, ox) = ((p0 + r) / ow, (p0 + r) % ow);
                let row = &mut patch[r * k..(r + 1) * k];
                for ky in 0..3 {
                    let iy = (oy * self.stride + ky) as isize - 1;
                    for kx in 0..3 {
                        let ix = (ox * self.stride + kx) as isize - 1;
                        let seg = &mut row[(ky * 3 + kx) * self.cin..(ky * 3 + kx + 1) * self.cin];
                        if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                            seg.fill(0.0);
                        } else {
                            let src = (iy as usize * x.w + ix as usize) * self.cin;
                            seg.copy_from_slice(&x.data[src..src + self.cin]);
                        }
                    }
                }
            }
            // SAFETY: the pointers cover `rows x k`, `k x cout` and `rows x cout` row-major
            // buffers that live for the call; dst does not alias the inputs.
            unsafe {
                gemm::gemm(
                    rows,
                    self.cout,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    self.cout as isize,
                    false,
                    patch.as_ptr(),
                    1,
                    k as isize,
                    self.w.as_ptr(),
                    1,
                    self.cout as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for px in dst.chunks_exact_mut(self.cout) {
                for (v, b) in px.iter_mut().zip(&self.b) {
                    *v += b;
                    if self.relu && *v < 0.0 {
                        *v = 0.0;
                    }
                }
            }
        };
        // Tiles in parallel when there are several; tiny maps stay on one thread.
        if !single {
            out.par_chunks_mut(tile * self.cout)
                .enumerate()
                .for_each(run_tile);
        } else {
            run_tile((0, &mut out[..]));
        }
        Map {
            h: oh,
            w: ow,
            c: self.cout,
            data: out,
        }
    }
}

/// 2x2/2 max-pool; `ceil` keeps a clipped window at odd edges (Caffe/ONNX ceil mode).
fn max_pool(x: &Map, ceil: bool) -> Map {
    let side = |n: usize| if ceil { n.div_ceil(2) } else { n / 2 };
    let (oh, ow) = (side(x.h), side(x.w));
    let mut out = vec![f32::NEG_INFINITY; oh * ow * x.c];
    for oy in 0..oh {
        for ox in 0..ow {
            let dst = &mut out[(oy * ow + ox) * x.c..(oy * ow + ox + 1) * x.c];
            for iy in (2 * oy)..(2 * oy + 2).min(x.h) {
                for ix in (2 * ox)..(2 * ox + 2).min(x.w) {
                    let src = &x.data[(iy * x.w + ix) * x.c..(iy * x.w + ix + 1) * x.c];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = d.max(*s);
                    }
                }
            }
        }
    }
    Map {
        h: oh,
        w: ow,
        c: x.c,
        data: out,
    }
}

/// 2x2 analysis of an even-sided map: average (naive half) or the four Haar bands.
fn split_2x2(x: &Map, haar: bool) -> (Map, Option<Map>) {
    let (oh, ow, c) = (x.h / 2, x.w / 2, x.c);
    let mut low = vec![0f32; oh * ow * c];
    let mut high = if haar {
        vec![0f32; oh * ow * 3 * c]
    } else {
        vec![]
    };
    for oy in 0..oh {
        for ox in 0..ow {
            let at = |dy: usize, dx: usize, ch: usize| {
                x.data[((2 * oy + dy) * x.w + 2 * ox + dx) * c + ch]
            };
            for ch in 0..c {
                let (a, b, cc, d) = (at(0, 0, ch), at(0, 1, ch), at(1, 0, ch), at(1, 1, ch));
                let p = oy * ow + ox;
                if haar {
                    low[p * c + ch] = (a + b + cc + d) * 0.5;
                    // Channels band-major, as the candle path's Haar kernel orders them.
                    high[p * 3 * c + ch] = (a - b + cc - d) * 0.5;
                    high[p * 3 * c + c + ch] = (a + b - cc - d) * 0.5;
                    high[p * 3 * c + 2 * c + ch] = (a - b - cc + d) * 0.5;
                } else {
                    low[p * c + ch] = (a + b + cc + d) * 0.25;
                }
            }
        }
    }
    let low = Map {
        h: oh,
        w: ow,
        c,
        data: low,
    };
    let high = haar.then(|| Map {
        h: oh,
        w: ow,
        c: 3 * c,
        data: high,
    });
    (low, high)
}

impl Dense {
    fn load(file: &ModelFile, at: &str) -> Result<Dense, WeightsError> {
        let (shape, w) = file.tensor_f32(&format!("{at}.weight"))?;
        let (_, b) = file.tensor_f32(&format!("{at}.bias"))?;
        Ok(Dense {
            n_out: shape[0],
            n_in: shape[1],
            w,
            b,
        })
    }

    /// Reorders input columns from candle's NCHW flatten of `[c, h, w]` to the NHWC flatten.
    fn permute_from_nchw(&mut self, c: usize, hw: usize) {
        let mut w = vec![0f32; self.w.len()];
        for o in 0..self.n_out {
            for ch in 0..c {
                for p in 0..hw {
                    w[o * self.n_in + p * c + ch] = self.w[o * self.n_in + ch * hw + p];
                }
            }
        }
        self.w = w;
    }

    fn forward(&self, x: &[f32], relu: bool) -> Vec<f32> {
        let mut y = self.b.clone();
        // y[1, out] += x[1, in] . W^T, reading W [out, in] in place through strides.
        // SAFETY: x has n_in values, W n_out x n_in, y n_out; y does not alias them.
        unsafe {
            gemm::gemm(
                1,
                self.n_out,
                self.n_in,
                y.as_mut_ptr(),
                1,
                self.n_out as isize,
                true,
                x.as_ptr(),
                1,
                self.n_in as isize,
                self.w.as_ptr(),
                self.n_in as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        y
    }
}

fn mlp(layers: &[Dense], x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    for (i, l) in layers.iter().enumerate() {
        x = l.forward(&x, i + 1 < layers.len());
    }
    x
}

enum Split {
    Identity,
    Average,
    Haar,
    Learned {
        convs: Vec<Conv3>,
        low: Conv3,
        high: Conv3,
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
}

fn stack(
    file: &ModelFile,
    at: &str,
    stages: &[Vec<usize>],
) -> Result<Vec<Vec<Conv3>>, WeightsError> {
    stages
        .iter()
        .enumerate()
        .map(|(s, st)| {
            (0..st.len())
                .map(|i| Conv3::load(file, &format!("{at}.s{s}.c{i}"), 1, true))
                .collect()
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

fn run_stack(stages: &[Vec<Conv3>], x: Map, ceil: bool) -> Map {
    let mut x = x;
    for stage in stages {
        for conv in stage {
            x = conv.forward(&x);
        }
        x = max_pool(&x, ceil);
    }
    x
}

impl CpuNet {
    /// Compiles a validated model file: reads every inference weight once, packs, permutes.
    pub fn from_file(file: &ModelFile) -> Result<CpuNet, WeightsError> {
        let c = file.config().clone();
        let a = &c.arch;
        let split = match a.kind {
            ArchKind::Plain => Split::Identity,
            ArchKind::NaiveHalf => Split::Average,
            ArchKind::Haar => Split::Haar,
            ArchKind::Wae => Split::Learned {
                convs: (0..a.encoder.len())
                    .map(|i| Conv3::load(file, &format!("encoder.conv{i}"), 1, true))
                    .collect::<Result<_, _>>()?,
                low: Conv3::load(file, "encoder.low", 2, false)?,
                high: Conv3::load(file, "encoder.high", 2, false)?,
            },
        };
        let (fh, fw) = c.feature_size();
        let c_low = *a
            .backbone
            .last()
            .and_then(|s| s.last())
            .expect("validated backbone");
        let backbone = stack(file, "backbone", &a.backbone)?;
        let head_low = head(file, "head_low", a.head_low.len(), c_low, fh * fw)?;
        let (branch, head_fuse) = if a.kind.has_branch() {
            let stages = c.branch_stages();
            let c_high = *stages
                .last()
                .and_then(|s| s.last())
                .expect("validated backbone");
            (
                Some(stack(file, "branch", &stages)?),
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
        })
    }

    /// The config compiled from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `[n, classes]` (row-major) of a normalised NCHW batch, with stage times summed
    /// over the batch.
    pub fn forward(&self, nchw: &[f32], n: usize) -> (Vec<f32>, StageTimes) {
        let i = self.config.input;
        let per = i.channels * i.height * i.width;
        assert_eq!(nchw.len(), n * per, "input is not [n, C, H, W]");
        let mut times = StageTimes::default();
        let mut logits = Vec::with_capacity(n * self.config.classes);
        for img in nchw.chunks_exact(per) {
            let t = Instant::now();
            let plane = i.height * i.width;
            let mut data = vec![0f32; per];
            for ch in 0..i.channels {
                for p in 0..plane {
                    data[p * i.channels + ch] = img[ch * plane + p];
                }
            }
            let x = Map {
                h: i.height,
                w: i.width,
                c: i.channels,
                data,
            };
            let (low, high) = match &self.split {
                Split::Identity => (x, None),
                Split::Average => split_2x2(&x, false),
                Split::Haar => split_2x2(&x, true),
                Split::Learned { convs, low, high } => {
                    let mut h = x;
                    for conv in convs {
                        h = conv.forward(&h);
                    }
                    (low.forward(&h), Some(high.forward(&h)))
                }
            };
            let t1 = Instant::now();
            let f_low = run_stack(&self.backbone, low, self.config.arch.pool_ceil);
            let t2 = Instant::now();
            let f_high = match (&self.branch, high) {
                (Some(b), Some(h)) => Some(run_stack(b, h, self.config.arch.pool_ceil)),
                _ => None,
            };
            let t3 = Instant::now();
            let mut y = mlp(&self.head_low, &f_low.data);
            if let (Some(fuse), Some(fh)) = (&self.head_fuse, &f_high) {
                let mut cat = Vec::with_capacity(f_low.data.len() + fh.data.len());
                for (l, h) in f_low
                    .data
                    .chunks_exact(f_low.c)
                    .zip(fh.data.chunks_exact(fh.c))
                {
                    cat.extend_from_slice(l);
                    cat.extend_from_slice(h);
                }
                for (a, b) in y.iter_mut().zip(mlp(fuse, &cat)) {
                    *a += b;
                }
            }
            let t4 = Instant::now();
            times.encoder += t1 - t;
            times.backbone += t2 - t1;
            times.branch += t3 - t2;
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
    use candle_core::{Device, Tensor};

    /// Every kind and the presets' layer shapes: the CPU path equals the candle path.
    #[test]
    fn matches_the_candle_path() {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind) in [
            ("wae-fashion", ArchKind::Wae),
            ("wae-fashion", ArchKind::Haar),
            ("plain-fashion", ArchKind::Plain),
            ("plain-fashion", ArchKind::NaiveHalf),
        ] {
            let mut cfg = preset(name).unwrap();
            cfg.arch.kind = kind;
            if kind == ArchKind::Haar {
                cfg.arch.encoder.clear();
            }
            if !kind.has_branch() {
                cfg.arch.head_fuse.clear();
            }
            // An odd feature map exercises ceil pooling; floor is checked with the plain net.
            cfg.arch.pool_ceil = kind != ArchKind::Plain;
            let (cfg, tensors) = crate::weights::random_model(&cfg, 11).unwrap();
            let p = dir.path().join(format!("{kind:?}.safetensors"));
            crate::weights::save(&p, &cfg, &tensors).unwrap();
            let file = ModelFile::open(&p).unwrap();
            let cpu = CpuNet::from_file(&file).unwrap();
            let net = file.build(&Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
            let want = net
                .forward_t(&x, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (got, _) = cpu.forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 3);
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
    }

    #[test]
    fn conv_by_hand_with_stride_and_padding() {
        // One input channel 3x3 of ones, a kernel of ones, stride 2: corners see 4 ones.
        let conv = Conv3 {
            cin: 1,
            cout: 1,
            stride: 2,
            relu: false,
            w: vec![1.0; 9],
            b: vec![0.5],
        };
        let y = conv.forward(&Map {
            h: 3,
            w: 3,
            c: 1,
            data: vec![1.0; 9],
        });
        assert_eq!((y.h, y.w), (2, 2));
        assert_eq!(y.data, vec![4.5, 4.5, 4.5, 4.5]);
    }
}
