//! Firmware profiles: one TOML per target device (`firmware-profiles/*.toml`), saying which
//! back-end and dtype to use, how many threads, what to ask the camera for, and the facts a user
//! of that board needs (how to build, which power mode to time in). The shipped profiles are
//! compiled into the binary; `--profile PATH` reads any other file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::{self, DeviceRequest};

/// Compute precision of a profile.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// Half precision (GPUs).
    F16,
    /// Single precision (CPUs).
    F32,
}

/// Camera pixel format to request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Motion JPEG: needed for HD at 30+ fps over USB 2.
    Mjpeg,
    /// Raw YUV 4:2:2: no decode cost, fine at 640x480 and below.
    Yuyv,
    /// Whatever the camera offers at the highest frame rate.
    Any,
}

/// What to ask the camera for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CameraRequest {
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Pixel format.
    pub format: PixelFormat,
    /// Frames per second.
    pub fps: u32,
}

/// How to build wae-edge for the board.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BuildFacts {
    /// Cargo features to enable.
    #[serde(default)]
    pub features: Vec<String>,
    /// Environment for the build, e.g. `CUDA_COMPUTE_CAP = "87"`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Anything else worth knowing.
    #[serde(default)]
    pub notes: String,
}

/// How to put the board in a repeatable power state before timing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PowerFacts {
    /// Commands to run once before timing.
    #[serde(default)]
    pub before_timing: Vec<String>,
    /// Explanation.
    #[serde(default)]
    pub notes: String,
}

/// One device profile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name, equal to the file stem.
    pub name: String,
    /// The board, in words.
    pub description: String,
    /// Back-end to run on.
    pub device: DeviceRequest,
    /// Compute precision (f32 on CPUs, f16 on GPUs).
    pub dtype: ComputeDtype,
    /// CPU threads for inference; 0 = one per core.
    pub threads: usize,
    /// Camera request for `stream`.
    pub camera: CameraRequest,
    /// Build facts.
    #[serde(default)]
    pub build: BuildFacts,
    /// Power facts.
    #[serde(default)]
    pub power: PowerFacts,
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file cannot be read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// Profile file.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
    /// Not valid TOML, unknown keys, wrong types.
    #[error("{}: {reason}", path.display())]
    Parse {
        /// Profile file.
        path: PathBuf,
        /// One-line parser message with the line number.
        reason: String,
    },
    /// Parses but contradicts itself.
    #[error("{}: invalid profile: {reason}", path.display())]
    Invalid {
        /// Profile file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Neither a shipped profile nor a file.
    #[error("unknown profile `{0}`: not a shipped profile (`wae-edge profiles` lists them) nor a readable .toml file")]
    Unknown(String),
    /// The profile needs a back-end this binary lacks.
    #[error("profile `{name}` asks for a device this build cannot use: {cause}")]
    Device {
        /// Profile name.
        name: String,
        /// The missing back-end.
        cause: device::DeviceError,
    },
}

/// The shipped profiles, compiled in: (file stem, TOML text).
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "jetson-orin-nano",
        include_str!("../firmware-profiles/jetson-orin-nano.toml"),
    ),
    (
        "jetson-xavier-nx",
        include_str!("../firmware-profiles/jetson-xavier-nx.toml"),
    ),
    (
        "jetson-nano",
        include_str!("../firmware-profiles/jetson-nano.toml"),
    ),
    (
        "apple-m-series",
        include_str!("../firmware-profiles/apple-m-series.toml"),
    ),
    (
        "x86-64-cpu",
        include_str!("../firmware-profiles/x86-64-cpu.toml"),
    ),
    (
        "raspberry-pi-5",
        include_str!("../firmware-profiles/raspberry-pi-5.toml"),
    ),
];

/// Largest profile file read: a profile is a few dozen lines.
const MAX_PROFILE_BYTES: u64 = 1 << 20;

const KNOWN_FEATURES: &[&str] = &["cuda", "metal", "camera", "train"];

impl Profile {
    /// Parses and validates profile text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        let p: Profile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let msg = e.message().replace('\n', " ");
            ProfileError::Parse {
                path: path.into(),
                reason: match line {
                    Some(l) => format!("line {l}: {msg}"),
                    None => msg,
                },
            }
        })?;
        p.validate().map_err(|reason| ProfileError::Invalid {
            path: path.into(),
            reason,
        })?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        let want = match self.device {
            DeviceRequest::Cpu => Some(ComputeDtype::F32),
            DeviceRequest::Cuda | DeviceRequest::Metal => Some(ComputeDtype::F16),
            DeviceRequest::Auto => None,
        };
        if want.is_some_and(|d| d != self.dtype) {
            return Err(format!(
                "dtype {:?} does not suit device {:?} (f32 on cpu, f16 on GPUs)",
                self.dtype, self.device
            ));
        }
        if self.threads > 1024 {
            return Err(format!("threads = {} is not a thread count", self.threads));
        }
        let c = &self.camera;
        if !(1..=8192).contains(&c.width)
            || !(1..=8192).contains(&c.height)
            || !(1..=480).contains(&c.fps)
        {
            return Err(format!(
                "camera {}x{}@{} outside 1..=8192 px and 1..=480 fps",
                c.width, c.height, c.fps
            ));
        }
        if let Some(f) = self
            .build
            .features
            .iter()
            .find(|f| !KNOWN_FEATURES.contains(&f.as_str()))
        {
            return Err(format!(
                "unknown cargo feature `{f}` (known: {})",
                KNOWN_FEATURES.join(", ")
            ));
        }
        for (req, feature) in [
            (DeviceRequest::Cuda, "cuda"),
            (DeviceRequest::Metal, "metal"),
        ] {
            if self.device == req && !self.build.features.iter().any(|f| f == feature) {
                return Err(format!(
                    "device {feature} needs build.features to include \"{feature}\""
                ));
            }
        }
        if let Some(cap) = self.build.env.get("CUDA_COMPUTE_CAP") {
            if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!(
                    "CUDA_COMPUTE_CAP = \"{cap}\" must be digits, e.g. \"87\""
                ));
            }
        }
        Ok(())
    }

    /// Finds a shipped profile by name, or reads a `.toml` file.
    pub fn resolve(name_or_path: &str) -> Result<Profile, ProfileError> {
        if let Some((stem, text)) = SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
            return Profile::parse(text, Path::new(&format!("firmware-profiles/{stem}.toml")));
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "toml") || path.components().count() > 1 {
            let io = |cause| ProfileError::Io {
                path: path.into(),
                cause,
            };
            let bytes = crate::regular_file::read_bounded(path, MAX_PROFILE_BYTES).map_err(io)?;
            let text = String::from_utf8(bytes).map_err(|e| {
                io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.utf8_error(),
                ))
            })?;
            return Profile::parse(&text, path);
        }
        Err(ProfileError::Unknown(name_or_path.to_string()))
    }

    /// Every shipped profile, parsed.
    pub fn shipped() -> Result<Vec<Profile>, ProfileError> {
        SHIPPED.iter().map(|(n, _)| Profile::resolve(n)).collect()
    }

    /// Checks the back-end is in this build and opens it.
    pub fn device(&self) -> Result<candle_core::Device, ProfileError> {
        device::select(self.device).map_err(|cause| ProfileError::Device {
            name: self.name.clone(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse_and_match_the_directory() {
        let profiles = Profile::shipped().unwrap();
        for p in &profiles {
            assert!(
                SHIPPED.iter().any(|(n, _)| *n == p.name),
                "name {} must equal its file stem",
                p.name
            );
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut shipped: Vec<String> = SHIPPED.iter().map(|(n, _)| n.to_string()).collect();
        shipped.sort();
        assert_eq!(
            on_disk, shipped,
            "every file in firmware-profiles/ is compiled in"
        );
        let orin = profiles
            .iter()
            .find(|p| p.name == "jetson-orin-nano")
            .unwrap();
        assert_eq!(orin.build.env["CUDA_COMPUTE_CAP"], "87");
    }

    #[test]
    fn unknown_keys_and_contradictions_are_errors() {
        let (_, text) = SHIPPED.iter().find(|(n, _)| *n == "x86-64-cpu").unwrap();
        let extra = format!("{text}\nturbo = true\n");
        let e = Profile::parse(&extra, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("turbo") && e.starts_with("x.toml: line"), "{e}");
        assert!(!e.contains('\n'));
        let f16_cpu = text.replace("dtype = \"f32\"", "dtype = \"f16\"");
        assert!(matches!(
            Profile::parse(&f16_cpu, Path::new("x.toml")),
            Err(ProfileError::Invalid { .. })
        ));
        assert!(matches!(
            Profile::resolve("no-such-board"),
            Err(ProfileError::Unknown(_))
        ));
    }

    #[test]
    fn a_gpu_profile_on_a_cpu_build_names_the_feature() {
        let orin = Profile::resolve("jetson-orin-nano").unwrap();
        if !cfg!(feature = "cuda") {
            let e = orin.device().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert!(Profile::resolve("x86-64-cpu")
            .unwrap()
            .device()
            .unwrap()
            .is_cpu());
    }
}
