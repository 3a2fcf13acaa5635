//! Choosing where the network runs: `auto` takes CUDA, then Metal, then the CPU, the way
//! candle's examples do, and says so; asking for a back-end this build lacks names the feature.

use candle_core::Device;

/// A device the user asked for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    /// CUDA if built and present, then Metal, then CPU.
    Auto,
    /// The CPU (f32 compute).
    Cpu,
    /// NVIDIA GPU 0 (f16 compute); needs `--features cuda`.
    Cuda,
    /// Apple GPU (f16 compute); needs `--features metal`.
    Metal,
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The back-end was not compiled in.
    #[error("this build has no {name} support; rebuild with `cargo build --release --features {feature}`")]
    NotBuilt {
        /// Back-end name.
        name: &'static str,
        /// Cargo feature that enables it.
        feature: &'static str,
    },
    /// The back-end is compiled in but no device answered.
    #[error("no usable {name} device: {cause}")]
    Unavailable {
        /// Back-end name.
        name: &'static str,
        /// Candle's error.
        cause: candle_core::Error,
    },
}

/// Whether this binary was built with a back-end.
pub fn built_with(req: DeviceRequest) -> bool {
    match req {
        DeviceRequest::Auto | DeviceRequest::Cpu => true,
        DeviceRequest::Cuda => cfg!(feature = "cuda"),
        DeviceRequest::Metal => cfg!(feature = "metal"),
    }
}

/// Opens the requested device.
pub fn select(req: DeviceRequest) -> Result<Device, DeviceError> {
    match req {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda if !built_with(req) => Err(DeviceError::NotBuilt {
            name: "CUDA",
            feature: "cuda",
        }),
        DeviceRequest::Metal if !built_with(req) => Err(DeviceError::NotBuilt {
            name: "Metal",
            feature: "metal",
        }),
        DeviceRequest::Cuda => open_cuda().map_err(|cause| DeviceError::Unavailable {
            name: "CUDA",
            cause,
        }),
        DeviceRequest::Metal => Device::new_metal(0).map_err(|cause| DeviceError::Unavailable {
            name: "Metal",
            cause,
        }),
        DeviceRequest::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = open_cuda() {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// GPU 0 on a stream of its own (a graph cannot be captured on the per-thread default stream
/// `Device::new_cuda` uses), with cudarc's event tracking off before any tensor exists: each
/// allocation would otherwise create two events and each free wait on them, pure host cost when
/// everything runs on one stream.
#[cfg(feature = "cuda")]
fn open_cuda() -> candle_core::Result<Device> {
    let d = Device::new_cuda_with_stream(0)?;
    if let Device::Cuda(c) = &d {
        // SAFETY: wae-edge uses this one stream per device; no tensor crosses streams, so no
        // cross-stream ordering is left for the events to provide.
        unsafe { c.disable_event_tracking() };
    }
    Ok(d)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> candle_core::Result<Device> {
    Device::new_cuda(0)
}

/// A short name for a device, for logs and JSON.
pub fn describe(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_works_and_missing_backends_name_their_feature() {
        assert!(select(DeviceRequest::Cpu).unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let e = select(DeviceRequest::Cuda).unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            assert!(select(DeviceRequest::Metal)
                .unwrap_err()
                .to_string()
                .contains("--features metal"));
        }
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(select(DeviceRequest::Auto).unwrap().is_cpu());
        }
    }
}
