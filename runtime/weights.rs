//! Model files: fp16 safetensors with the [`ModelConfig`] as JSON in `__metadata__`.
//!
//! Loading memory-maps the file (memmap2), validates the header against the config (every tensor
//! the inference path needs is present, F16, of the expected shape, finite; offsets sane and within
//! the file) and only then builds the network. Candle copies each requested tensor out of the
//! mapping into its own storage (converted to f32 on the CPU), so the mapping is dropped after the
//! build: the mmap saves the read buffer and makes loading lazy per tensor, it is not zero-copy.
//! Decoder tensors are never requested, so their bytes are never read. A file cut short while
//! it is being read (an update rewriting it in place) is an error, not a crash
//! ([`crate::guarded_map`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use safetensors::{Dtype, SafeTensors};

use crate::config::{ConfigError, ModelConfig, CONFIG_KEY};
use crate::guarded_map::GuardedMap;
use crate::model::{Decoder, WaeNet};

/// Why a model file cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file shrank while it was being read.
    #[error("{}: the file was cut short while it was being read (is something rewriting it in place? write a new file and rename it over the old one instead)", path.display())]
    Changed {
        /// The model file.
        path: PathBuf,
    },
    /// The file cannot be opened or read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The model file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The file has no bytes at all.
    #[error("{}: empty file (0 bytes), not a safetensors model", path.display())]
    Empty {
        /// The model file.
        path: PathBuf,
    },
    /// The safetensors header is unreadable, truncated, or points outside the file.
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Format {
        /// The model file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// Valid safetensors, but no wae-edge config in the metadata.
    #[error("{}: missing metadata: no `{CONFIG_KEY}` entry, so this is not a wae-edge model", path.display())]
    MissingConfig {
        /// The model file.
        path: PathBuf,
    },
    /// The config is not valid JSON for this format.
    #[error("{}: malformed model config in metadata: {reason}", path.display())]
    BadConfig {
        /// The model file.
        path: PathBuf,
        /// The JSON error.
        reason: String,
    },
    /// The config parses but is inconsistent (e.g. label count).
    #[error("{}: {cause}", path.display())]
    Config {
        /// The model file.
        path: PathBuf,
        /// What is inconsistent.
        cause: ConfigError,
    },
    /// A tensor the inference network needs is absent.
    #[error("{}: tensor `{name}` is missing (the config needs it)", path.display())]
    MissingTensor {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        name: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("{}: tensor `{name}` has shape {got:?}, the config expects {expected:?}", path.display())]
    Shape {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A tensor is not stored as F16.
    #[error("{}: tensor `{name}` is {got:?}, model files store F16", path.display())]
    Dtype {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Dtype in the file.
        got: Dtype,
    },
    /// A tensor holds NaN or infinite values: refused, since every logit would be garbage.
    #[error("{}: tensor `{name}` holds {count} NaN/infinite values; refusing to load", path.display())]
    NonFinite {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// How many values are not finite.
        count: usize,
    },
    /// Candle failed while building or writing.
    #[error("{}: {cause}", path.display())]
    Candle {
        /// The model file.
        path: PathBuf,
        /// Candle's error.
        cause: candle_core::Error,
    },
}

/// Records the name and shape of every tensor a builder asks for, returning zero-cost
/// broadcast zeros, so the expected tensor list comes from the model code itself.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<TensorList>>);

/// Tensor names with their shapes.
pub type TensorList = Vec<(String, Vec<usize>)>;

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("recorder lock")
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder cannot serve unshaped tensor {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn record(build: impl FnOnce(VarBuilder) -> candle_core::Result<()>) -> TensorList {
    let rec = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    build(vb).expect("a validated config builds");
    let mut v = rec.0.lock().expect("recorder lock").clone();
    v.sort();
    v
}

/// Name and shape of every tensor the inference network of a valid `config` reads.
pub fn inference_tensors(config: &ModelConfig) -> TensorList {
    record(|vb| WaeNet::new(config, vb).map(drop))
}

/// Name and shape of the training-only decoder's tensors (empty for single-branch kinds).
pub fn decoder_tensors(config: &ModelConfig) -> TensorList {
    if !config.arch.kind.has_branch() {
        return vec![];
    }
    record(|vb| Decoder::new(config, vb.pp("decoder")).map(drop))
}

/// Number of parameters in a list of shapes.
pub fn param_count(tensors: &[(String, Vec<usize>)]) -> u64 {
    tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// Compute dtype for a device: f32 on the CPU (candle's f16 CPU path converts to f32 internally
/// and is slower), f16 on GPUs.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// A validated, memory-mapped model file.
pub struct ModelFile {
    path: PathBuf,
    map: GuardedMap,
    config: ModelConfig,
}

impl ModelFile {
    /// Maps `path` and validates its header and config; reads no tensor data but the inference
    /// tensors' (for the finiteness check).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let io = |cause| WeightsError::Io {
            path: path.clone(),
            cause,
        };
        let file = crate::regular_file::open_regular(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(WeightsError::Empty { path });
        }
        let map = GuardedMap::new(&file).map_err(io)?;
        let (_, meta) =
            SafeTensors::read_metadata(map.bytes()).map_err(|e| WeightsError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CONFIG_KEY))
            .ok_or_else(|| WeightsError::MissingConfig { path: path.clone() })?;
        let config: ModelConfig =
            serde_json::from_str(json).map_err(|e| WeightsError::BadConfig {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        config.validate().map_err(|cause| WeightsError::Config {
            path: path.clone(),
            cause,
        })?;
        let file = ModelFile { path, map, config };
        file.intact(check_tensors(
            file.map.bytes(),
            &inference_tensors(&file.config),
            &file.path,
        ))?;
        Ok(file)
    }

    /// `result`, unless the file shrank while it was read: then what was read is not the file.
    fn intact<T>(&self, result: Result<T, WeightsError>) -> Result<T, WeightsError> {
        if self.map.damaged() {
            return Err(WeightsError::Changed {
                path: self.path.clone(),
            });
        }
        result
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> usize {
        self.map.bytes().len()
    }

    /// True for an empty mapping (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.map.bytes().is_empty()
    }

    /// One tensor's shape and values, f16 -> f32 (for exporters).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), WeightsError> {
        let (shape, values) = self.tensor_f16(name)?;
        Ok((shape, values.iter().map(|v| v.to_f32()).collect()))
    }

    /// One tensor's shape and its stored f16 values.
    pub fn tensor_f16(&self, name: &str) -> Result<(Vec<usize>, Vec<half::f16>), WeightsError> {
        self.intact(self.read_f16(name))
    }

    fn read_f16(&self, name: &str) -> Result<(Vec<usize>, Vec<half::f16>), WeightsError> {
        let st = SafeTensors::deserialize(self.map.bytes()).map_err(|e| WeightsError::Format {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|_| WeightsError::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })?;
        if view.dtype() != Dtype::F16 {
            return Err(WeightsError::Dtype {
                path: self.path.clone(),
                name: name.into(),
                got: view.dtype(),
            });
        }
        let values = view
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        Ok((view.shape().to_vec(), values))
    }

    /// Builds the inference network and the training-only decoder (for `decompose` and
    /// fine-tuning); fails if the file carries no valid decoder.
    pub fn build_with_decoder(self, device: &Device) -> Result<(WaeNet, Decoder), WeightsError> {
        if !self.config.arch.kind.has_branch() {
            return Err(WeightsError::MissingTensor {
                path: self.path.clone(),
                name: "decoder.* (this kind has no I_H)".into(),
            });
        }
        self.intact(check_tensors(
            self.map.bytes(),
            &decoder_tensors(&self.config),
            &self.path,
        ))?;
        let candle = |cause| WeightsError::Candle {
            path: self.path.clone(),
            cause,
        };
        let built = || {
            let vb =
                VarBuilder::from_slice_safetensors(self.map.bytes(), compute_dtype(device), device)
                    .map_err(candle)?;
            let dec = Decoder::new(&self.config, vb.pp("decoder")).map_err(candle)?;
            Ok((WaeNet::new(&self.config, vb).map_err(candle)?, dec))
        };
        self.intact(built())
    }

    /// Builds the inference network on `device` (f32 on CPU, f16 on GPUs) and drops the mapping.
    pub fn build(self, device: &Device) -> Result<WaeNet, WeightsError> {
        self.build_with(device, WaeNet::new)
    }

    /// Builds anything from the file's config and tensors on `device` (f32 on CPU, f16 on
    /// GPUs), then drops the mapping: for engines that read more than [`WaeNet`] does.
    pub fn build_with<T>(
        self,
        device: &Device,
        build: impl FnOnce(&ModelConfig, VarBuilder) -> candle_core::Result<T>,
    ) -> Result<T, WeightsError> {
        let candle = |cause| WeightsError::Candle {
            path: self.path.clone(),
            cause,
        };
        let built = || {
            let vb =
                VarBuilder::from_slice_safetensors(self.map.bytes(), compute_dtype(device), device)
                    .map_err(candle)?;
            build(&self.config, vb).map_err(candle)
        };
        self.intact(built())
    }
}

/// Checks that every listed tensor is present, F16, of the listed shape and finite.
fn check_tensors(
    bytes: &[u8],
    expected: &[(String, Vec<usize>)],
    path: &Path,
) -> Result<(), WeightsError> {
    let path = path.to_path_buf();
    let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    for (name, shape) in expected {
        let (name, expected) = (name.clone(), shape.clone());
        let view = st.tensor(&name).map_err(|_| WeightsError::MissingTensor {
            path: path.clone(),
            name: name.clone(),
        })?;
        if view.dtype() != Dtype::F16 {
            return Err(WeightsError::Dtype {
                path,
                name,
                got: view.dtype(),
            });
        }
        if view.shape() != expected.as_slice() {
            return Err(WeightsError::Shape {
                path,
                name,
                expected,
                got: view.shape().to_vec(),
            });
        }
        let count = count_non_finite_f16(view.data());
        if count > 0 {
            return Err(WeightsError::NonFinite { path, name, count });
        }
    }
    Ok(())
}

/// Counts NaN/Inf values in little-endian f16 bytes (exponent bits all ones).
fn count_non_finite_f16(bytes: &[u8]) -> usize {
    bytes
        .chunks_exact(2)
        .filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)
        .count()
}

/// Opens, validates and builds in one step.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<WaeNet, WeightsError> {
    ModelFile::open(path)?.build(device)
}

/// An owned tensor buffer in safetensors form (dtype, shape, little-endian bytes).
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A tensor converted to f16 safetensors bytes.
pub fn to_f16_raw(t: &Tensor) -> candle_core::Result<RawTensor> {
    let v = t
        .to_dtype(DType::F16)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<half::f16>()?;
    let data = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    Ok(RawTensor {
        dtype: Dtype::F16,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes `tensors` as an fp16 model file with `config` in its metadata, atomically: the bytes
/// go to a temporary file in the same directory, which is renamed over `path` only when complete.
pub fn save(
    path: impl AsRef<Path>,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let candle = |cause| WeightsError::Candle {
        path: path.to_path_buf(),
        cause,
    };
    let mut blobs = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_f16_raw(t)?)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(candle)?;
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([(CONFIG_KEY.to_string(), config.to_json())]);
    let bytes = safetensors::serialize(blobs.iter().map(|(n, b)| (n.as_str(), b)), Some(meta))
        .map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    crate::atomic::write(path, &bytes).map_err(|cause| WeightsError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// Writes the model file at `from` to `to` (possibly the same path, atomically) with its
/// tensors unchanged, byte for byte, and `config` in place of its config.
pub fn rewrite_config(from: &Path, to: &Path, config: &ModelConfig) -> Result<(), WeightsError> {
    let file = ModelFile::open(from)?;
    let format = |e: safetensors::SafeTensorError| WeightsError::Format {
        path: from.to_path_buf(),
        reason: e.to_string(),
    };
    let st = SafeTensors::deserialize(file.map.bytes()).map_err(format)?;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([(CONFIG_KEY.to_string(), config.to_json())]);
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(format)?;
    file.intact(Ok(()))?;
    crate::atomic::write(to, &bytes).map_err(|cause| WeightsError::Io {
        path: to.to_path_buf(),
        cause,
    })
}

/// Randomly initialised weights for `config` (He-normal convs, candle's defaults elsewhere),
/// decoder included for the two-branch kinds, with the config marked untrained. Deterministic in
/// `seed`.
pub fn random_model(
    config: &ModelConfig,
    seed: u64,
) -> candle_core::Result<(ModelConfig, HashMap<String, Tensor>)> {
    let init = crate::init::SeededInit::new(seed);
    let vb = init.var_builder();
    WaeNet::new(config, vb.clone())?;
    if config.arch.kind.has_branch() {
        Decoder::new(config, vb.pp("decoder"))?;
    }
    let mut config = config.clone();
    config.untrained = true;
    Ok((config, init.tensors()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn expected_tensors_come_from_the_builder() {
        let cfg = preset("wae-fashion").unwrap();
        let names: Vec<_> = inference_tensors(&cfg)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"encoder.low.weight".to_string()));
        assert!(names.contains(&"branch.s0.c0.weight".to_string()));
        assert!(names.contains(&"head_fuse.fc1.bias".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("decoder")));
        assert!(decoder_tensors(&cfg)
            .iter()
            .all(|(n, _)| n.starts_with("decoder.")));
        assert!(decoder_tensors(&preset("plain-fashion").unwrap()).is_empty());
    }

    #[test]
    fn non_finite_f16_is_counted() {
        let vals = [
            half::f16::from_f32(1.0),
            half::f16::NAN,
            half::f16::INFINITY,
            half::f16::from_f32(-2.0),
        ];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        assert_eq!(count_non_finite_f16(&bytes), 2);
    }

    #[test]
    fn vgg16_param_count_is_vgg16() {
        // torchvision's VGG16 has 138,357,544 parameters.
        assert_eq!(
            param_count(&inference_tensors(&preset("vgg16").unwrap())),
            138_357_544
        );
    }
}
