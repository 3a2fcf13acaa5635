//! The WAE network (encoder -> I_L backbone + I_H branch -> summed heads), its plain, naive-half
//! and Haar variants, and the training-only decoder. Written like candle-transformers'
//! `resnet.rs`: small builders that take a `VarBuilder` path and compose with `apply`.

pub mod macs;
pub mod train_ops;

pub use train_ops::{batch_norm_train, conv3x3_train};

use std::time::{Duration, Instant};

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, FuncT, VarBuilder};

use crate::config::{ArchKind, ModelConfig};

/// Batch-norm epsilon used in training and when folding at export.
pub const BN_EPS: f64 = 1e-5;

/// A 3x3 conv, padding 1, with optional batch norm and ReLU. Tensors live at `vb`
/// (`weight`, `bias`) and `vb.bn` (`weight`, `bias`, `running_mean`, `running_var`).
pub struct Conv3x3 {
    conv: candle_nn::Conv2d,
    bn: Option<candle_nn::BatchNorm>,
    c_out: usize,
    stride: usize,
    relu: bool,
}

impl Conv3x3 {
    /// The kernel `[c_out, c_in, 3, 3]`.
    pub fn weight(&self) -> &Tensor {
        self.conv.weight()
    }

    /// The bias `[c_out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.conv.bias()
    }

    /// Whether a batch norm follows (exported models have it folded in).
    pub fn has_batch_norm(&self) -> bool {
        self.bn.is_some()
    }

    /// 1 or 2.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Whether ReLU follows.
    pub fn relu(&self) -> bool {
        self.relu
    }
}

impl ModuleT for Conv3x3 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut ys = if train {
            let ys = conv3x3_train(xs, self.conv.weight(), self.stride)?;
            match self.conv.bias() {
                Some(bias) => ys.broadcast_add(&bias.reshape((1, self.c_out, 1, 1))?)?,
                None => ys,
            }
        } else {
            xs.apply(&self.conv)?
        };
        match &self.bn {
            Some(bn) if train => return batch_norm_train(&ys, bn, self.relu),
            Some(bn) => ys = ys.apply_t(bn, false)?,
            None => {}
        }
        if self.relu {
            ys.relu()
        } else {
            Ok(ys)
        }
    }
}

/// Builds a [`Conv3x3`] of `c_in -> c_out` channels.
pub fn conv3x3(
    c_in: usize,
    c_out: usize,
    stride: usize,
    bn: bool,
    relu: bool,
    vb: VarBuilder,
) -> Result<Conv3x3> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    let bn = if bn {
        Some(candle_nn::batch_norm(c_out, BN_EPS, vb.pp("bn"))?)
    } else {
        None
    };
    let conv = candle_nn::conv2d(c_in, c_out, 3, cfg, vb)?;
    Ok(Conv3x3 {
        conv,
        bn,
        c_out,
        stride,
        relu,
    })
}

/// 2x2/2 max-pool; `ceil` rounds odd sizes up as Caffe does (edge replication makes the extra
/// window a max over real pixels only).
pub fn max_pool(xs: &Tensor, ceil: bool) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let mut xs = xs.clone();
    if ceil && h % 2 == 1 {
        xs = xs.pad_with_same(2, 0, 1)?;
    }
    if ceil && w % 2 == 1 {
        xs = xs.pad_with_same(3, 0, 1)?;
    }
    xs.max_pool2d(2)
}

/// VGG-style stack: per stage, 3x3 convs with ReLU then a 2x2 max-pool.
pub struct VggStack {
    stages: Vec<Vec<Conv3x3>>,
    pool_ceil: bool,
}

impl VggStack {
    /// The convs of each stage (a 2x2 max-pool follows each stage).
    pub fn stages(&self) -> &[Vec<Conv3x3>] {
        &self.stages
    }

    /// The stack with `conv` running each conv (another engine's kernels, a tracer): the one
    /// loop over stages and pools.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        mut conv: impl FnMut(&Conv3x3, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for stage in &self.stages {
            for c in stage {
                xs = conv(c, &xs)?;
            }
            xs = max_pool(&xs, self.pool_ceil)?;
        }
        Ok(xs)
    }

    /// Output of every conv (after ReLU, before pooling), in order: for layer analysis (EBCLE).
    pub fn trace(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        self.forward_with(xs, |c, x| {
            let y = x.apply_t(c, false)?;
            out.push(y.clone());
            Ok(y)
        })?;
        Ok(out)
    }
}

impl ModuleT for VggStack {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(xs, |c, x| x.apply_t(c, train))
    }
}

/// Builds a [`VggStack`]. Tensors at `vb.s{stage}.c{i}`.
pub fn vgg_stack(
    c_in: usize,
    stages: &[Vec<usize>],
    pool_ceil: bool,
    bn: bool,
    vb: VarBuilder,
) -> Result<VggStack> {
    let mut convs = Vec::new();
    let mut c = c_in;
    for (s, widths) in stages.iter().enumerate() {
        let mut stage = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            stage.push(conv3x3(c, w, 1, bn, true, vb.pp(format!("s{s}.c{i}")))?);
            c = w;
        }
        convs.push(stage);
    }
    Ok(VggStack {
        stages: convs,
        pool_ceil,
    })
}

/// Fully connected head: flattened features -> hidden layers (ReLU, dropout 0.5 in training) ->
/// logits. Tensors at `vb.fc{i}`.
pub fn mlp_head(
    c_in: usize,
    hidden: &[usize],
    classes: usize,
    vb: VarBuilder,
) -> Result<FuncT<'static>> {
    let mut layers = Vec::new();
    let mut c = c_in;
    for (i, &h) in hidden.iter().chain(std::iter::once(&classes)).enumerate() {
        layers.push(candle_nn::linear(c, h, vb.pp(format!("fc{i}")))?);
        c = h;
    }
    let dropout = candle_nn::Dropout::new(0.5);
    Ok(FuncT::new(move |xs, train| {
        let mut xs = xs.flatten_from(1)?;
        for (i, layer) in layers.iter().enumerate() {
            xs = xs.apply(layer)?;
            if i + 1 < layers.len() {
                xs = xs.relu()?.apply_t(&dropout, train)?;
            }
        }
        Ok(xs)
    }))
}

/// How the input becomes I_L (and I_H).
enum Split {
    /// Plain: the backbone sees the input as is.
    Identity,
    /// Naive half: 2x2 average.
    Average,
    /// Fixed orthonormal Haar analysis as a 2x2/2 conv: first C outputs are LL, then 3C details.
    Haar(Tensor),
    /// The learned encoder: full-resolution convs, then two 3x3/2 convs for I_L and I_H.
    Learned {
        convs: Vec<Conv3x3>,
        low: Box<Conv3x3>,
        high: Box<Conv3x3>,
    },
}

/// The orthonormal Haar analysis kernel `[4C, C, 2, 2]`, flattened: output channel
/// `band * C + c` applies band `band` (LL, LH, HL, HH) to input channel `c`.
pub fn haar_kernel_values(c: usize) -> Vec<f32> {
    let bands: [[f32; 4]; 4] = [
        [1., 1., 1., 1.],
        [1., -1., 1., -1.],
        [1., 1., -1., -1.],
        [1., -1., -1., 1.],
    ];
    let mut w = vec![0f32; 4 * c * c * 4];
    for (b, k) in bands.iter().enumerate() {
        for ch in 0..c {
            let o = b * c + ch;
            for (j, v) in k.iter().enumerate() {
                w[((o * c) + ch) * 4 + j] = v * 0.5;
            }
        }
    }
    w
}

fn haar_kernel(c: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(haar_kernel_values(c), (4 * c, c, 2, 2), dev)?.to_dtype(dtype)
}

/// The learned encoder. Tensors at `vb.conv{i}`, `vb.low`, `vb.high`.
fn learned_split(c: usize, widths: &[usize], bn: bool, vb: VarBuilder) -> Result<Split> {
    let mut convs = Vec::new();
    let mut c_in = c;
    for (i, &w) in widths.iter().enumerate() {
        convs.push(conv3x3(c_in, w, 1, bn, true, vb.pp(format!("conv{i}")))?);
        c_in = w;
    }
    // No BN on the split convs: the energy penalty must see I_H's real scale.
    let low = conv3x3(c_in, c, 2, false, false, vb.pp("low"))?;
    let high = conv3x3(c_in, c, 2, false, false, vb.pp("high"))?;
    Ok(Split::Learned {
        convs,
        low: Box::new(low),
        high: Box::new(high),
    })
}

/// Time spent in each part of one forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// The split (learned encoder, Haar, average or nothing).
    pub encoder: Duration,
    /// The backbone on I_L.
    pub backbone: Duration,
    /// The quarter-width branch on I_H.
    pub branch: Duration,
    /// Heads and the logit sum.
    pub heads: Duration,
}

impl StageTimes {
    /// The four stages in order, with their names.
    pub fn named(&self) -> [(&'static str, Duration); 4] {
        [
            ("encoder", self.encoder),
            ("backbone", self.backbone),
            ("branch", self.branch),
            ("heads", self.heads),
        ]
    }
}

/// A built network: the inference path only. The decoder is a separate [`Decoder`].
pub struct WaeNet {
    config: ModelConfig,
    split: Split,
    backbone: VggStack,
    branch: Option<VggStack>,
    head_low: FuncT<'static>,
    head_fuse: Option<FuncT<'static>>,
}

impl WaeNet {
    /// Builds the inference network described by `config` from `vb` (the config must be valid).
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let a = &config.arch;
        let c = config.input.channels;
        let split = match a.kind {
            ArchKind::Plain => Split::Identity,
            ArchKind::NaiveHalf => Split::Average,
            ArchKind::Haar => Split::Haar(haar_kernel(c, vb.dtype(), vb.device())?),
            ArchKind::Wae => learned_split(c, &a.encoder, a.batch_norm, vb.pp("encoder"))?,
        };
        let backbone = vgg_stack(c, &a.backbone, a.pool_ceil, a.batch_norm, vb.pp("backbone"))?;
        let (fh, fw) = config.feature_size();
        let low_features = a
            .backbone
            .last()
            .and_then(|s| s.last())
            .copied()
            .unwrap_or(0)
            * fh
            * fw;
        let head_low = mlp_head(low_features, &a.head_low, config.classes, vb.pp("head_low"))?;
        let (branch, head_fuse) = if a.kind.has_branch() {
            let stages = config.branch_stages();
            let branch = vgg_stack(
                config.high_channels(),
                &stages,
                a.pool_ceil,
                a.batch_norm,
                vb.pp("branch"),
            )?;
            let high_features =
                stages.last().and_then(|s| s.last()).copied().unwrap_or(0) * fh * fw;
            let fuse = mlp_head(
                low_features + high_features,
                &a.head_fuse,
                config.classes,
                vb.pp("head_fuse"),
            )?;
            (Some(branch), Some(fuse))
        } else {
            (None, None)
        };
        Ok(WaeNet {
            config: config.clone(),
            split,
            backbone,
            branch,
            head_low,
            head_fuse,
        })
    }

    /// The config this network was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Splits a normalised batch `[N, C, H, W]` into I_L and, for the two-branch kinds, I_H.
    pub fn split(&self, xs: &Tensor, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        match &self.split {
            Split::Identity => Ok((xs.clone(), None)),
            Split::Average => Ok((xs.avg_pool2d(2)?, None)),
            Split::Haar(k) => {
                let c = self.config.input.channels;
                let bands = xs.conv2d(k, 0, 2, 1, 1)?;
                Ok((bands.narrow(1, 0, c)?, Some(bands.narrow(1, c, 3 * c)?)))
            }
            Split::Learned { convs, low, high } => {
                let mut h = xs.clone();
                for conv in convs {
                    h = h.apply_t(conv, train)?;
                }
                Ok((
                    h.apply_t(low.as_ref(), train)?,
                    Some(h.apply_t(high.as_ref(), train)?),
                ))
            }
        }
    }

    /// The I_L backbone (for layer analysis).
    pub fn backbone_stack(&self) -> &VggStack {
        &self.backbone
    }

    /// The I_H branch's stack, for the two-branch kinds.
    pub fn branch_stack(&self) -> Option<&VggStack> {
        self.branch.as_ref()
    }

    /// The learned encoder's full-resolution convs and its two split convs (I_L, I_H); `None`
    /// for the kinds with a fixed split.
    pub fn learned_encoder(&self) -> Option<(&[Conv3x3], &Conv3x3, &Conv3x3)> {
        match &self.split {
            Split::Learned { convs, low, high } => Some((convs, low.as_ref(), high.as_ref())),
            _ => None,
        }
    }

    /// F_L: the backbone on I_L.
    pub fn backbone(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        low.apply_t(&self.backbone, train)
    }

    /// F_H: the quarter-width branch on I_H (None for single-branch kinds).
    pub fn branch(&self, high: Option<&Tensor>, train: bool) -> Result<Option<Tensor>> {
        match (&self.branch, high) {
            (Some(b), Some(h)) => Ok(Some(h.apply_t(b, train)?)),
            _ => Ok(None),
        }
    }

    /// Logits = head_low(F_L) + head_fuse(concat(F_L, F_H)).
    pub fn heads(&self, f_low: &Tensor, f_high: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let logits = f_low.apply_t(&self.head_low, train)?;
        match (&self.head_fuse, f_high) {
            (Some(fuse), Some(fh)) => {
                logits + Tensor::cat(&[f_low, fh], 1)?.apply_t(fuse, train)?
            }
            _ => Ok(logits),
        }
    }

    /// Full forward pass; `train` enables dropout and batch statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (low, high) = self.split(xs, train)?;
        let f_low = self.backbone(&low, train)?;
        let f_high = self.branch(high.as_ref(), train)?;
        self.heads(&f_low, f_high.as_ref(), train)
    }

    /// Inference forward pass that also reports the time of each stage. On GPUs it synchronises
    /// between stages, so use [`WaeNet::forward_t`] when the split is not wanted.
    pub fn forward_timed(&self, xs: &Tensor) -> Result<(Tensor, StageTimes)> {
        let dev = xs.device().clone();
        let mut times = StageTimes::default();
        let lap = |slot: &mut Duration, t: Instant| -> Result<()> {
            dev.synchronize()?;
            *slot = t.elapsed();
            Ok(())
        };
        let t = Instant::now();
        let (low, high) = self.split(xs, false)?;
        lap(&mut times.encoder, t)?;
        let t = Instant::now();
        let f_low = self.backbone(&low, false)?;
        lap(&mut times.backbone, t)?;
        let t = Instant::now();
        let f_high = self.branch(high.as_ref(), false)?;
        lap(&mut times.branch, t)?;
        let t = Instant::now();
        let logits = self.heads(&f_low, f_high.as_ref(), false)?;
        lap(&mut times.heads, t)?;
        Ok((logits, times))
    }
}

impl candle_core::Module for WaeNet {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }
}

/// The training-only decoder: rebuilds the normalised input from I_L and I_H.
/// Tensors at `vb.up`, `vb.conv{i}`, `vb.out`.
pub struct Decoder {
    up: candle_nn::ConvTranspose2d,
    convs: Vec<Conv3x3>,
    out: Conv3x3,
}

impl Decoder {
    /// Builds the decoder for a two-branch config.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.input.channels;
        let d = &config.arch.decoder;
        let up_cfg = ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        let up = candle_nn::conv_transpose2d(
            c + config.high_channels(),
            d.width,
            2,
            up_cfg,
            vb.pp("up"),
        )?;
        let convs = (0..d.convs)
            .map(|i| conv3x3(d.width, d.width, 1, false, true, vb.pp(format!("conv{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let out = conv3x3(d.width, c, 1, false, false, vb.pp("out"))?;
        Ok(Decoder { up, convs, out })
    }

    /// Reconstruction of the input from I_L and I_H.
    pub fn forward(&self, low: &Tensor, high: &Tensor) -> Result<Tensor> {
        let mut xs = Tensor::cat(&[low, high], 1)?.apply(&self.up)?.relu()?;
        for conv in &self.convs {
            xs = xs.apply_t(conv, false)?;
        }
        xs.apply_t(&self.out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use candle_nn::VarMap;

    fn build(name: &str) -> (ModelConfig, WaeNet) {
        let cfg = preset(name).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = WaeNet::new(&cfg, vb).unwrap();
        (cfg, net)
    }

    #[test]
    fn wae_split_is_half_resolution_and_logits_have_classes() {
        let (cfg, net) = build("wae-fashion");
        let x = Tensor::randn(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
        let (low, high) = net.split(&x, false).unwrap();
        assert_eq!(low.dims(), &[3, 1, 14, 14]);
        assert_eq!(high.unwrap().dims(), &[3, 1, 14, 14]);
        let logits = net.forward_t(&x, false).unwrap();
        assert_eq!(logits.dims(), &[3, cfg.classes]);
    }

    #[test]
    fn every_kind_builds_and_runs() {
        for kind in [
            ArchKind::Plain,
            ArchKind::NaiveHalf,
            ArchKind::Haar,
            ArchKind::Wae,
        ] {
            let mut cfg = preset("wae-fashion").unwrap();
            cfg.arch.kind = kind;
            cfg.arch.batch_norm = true;
            let vm = VarMap::new();
            let net =
                WaeNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
            let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu).unwrap();
            let (low, high) = net.split(&x, true).unwrap();
            let expect_side = if kind == ArchKind::Plain { 28 } else { 14 };
            assert_eq!(low.dims()[2], expect_side, "{kind:?}");
            assert_eq!(
                high.map(|h| h.dims()[1]),
                kind.has_branch().then(|| cfg.high_channels())
            );
            assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 10]);
        }
    }

    #[test]
    fn haar_split_is_orthonormal() {
        let mut cfg = preset("wae-fashion").unwrap();
        cfg.arch.kind = ArchKind::Haar;
        let vm = VarMap::new();
        let net =
            WaeNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        // One 2x2 block [[1, 2], [3, 4]]: LL = 5, LH = -1, HL = -2, HH = 0.
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let (low, high) = net.split(&x, false).unwrap();
        assert_eq!(
            low.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0]
        );
        assert_eq!(
            high.unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![-1.0, -2.0, 0.0]
        );
    }

    #[test]
    fn ceil_pool_keeps_the_odd_edge() {
        let x = Tensor::arange(0f32, 9., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let y = max_pool(&x, true).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4., 5., 7., 8.]
        );
        assert_eq!(max_pool(&x, false).unwrap().dims(), &[1, 1, 1, 1]);
    }

    #[test]
    fn decoder_rebuilds_full_resolution() {
        let cfg = preset("wae-fashion").unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = WaeNet::new(&cfg, vb.clone()).unwrap();
        let dec = Decoder::new(&cfg, vb.pp("decoder")).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu).unwrap();
        let (low, high) = net.split(&x, false).unwrap();
        assert_eq!(dec.forward(&low, &high.unwrap()).unwrap().dims(), x.dims());
    }
}
