//! wae-edge: run WAE (Wavelet-like Auto-Encoder, Chen et al., AAAI 2018) image classifiers on
//! edge devices. A frame goes: [`sources`] -> [`preprocess`] -> [`model`] (encoder, I_L backbone,
//! I_H branch, heads), built by [`weights`] from a memory-mapped fp16 file described by
//! [`config`], wrapped by [`classifier`]; [`stats`] measures it, [`profiles`] and [`device`]
//! say where it runs.

pub mod atomic;
pub mod bench;
pub mod capture;
#[cfg(feature = "charts")]
pub mod charts;
pub mod classifier;
pub mod config;
pub mod cpu;
pub mod dataset;
pub mod decode;
pub mod decompose;
pub mod depth;
pub mod device;
pub mod domain;
pub mod entropy;
pub mod eval;
pub mod gpu;
#[cfg(all(feature = "gstreamer", target_os = "linux"))]
pub mod gst_error;
pub mod guarded_map;
pub mod init;
pub mod mjpeg;
pub mod model;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod onnx;
pub mod overlay;
pub mod pipeline;
pub mod prepare;
pub mod preprocess;
pub mod preview;
pub mod profiles;
pub mod regular_file;
pub mod sources;
pub mod stats;
pub mod terminal;
pub mod threads;
#[cfg(feature = "train")]
pub mod train;
#[cfg(all(feature = "gstreamer", target_os = "linux"))]
pub mod video_out;
pub mod weights;

pub use classifier::{Classifier, Prediction};
pub use config::ModelConfig;
pub use model::WaeNet;

/// Where the shipped default model lives, relative to the repository root.
pub const DEFAULT_MODEL: &str = "models/fashion-wae/model.safetensors";

/// The default model: `$WAE_EDGE_MODEL`, else [`DEFAULT_MODEL`] under the current directory,
/// else under the source tree this binary was built from.
pub fn default_model_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("WAE_EDGE_MODEL") {
        return p.into();
    }
    let here = std::path::PathBuf::from(DEFAULT_MODEL);
    if here.exists() {
        return here;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL)
}
