//! The forward pass the CUDA engine runs: the network with every 3x3 conv the direct kernel
//! takes (at most [`super::direct_conv::MAX_CHANNELS`] channels in and out, no batch norm left
//! in) on it, and the WAE split's two stride-2 convs as one. For WAE-VGG16 that is the encoder
//! (3 -> 16 -> 16 -> 16 at 224x224) and the I_H branch's first two stages (16 and 32 channels at
//! 112x112 and 56x56), the convs where im2col + GEMM is at its worst. The wider convs run as
//! im2col + GEMM with one fused bias/ReLU/layout epilogue ([`gemm_conv`]); the heads are candle's.
//! Nothing here is CUDA-specific: on the CPU the op runs its f32 twin, which is how the tests
//! hold this composition to [`WaeNet`].

use candle_core::{Result, Tensor};

use super::direct_conv::{suits, DirectConv};
use super::gemm_conv;
use crate::config::ModelConfig;
use crate::model::{Conv3x3, VggStack, WaeNet};

/// The split's two convs' weights and biases, concatenated: one conv gives I_L then I_H.
struct FusedSplit {
    weight: Tensor,
    bias: Tensor,
    low_channels: usize,
}

/// [`WaeNet`] with its few-channel convs on the direct kernel.
pub struct DirectNet {
    net: WaeNet,
    split: Option<FusedSplit>,
}

/// Whether a conv goes to the direct kernel: few channels, a bias, no batch norm.
fn direct(c: &Conv3x3) -> Option<(DirectConv, &Tensor)> {
    let (c_out, c_in) = c.weight().dims4().map(|(o, i, _, _)| (o, i)).ok()?;
    let bias = c.bias()?;
    (suits(c_in, c_out) && !c.has_batch_norm()).then_some((
        DirectConv {
            stride: c.stride(),
            relu: c.relu(),
        },
        bias,
    ))
}

/// One conv: direct where it can be, else im2col + GEMM with the fused epilogue, else (batch
/// norm left in, or a `cudnn` build, whose candle convs are cuDNN's) candle's.
fn conv(c: &Conv3x3, x: &Tensor) -> Result<Tensor> {
    if let Some((op, bias)) = direct(c) {
        return op.apply(&x.contiguous()?, c.weight(), bias);
    }
    match c.bias() {
        Some(bias) if !c.has_batch_norm() && !cfg!(feature = "cudnn") => {
            gemm_conv::conv(x, c.weight(), bias, c.stride(), c.relu())
        }
        _ => x.apply_t(c, false),
    }
}

impl DirectNet {
    /// Wraps a built network (inference only).
    pub fn new(net: WaeNet) -> Result<DirectNet> {
        let split = match net.learned_encoder() {
            Some((_, low, high)) if direct(low).is_some() && direct(high).is_some() => {
                let (c_out, c_in, _, _) = low.weight().dims4()?;
                let (c_high, _, _, _) = high.weight().dims4()?;
                let together = suits(c_in, c_out + c_high) && low.stride() == high.stride();
                match (together, low.bias(), high.bias()) {
                    (true, Some(bl), Some(bh)) => Some(FusedSplit {
                        weight: Tensor::cat(&[low.weight(), high.weight()], 0)?,
                        bias: Tensor::cat(&[bl, bh], 0)?,
                        low_channels: c_out,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        Ok(DirectNet { net, split })
    }

    /// The config the network was built from.
    pub fn config(&self) -> &ModelConfig {
        self.net.config()
    }

    /// How many convs of a pass run on the direct kernel (the fused split counts once).
    pub fn direct_convs(&self) -> usize {
        let in_stack = |s: &VggStack| {
            s.stages()
                .iter()
                .flatten()
                .filter(|c| direct(c).is_some())
                .count()
        };
        let encoder = match (self.net.learned_encoder(), &self.split) {
            (Some((convs, _, _)), Some(_)) => {
                1 + convs.iter().filter(|c| direct(c).is_some()).count()
            }
            (Some((convs, _, _)), None) => convs.iter().filter(|c| direct(c).is_some()).count(),
            _ => 0,
        };
        encoder + in_stack(self.net.backbone_stack()) + self.net.branch_stack().map_or(0, in_stack)
    }

    /// I_L and, for the two-branch kinds, I_H.
    pub fn split(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (Some((convs, _, _)), Some(f)) = (self.net.learned_encoder(), &self.split) else {
            return self.net.split(x, false);
        };
        let mut h = x.clone();
        for c in convs {
            h = conv(c, &h)?;
        }
        let s = DirectConv {
            stride: 2,
            relu: false,
        }
        .apply(&h.contiguous()?, &f.weight, &f.bias)?;
        let c = f.low_channels;
        let high = s.dim(1)? - c;
        // Views at batch 1 (contiguous already); copies at larger batches.
        Ok((
            s.narrow(1, 0, c)?.contiguous()?,
            Some(s.narrow(1, c, high)?.contiguous()?),
        ))
    }

    /// F_L: the backbone on I_L.
    pub fn backbone(&self, low: &Tensor) -> Result<Tensor> {
        self.net.backbone_stack().forward_with(low, conv)
    }

    /// F_H: the branch on I_H (None for single-branch kinds).
    pub fn branch(&self, high: Option<&Tensor>) -> Result<Option<Tensor>> {
        match (self.net.branch_stack(), high) {
            (Some(s), Some(h)) => Ok(Some(s.forward_with(h, conv)?)),
            _ => Ok(None),
        }
    }

    /// The summed heads' logits.
    pub fn heads(&self, f_low: &Tensor, f_high: Option<&Tensor>) -> Result<Tensor> {
        self.net.heads(f_low, f_high, false)
    }

    /// The whole pass; `mark(i)` runs before the encoder (0) and after each stage (1-4).
    pub fn forward_marked(
        &self,
        x: &Tensor,
        mut mark: impl FnMut(usize) -> Result<()>,
    ) -> Result<Tensor> {
        mark(0)?;
        let (low, high) = self.split(x)?;
        mark(1)?;
        let f_low = self.backbone(&low)?;
        mark(2)?;
        let f_high = self.branch(high.as_ref())?;
        mark(3)?;
        let logits = self.heads(&f_low, f_high.as_ref())?;
        mark(4)?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset, ArchKind};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn nets(cfg: &ModelConfig) -> (WaeNet, DirectNet) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let a = WaeNet::new(cfg, vb.clone()).unwrap();
        // The same variables: a second network over the same map.
        let b = DirectNet::new(WaeNet::new(cfg, vb).unwrap()).unwrap();
        (a, b)
    }

    #[test]
    fn the_direct_pass_gives_the_networks_logits_for_every_kind() {
        for kind in [
            ArchKind::Wae,
            ArchKind::Plain,
            ArchKind::Haar,
            ArchKind::NaiveHalf,
        ] {
            let mut cfg = preset("wae-fashion").unwrap();
            cfg.arch.kind = kind;
            let (net, direct) = nets(&cfg);
            let x = Tensor::randn(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
            let want = net.forward_t(&x, false).unwrap();
            let mut marks = vec![];
            let got = direct
                .forward_marked(&x, |i| {
                    marks.push(i);
                    Ok(())
                })
                .unwrap();
            let diff = crate::gpu::max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "{kind:?}: {diff}");
            assert_eq!(marks, [0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn the_encoder_and_the_thin_branch_stages_go_direct() {
        // The wae-fashion preset: encoder 1 -> 16 and the split 16 -> 1 + 1; branch stages
        // 1 -> 16 -> 16 and 16 -> 32 -> 32 (its 64-channel stage stays on candle's path).
        let (_, direct) = nets(&preset("wae-fashion").unwrap());
        assert!(direct.split.is_some());
        assert_eq!(direct.direct_convs(), 2 + 4);
        // WAE-VGG16: encoder 3 -> 16 x3 and the split; branch stages of 16 and 32 channels.
        let (_, direct) = nets(&preset("wae-vgg16").unwrap());
        assert_eq!(direct.direct_convs(), 4 + 4);
        // With batch norm left in, only the split goes direct (it never has one).
        let mut cfg = preset("wae-fashion").unwrap();
        cfg.arch.batch_norm = true;
        let (_, direct) = nets(&cfg);
        assert_eq!(direct.direct_convs(), 1);
    }
}
