//! The model config: one JSON document, stored in the safetensors `__metadata__` of every model
//! file under [`CONFIG_KEY`], that says what the network is, what it expects as input and how to
//! turn a picture into that input.

use serde::{Deserialize, Serialize};

/// Metadata key under which the JSON config is stored in a model file.
pub const CONFIG_KEY: &str = "wae_edge.config";
/// Version of the config format; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// Everything needed to rebuild and feed a network, serialised into every model file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Config format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Human name of the model, e.g. the preset it came from.
    pub name: String,
    /// Tensor shape the network takes, batch excluded.
    pub input: InputSpec,
    /// How a decoded image becomes that tensor.
    pub preprocess: Preprocess,
    /// Number of output classes.
    pub classes: usize,
    /// One label per class, index = class id.
    pub labels: Vec<String>,
    /// The network.
    pub arch: Arch,
    /// True for randomly initialised weights (`wae-edge new`): predictions mean nothing.
    #[serde(default)]
    pub untrained: bool,
    /// Free-form training facts (dataset, epochs, lambda, gamma, accuracy, date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
    /// What the training pictures looked like, to warn on pictures far from them
    /// (`wae-edge calibrate` measures it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<crate::domain::DomainStats>,
}

/// Input tensor geometry (channels, height, width).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// 1 for grayscale, 3 for RGB.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl std::fmt::Display for InputSpec {
    /// `HxWxC`, the form `--input` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.channels)
    }
}

/// Input sides a trained model may have: large enough for one pooling stage after the split,
/// small enough to train on an edge box's CPU.
pub const TRAIN_SIDES: std::ops::RangeInclusive<usize> = 16..=512;

impl std::str::FromStr for InputSpec {
    type Err = String;

    /// Parses `HxWxC`: even sides in [`TRAIN_SIDES`], C = 1 (gray) or 3 (colour).
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(['x', 'X']).collect();
        let [h, w, c] = parts[..] else {
            return Err(format!("`{s}` is not HxWxC, e.g. 64x64x3"));
        };
        let num = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{v}` in `{s}` is not a number"))
        };
        let (height, width, channels) = (num(h)?, num(w)?, num(c)?);
        if !(channels == 1 || channels == 3) {
            return Err(format!("{channels} channels; 1 (gray) or 3 (colour)"));
        }
        for side in [height, width] {
            if !TRAIN_SIDES.contains(&side) || side % 2 != 0 {
                return Err(format!(
                    "side {side}: sides are even, from {} to {} pixels",
                    TRAIN_SIDES.start(),
                    TRAIN_SIDES.end()
                ));
            }
        }
        Ok(InputSpec {
            channels,
            height,
            width,
        })
    }
}

/// How an image is resized to the input size.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Resize the whole frame to the input size, ignoring aspect (jetson-inference).
    Stretch,
    /// Resize the short side, then crop the centre (torchvision/candle examples).
    CenterCrop,
}

/// Pixel normalisation: `x = (pixel / 255 - mean[c]) / std[c]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Resize policy.
    pub resize: ResizeMode,
    /// Per-channel mean, in [0, 1] units.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, in [0, 1] units.
    pub std: Vec<f32>,
}

/// Which network family the file holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ArchKind {
    /// Learned encoder splits the input into I_L and I_H (the paper's network).
    Wae,
    /// The backbone on the full-resolution input: the baseline every WAE is compared with.
    Plain,
    /// The input averaged down 2x2, then the backbone: the paper's "VGG16 (112)" control.
    NaiveHalf,
    /// A fixed orthonormal Haar split in place of the learned encoder ("Wavelet+CNN").
    Haar,
}

impl ArchKind {
    /// Whether the network has the I_H branch and the fusion head.
    pub fn has_branch(self) -> bool {
        matches!(self, ArchKind::Wae | ArchKind::Haar)
    }
    /// Whether the backbone runs at half resolution.
    pub fn is_half(self) -> bool {
        !matches!(self, ArchKind::Plain)
    }
}

/// The architecture. Every kind shares the backbone and head layout so that a WAE model and its
/// plain counterpart differ only in `kind`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    /// Network family.
    pub kind: ArchKind,
    /// Widths of the full-resolution 3x3 convs before the split (WAE only; paper: 16, 16, 16).
    #[serde(default)]
    pub encoder: Vec<usize>,
    /// Backbone stages; each is a list of 3x3 conv widths followed by a 2x2 max-pool.
    pub backbone: Vec<Vec<usize>>,
    /// Round pooled sizes up (Caffe) instead of down (PyTorch/ONNX); 7x7 -> 4x4 vs 3x3.
    #[serde(default)]
    pub pool_ceil: bool,
    /// Width of the I_H branch relative to the backbone (paper: 0.25).
    pub branch_width: f32,
    /// Hidden widths of the head on F_L (paper: 1024, 1024).
    pub head_low: Vec<usize>,
    /// Hidden widths of the head on concat(F_L, F_H) (paper: 2048, 2048).
    #[serde(default)]
    pub head_fuse: Vec<usize>,
    /// Batch norm after every conv. Training only: export folds it into the convs and clears it.
    #[serde(default)]
    pub batch_norm: bool,
    /// Decoder used for training only (reconstruction loss); never built for inference.
    #[serde(default)]
    pub decoder: DecoderSpec,
}

/// The training-only decoder: I_L and I_H concatenated, a 2x2 transposed conv back to full
/// resolution, `convs` 3x3 convs of `width` channels, and a 3x3 conv to the input channels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecoderSpec {
    /// Channels of the decoder's hidden convs.
    pub width: usize,
    /// Number of hidden 3x3 convs after the upsampling.
    pub convs: usize,
}

impl Default for DecoderSpec {
    fn default() -> Self {
        DecoderSpec {
            width: 16,
            convs: 2,
        }
    }
}

/// A config that cannot describe a working network.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The file was written by an incompatible version.
    #[error("unsupported config format {0} (this build reads format {FORMAT_VERSION})")]
    Format(u32),
    /// The number of labels differs from the number of classes.
    #[error("label count {labels} does not match the model's {classes} classes")]
    LabelCount {
        /// Labels found.
        labels: usize,
        /// Classes declared.
        classes: usize,
    },
    /// Anything else that is inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Largest input side accepted, so a malicious config cannot ask for a huge allocation.
const MAX_SIDE: usize = 4096;
/// Largest channel width accepted anywhere in the network.
const MAX_WIDTH: usize = 16384;
/// Counts a config may ask for, far above any real network's (VGG16: 5 stages of at most 3
/// convs, 2 head layers), so that a hostile config is refused before anything is built for it.
const MAX_STAGES: usize = 16;
/// Convs per backbone stage, at most.
const MAX_STAGE_CONVS: usize = 64;
/// Encoder convs, head layers (each head) and decoder convs, at most each.
const MAX_LAYERS: usize = 64;
/// Classes, at most (ImageNet-21k has 21,841).
const MAX_CLASSES: usize = 100_000;
/// Characters in a label or in the model's name, at most.
const MAX_LABEL_CHARS: usize = 1024;

impl ModelConfig {
    /// Checks that the config describes a network that can be built and fed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.format != FORMAT_VERSION {
            return Err(ConfigError::Format(self.format));
        }
        if self.labels.len() != self.classes {
            return Err(ConfigError::LabelCount {
                labels: self.labels.len(),
                classes: self.classes,
            });
        }
        if self.classes == 0 || self.classes > MAX_CLASSES {
            return bad(format!(
                "{} classes outside 1..={MAX_CLASSES}",
                self.classes
            ));
        }
        if let Some(l) = self
            .labels
            .iter()
            .chain([&self.name])
            .find(|l| l.chars().count() > MAX_LABEL_CHARS)
        {
            return bad(format!(
                "a label or name of {} characters (at most {MAX_LABEL_CHARS})",
                l.chars().count()
            ));
        }
        let InputSpec {
            channels,
            height,
            width,
        } = self.input;
        if !(channels == 1 || channels == 3) {
            return bad(format!(
                "input has {channels} channels; 1 (gray) or 3 (RGB) expected"
            ));
        }
        if height == 0 || width == 0 || height > MAX_SIDE || width > MAX_SIDE {
            return bad(format!(
                "input size {height}x{width} outside 1..={MAX_SIDE}"
            ));
        }
        let p = &self.preprocess;
        if p.mean.len() != channels || p.std.len() != channels {
            return bad(format!(
                "preprocess mean/std have {}/{} entries for {channels} channels",
                p.mean.len(),
                p.std.len()
            ));
        }
        if p.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || p.mean.iter().any(|m| !m.is_finite())
        {
            return bad("preprocess std must be finite and positive, mean finite".into());
        }
        let a = &self.arch;
        if a.kind.is_half() && (height % 2 != 0 || width % 2 != 0) {
            return bad(format!(
                "{:?} splits the input in half; {height}x{width} must be even",
                a.kind
            ));
        }
        if a.backbone.is_empty() || a.backbone.iter().any(|s| s.is_empty()) {
            return bad("backbone needs at least one stage, each with at least one conv".into());
        }
        // Counts before anything is walked per layer.
        if a.backbone.len() > MAX_STAGES {
            return bad(format!(
                "{} backbone stages (at most {MAX_STAGES})",
                a.backbone.len()
            ));
        }
        if let Some(s) = a.backbone.iter().find(|s| s.len() > MAX_STAGE_CONVS) {
            return bad(format!(
                "a backbone stage of {} convs (at most {MAX_STAGE_CONVS})",
                s.len()
            ));
        }
        for (what, n) in [
            ("encoder convs", a.encoder.len()),
            ("head_low layers", a.head_low.len()),
            ("head_fuse layers", a.head_fuse.len()),
            ("decoder convs", a.decoder.convs),
        ] {
            if n > MAX_LAYERS {
                return bad(format!("{n} {what} (at most {MAX_LAYERS})"));
            }
        }
        let widths = a
            .encoder
            .iter()
            .chain(a.backbone.iter().flatten())
            .chain(&a.head_low)
            .chain(&a.head_fuse);
        if widths.clone().any(|&w| w == 0 || w > MAX_WIDTH) {
            return bad(format!("layer widths must be in 1..={MAX_WIDTH}"));
        }
        if a.kind == ArchKind::Wae && a.encoder.is_empty() {
            return bad("a WAE needs at least one encoder conv".into());
        }
        if a.kind.has_branch() && !(a.branch_width > 0.0 && a.branch_width <= 1.0) {
            return bad(format!("branch_width {} outside (0, 1]", a.branch_width));
        }
        if a.decoder.width == 0 || a.decoder.width > MAX_WIDTH {
            return bad("decoder width must be positive".into());
        }
        let (h, w) = self.feature_size();
        if h == 0 || w == 0 {
            return bad(format!(
                "{} pooling stages shrink {height}x{width} to nothing",
                a.backbone.len()
            ));
        }
        Ok(())
    }

    /// Side of the images the backbone sees: half the input for the split kinds.
    pub fn backbone_input(&self) -> (usize, usize) {
        let InputSpec { height, width, .. } = self.input;
        if self.arch.kind.is_half() {
            (height / 2, width / 2)
        } else {
            (height, width)
        }
    }

    /// Spatial size of F_L (and F_H) after all pooling stages.
    pub fn feature_size(&self) -> (usize, usize) {
        let (mut h, mut w) = self.backbone_input();
        for _ in &self.arch.backbone {
            (h, w) = (
                pool_out(h, self.arch.pool_ceil),
                pool_out(w, self.arch.pool_ceil),
            );
        }
        (h, w)
    }

    /// Channels of I_H: the input's for the learned split, three detail bands for Haar.
    pub fn high_channels(&self) -> usize {
        match self.arch.kind {
            ArchKind::Haar => 3 * self.input.channels,
            _ => self.input.channels,
        }
    }

    /// Stage widths of the I_H branch (backbone widths scaled by `branch_width`, at least 1).
    pub fn branch_stages(&self) -> Vec<Vec<usize>> {
        let f = self.arch.branch_width;
        let scale = |w: usize| ((w as f32 * f).round() as usize).max(1);
        self.arch
            .backbone
            .iter()
            .map(|s| s.iter().map(|&w| scale(w)).collect())
            .collect()
    }

    /// Switches the network to `kind`, keeping its backbone and heads: the encoder goes for
    /// every kind but the WAE (which gets one 16-wide conv if it had none), the fusion head for
    /// the single-branch kinds (the two-branch ones get one like `head_low` if they had none).
    pub fn set_kind(&mut self, kind: ArchKind) {
        let a = &mut self.arch;
        a.kind = kind;
        if kind != ArchKind::Wae {
            a.encoder.clear();
        } else if a.encoder.is_empty() {
            a.encoder = vec![16];
        }
        if !kind.has_branch() {
            a.head_fuse.clear();
        } else if a.head_fuse.is_empty() {
            a.head_fuse = a.head_low.clone();
        }
    }

    /// The same network without the split: the baseline to compare a WAE against.
    pub fn plain_counterpart(&self) -> ModelConfig {
        let mut c = self.clone();
        c.arch.kind = ArchKind::Plain;
        c.arch.encoder.clear();
        c.arch.head_fuse.clear();
        c.name = format!("{} (plain counterpart)", self.name);
        c
    }

    /// Serialises to the JSON stored in model files.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }
}

/// Output side of a 2x2/2 max-pool.
pub fn pool_out(n: usize, ceil: bool) -> usize {
    if ceil {
        n.div_ceil(2)
    } else {
        n / 2
    }
}

/// A backbone for a backbone input of `h` x `w`: 2x2 pooling stages until the smaller side is
/// about 4 pixels (at most five stages, as VGG16), two 3x3 convs each, widths doubling from 32
/// up to 256. The Fashion-MNIST preset (14x14 after the split, three stages) is the model for
/// it; a 64x64 input gets 32,32/64,64/128,128 on its 32x32 I_L.
pub fn scaled_backbone(h: usize, w: usize) -> Vec<Vec<usize>> {
    let mut side = h.min(w);
    let mut stages = Vec::new();
    while side > 5 && stages.len() < 5 {
        let width = (32 << stages.len()).min(256);
        stages.push(vec![width, width]);
        side = pool_out(side, true);
    }
    if stages.is_empty() {
        stages.push(vec![32, 32]);
    }
    stages
}

/// A WAE (or `kind`) for a user's own pictures: `input`, one class per label, the backbone
/// scaled to the input ([`scaled_backbone`]), the Fashion-MNIST preset's encoder, heads and
/// decoder. The normalisation starts neutral; training measures it from the pictures.
pub fn for_input(
    name: &str,
    input: InputSpec,
    kind: ArchKind,
    labels: Vec<String>,
    resize: ResizeMode,
) -> ModelConfig {
    let mut c = preset("wae-fashion").expect("built-in preset");
    c.set_kind(kind);
    c.name = name.to_string();
    c.input = input;
    let (bh, bw) = c.backbone_input();
    c.arch.backbone = scaled_backbone(bh, bw);
    c.preprocess = Preprocess {
        resize,
        mean: vec![0.5; input.channels],
        std: vec![0.25; input.channels],
    };
    c.classes = labels.len();
    c.labels = labels;
    c
}

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &["wae-vgg16", "vgg16", "wae-fashion", "plain-fashion"];

/// VGG16's 13 convs in five stages.
fn vgg16_stages() -> Vec<Vec<usize>> {
    vec![
        vec![64, 64],
        vec![128, 128],
        vec![256, 256, 256],
        vec![512, 512, 512],
        vec![512, 512, 512],
    ]
}

/// The Fashion-MNIST class names, in label order.
pub const FASHION_LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// A named architecture: the paper's network, its baseline, and the Fashion-MNIST pair.
pub fn preset(name: &str) -> Option<ModelConfig> {
    let imagenet = || Preprocess {
        resize: ResizeMode::CenterCrop,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let numbered = |n: usize| (0..n).map(|i| format!("class_{i}")).collect::<Vec<_>>();
    let vgg = |kind: ArchKind| ModelConfig {
        format: FORMAT_VERSION,
        name: name.to_string(),
        input: InputSpec {
            channels: 3,
            height: 224,
            width: 224,
        },
        preprocess: imagenet(),
        classes: 1000,
        labels: numbered(1000),
        arch: Arch {
            kind,
            encoder: if kind == ArchKind::Wae {
                vec![16, 16, 16]
            } else {
                vec![]
            },
            backbone: vgg16_stages(),
            // The released Caffe model pools 7 -> 4 (ceil); at 224 the plain net pools 14 -> 7 either way.
            pool_ceil: kind == ArchKind::Wae,
            branch_width: 0.25,
            head_low: if kind == ArchKind::Wae {
                vec![1024, 1024]
            } else {
                vec![4096, 4096]
            },
            head_fuse: if kind == ArchKind::Wae {
                vec![2048, 2048]
            } else {
                vec![]
            },
            batch_norm: false,
            decoder: DecoderSpec::default(),
        },
        untrained: true,
        training: None,
        domain: None,
    };
    let fashion = |kind: ArchKind| ModelConfig {
        format: FORMAT_VERSION,
        name: name.to_string(),
        input: InputSpec {
            channels: 1,
            height: 28,
            width: 28,
        },
        preprocess: Preprocess {
            resize: ResizeMode::Stretch,
            mean: vec![0.286],
            std: vec![0.353],
        },
        classes: 10,
        labels: FASHION_LABELS.iter().map(|s| s.to_string()).collect(),
        arch: Arch {
            kind,
            encoder: if kind == ArchKind::Wae {
                vec![16]
            } else {
                vec![]
            },
            backbone: vec![vec![64, 64], vec![128, 128], vec![256]],
            pool_ceil: true,
            branch_width: 0.25,
            head_low: vec![256],
            head_fuse: if kind.has_branch() { vec![256] } else { vec![] },
            batch_norm: false,
            decoder: DecoderSpec {
                width: 16,
                convs: 1,
            },
        },
        untrained: true,
        training: None,
        domain: None,
    };
    Some(match name {
        "wae-vgg16" => vgg(ArchKind::Wae),
        "vgg16" => vgg(ArchKind::Plain),
        "wae-fashion" => fashion(ArchKind::Wae),
        "plain-fashion" => fashion(ArchKind::Plain),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() {
        for name in PRESETS {
            let c = preset(name).unwrap();
            c.validate().unwrap();
            let back: ModelConfig = serde_json::from_str(&c.to_json()).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn wae_vgg16_pools_like_caffe() {
        let c = preset("wae-vgg16").unwrap();
        assert_eq!(c.backbone_input(), (112, 112));
        assert_eq!(c.feature_size(), (4, 4));
        assert_eq!(c.branch_stages()[4], vec![128, 128, 128]);
        assert_eq!(preset("vgg16").unwrap().feature_size(), (7, 7));
    }

    #[test]
    fn inputs_parse_and_backbones_scale_with_them() {
        let i: InputSpec = "64x48x3".parse().unwrap();
        assert_eq!(
            (i.height, i.width, i.channels, i.to_string()),
            (64, 48, 3, "64x48x3".into())
        );
        for bad in [
            "64x64",
            "63x64x3",
            "64x64x2",
            "14x14x1",
            "1024x1024x3",
            "ax64x3",
        ] {
            assert!(bad.parse::<InputSpec>().is_err(), "{bad}");
        }
        assert_eq!(
            scaled_backbone(32, 32),
            vec![vec![32, 32], vec![64, 64], vec![128, 128]]
        );
        assert_eq!(scaled_backbone(8, 8).len(), 1);
        assert_eq!(scaled_backbone(256, 256).len(), 5);
        assert_eq!(scaled_backbone(256, 256)[4], vec![256, 256]);
        for side in (16..=512).step_by(2) {
            for kind in [
                ArchKind::Wae,
                ArchKind::Plain,
                ArchKind::Haar,
                ArchKind::NaiveHalf,
            ] {
                let input = InputSpec {
                    channels: 3,
                    height: side,
                    width: 16.max(side / 2 * 2),
                };
                let c = for_input(
                    "mine",
                    input,
                    kind,
                    vec!["a".into(), "b".into()],
                    ResizeMode::Stretch,
                );
                c.validate().unwrap();
                let (fh, fw) = c.feature_size();
                assert!((1..=16).contains(&fh.min(fw)), "{side} {kind:?}: {fh}x{fw}");
            }
        }
    }

    #[test]
    fn label_mismatch_is_caught() {
        let mut c = preset("wae-fashion").unwrap();
        c.labels.pop();
        assert_eq!(
            c.validate(),
            Err(ConfigError::LabelCount {
                labels: 9,
                classes: 10
            })
        );
    }

    #[test]
    fn odd_input_and_vanishing_maps_are_rejected() {
        let mut c = preset("wae-fashion").unwrap();
        c.input.height = 27;
        assert!(c.validate().is_err());
        let mut c = preset("plain-fashion").unwrap();
        c.arch.backbone = vec![vec![8]; 12];
        c.arch.pool_ceil = false;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("to nothing")));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let mut v: serde_json::Value =
            serde_json::from_str(&preset("vgg16").unwrap().to_json()).unwrap();
        v["arch"]["dilation"] = 2.into();
        assert!(serde_json::from_value::<ModelConfig>(v).is_err());
    }
}
