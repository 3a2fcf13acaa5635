//! Multiply-accumulate counts per part, from the config alone (convs and fully connected layers;
//! bias, ReLU, pooling and the logit sum are not counted, as in the paper and ONNX tools).

use serde::Serialize;

use crate::config::{pool_out, ArchKind, ModelConfig};

/// MACs per image for each part of a network.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Macs {
    /// The split: learned encoder (full-resolution convs and the two stride-2 convs) or Haar.
    pub encoder: u64,
    /// The backbone on I_L (on the full input for `plain`).
    pub backbone: u64,
    /// The I_H branch.
    pub branch: u64,
    /// Both heads.
    pub heads: u64,
    /// The training-only decoder (not part of `total`).
    pub decoder: u64,
    /// What inference runs: encoder + backbone + branch + heads.
    pub total: u64,
}

impl Macs {
    /// Inference MACs without the encoder, the figure the paper's Table 1 reports.
    pub fn without_encoder(&self) -> u64 {
        self.total.saturating_sub(self.encoder)
    }
}

/// Product in u64, saturating: counts stay exact on 32-bit targets where usize would overflow.
fn product(factors: &[usize]) -> u64 {
    factors
        .iter()
        .fold(1u64, |acc, &f| acc.saturating_mul(f as u64))
}

fn conv(c_in: usize, c_out: usize, k: usize, h_out: usize, w_out: usize) -> u64 {
    product(&[c_in, c_out, k, k, h_out, w_out])
}

/// MACs of a VGG stack and the channels it ends with.
fn stack(
    c_in: usize,
    stages: &[Vec<usize>],
    (mut h, mut w): (usize, usize),
    ceil: bool,
) -> (u64, usize) {
    let (mut macs, mut c) = (0u64, c_in);
    for stage in stages {
        for &width in stage {
            macs = macs.saturating_add(conv(c, width, 3, h, w));
            c = width;
        }
        (h, w) = (pool_out(h, ceil), pool_out(w, ceil));
    }
    (macs, c)
}

fn mlp(c_in: usize, hidden: &[usize], classes: usize) -> u64 {
    let mut c = c_in;
    let mut macs = 0u64;
    for &h in hidden.iter().chain(std::iter::once(&classes)) {
        macs = macs.saturating_add(product(&[c, h]));
        c = h;
    }
    macs
}

/// Counts the MACs of every part of the network `config` describes.
pub fn count(config: &ModelConfig) -> Macs {
    let a = &config.arch;
    let c = config.input.channels;
    let (h, w) = (config.input.height, config.input.width);
    let (hh, hw) = config.backbone_input();
    let encoder = match a.kind {
        ArchKind::Plain | ArchKind::NaiveHalf => 0,
        ArchKind::Haar => conv(c, 4 * c, 2, hh, hw),
        ArchKind::Wae => {
            let mut macs = 0u64;
            let mut c_in = c;
            for &width in &a.encoder {
                macs = macs.saturating_add(conv(c_in, width, 3, h, w));
                c_in = width;
            }
            macs.saturating_add(conv(c_in, c, 3, hh, hw).saturating_mul(2))
        }
    };
    let (backbone, c_low) = stack(c, &a.backbone, (hh, hw), a.pool_ceil);
    let (fh, fw) = config.feature_size();
    let mut heads = mlp(c_low.saturating_mul(fh * fw), &a.head_low, config.classes);
    let (mut branch, mut decoder) = (0, 0);
    if a.kind.has_branch() {
        let (m, c_high) = stack(
            config.high_channels(),
            &config.branch_stages(),
            (hh, hw),
            a.pool_ceil,
        );
        branch = m;
        heads = heads.saturating_add(mlp(
            (c_low + c_high).saturating_mul(fh * fw),
            &a.head_fuse,
            config.classes,
        ));
        let d = &a.decoder;
        decoder = conv(c + config.high_channels(), d.width, 2, hh, hw)
            .saturating_add(conv(d.width, d.width, 3, h, w).saturating_mul(d.convs as u64))
            .saturating_add(conv(d.width, c, 3, h, w));
    }
    Macs {
        encoder,
        backbone,
        branch,
        heads,
        decoder,
        total: encoder
            .saturating_add(backbone)
            .saturating_add(branch)
            .saturating_add(heads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn wae_vgg16_matches_the_paper() {
        let wae = count(&preset("wae-vgg16").unwrap());
        let vgg = count(&preset("vgg16").unwrap());
        // Paper Table 1: 4.11 G for WAE (encoder not counted) vs 15.36 G for VGG16.
        let g = |m: u64| m as f64 / 1e9;
        assert!(
            (g(wae.without_encoder()) - 4.12).abs() < 0.03,
            "{}",
            g(wae.without_encoder())
        );
        assert!((g(wae.encoder) - 0.264).abs() < 0.01, "{}", g(wae.encoder));
        assert!((g(vgg.total) - 15.4).abs() < 0.1, "{}", g(vgg.total));
        assert_eq!(vgg.encoder + vgg.branch + vgg.decoder, 0);
    }

    #[test]
    fn counts_at_the_validation_caps_are_exact() {
        let mut c = preset("plain-fashion").unwrap();
        c.input.height = 4096;
        c.input.width = 4096;
        c.arch.backbone = vec![vec![16384, 16384]];
        c.validate().unwrap();
        // 1 -> 16384 and 16384 -> 16384 3x3 convs on 4096x4096: fits u64 (usize on 32-bit
        // targets would not, hence the saturating arithmetic).
        let side = 4096u64 * 4096;
        assert_eq!(
            count(&c).backbone,
            16384 * 9 * side + 16384 * 16384 * 9 * side
        );
    }

    #[test]
    fn conv_count_by_hand() {
        // One 3x3 conv 1->2 on 4x4 then pool, head 2*2*2 -> 3: 1*2*9*16 + 8*3.
        let mut c = preset("plain-fashion").unwrap();
        c.input.height = 4;
        c.input.width = 4;
        c.arch.backbone = vec![vec![2]];
        c.arch.head_low = vec![];
        c.classes = 3;
        let m = count(&c);
        assert_eq!(m.backbone, 288);
        assert_eq!(m.heads, 24);
        assert_eq!(m.total, 312);
    }
}
