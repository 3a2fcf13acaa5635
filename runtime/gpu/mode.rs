//! `--cuda-graph auto|on|off`: whether the CUDA engine replays a captured graph or launches every
//! kernel eagerly, decided from what the device offers and whether the capture worked.

/// What the user asked for.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum GraphMode {
    /// A graph where the device supports capture, eager otherwise (said once on stderr).
    #[default]
    Auto,
    /// A graph or an error.
    On,
    /// Every kernel launched by the host each frame.
    Off,
}

/// How the CUDA engine runs a forward pass, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Execution {
    /// One copy in, one graph launch, one copy out.
    Graph,
    /// Kernels launched one by one (with the same persistent buffers).
    Eager {
        /// Why not a graph.
        reason: String,
    },
}

impl Execution {
    /// `graph` or `eager`, for reports and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Execution::Graph => "graph",
            Execution::Eager { .. } => "eager",
        }
    }
}

impl std::fmt::Display for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Execution::Graph => f.write_str("graph (one launch a frame)"),
            Execution::Eager { reason } => write!(f, "eager ({reason})"),
        }
    }
}

/// Why `--cuda-graph on` cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphError {
    /// Capture needs stream-ordered allocation (memory pools), which this device or driver lacks.
    #[error("--cuda-graph on: this GPU or driver has no stream-ordered memory allocation (memory pools), which capturing a graph needs; use --cuda-graph auto or off")]
    NoMemoryPools,
    /// Graphs exist only on CUDA.
    #[error("--cuda-graph on: the model runs on {device}; CUDA graphs need --device cuda")]
    NotCuda {
        /// Where the model runs.
        device: &'static str,
    },
    /// The capture itself failed.
    #[error("--cuda-graph on: capturing the forward pass failed: {0}")]
    CaptureFailed(String),
}

/// The plan before any capture: `pools` is whether the device allocates stream-ordered
/// (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`; freeing otherwise synchronises, which ends a
/// capture).
pub fn plan(mode: GraphMode, pools: bool) -> Result<Execution, GraphError> {
    match (mode, pools) {
        (GraphMode::Off, _) => Ok(Execution::Eager {
            reason: "--cuda-graph off".into(),
        }),
        (_, true) => Ok(Execution::Graph),
        (GraphMode::On, false) => Err(GraphError::NoMemoryPools),
        (GraphMode::Auto, false) => Ok(Execution::Eager {
            reason: "no stream-ordered allocation on this device, so no capture".into(),
        }),
    }
}

/// After a failed capture: `auto` falls back to eager and says why, `on` fails.
pub fn after_failed_capture(mode: GraphMode, cause: &str) -> Result<Execution, GraphError> {
    match mode {
        GraphMode::On => Err(GraphError::CaptureFailed(cause.into())),
        _ => Ok(Execution::Eager {
            reason: format!("capture failed: {cause}"),
        }),
    }
}

/// For a device other than CUDA: `on` is a mistake; `auto` and `off` mean nothing there.
pub fn check_device(mode: GraphMode, device: &'static str) -> Result<(), GraphError> {
    if mode == GraphMode::On && device != "cuda" {
        return Err(GraphError::NotCuda { device });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_a_graph_where_it_can_and_says_why_not_elsewhere() {
        assert_eq!(plan(GraphMode::Auto, true), Ok(Execution::Graph));
        let e = plan(GraphMode::Auto, false).unwrap();
        assert_eq!(e.name(), "eager");
        assert!(e.to_string().contains("stream-ordered"), "{e}");
    }

    #[test]
    fn on_fails_in_one_line_where_auto_falls_back() {
        assert_eq!(plan(GraphMode::On, true), Ok(Execution::Graph));
        let e = plan(GraphMode::On, false).unwrap_err().to_string();
        assert!(e.contains("memory pools") && !e.contains('\n'), "{e}");
        assert!(after_failed_capture(GraphMode::On, "operation not permitted").is_err());
        let fell = after_failed_capture(GraphMode::Auto, "operation not permitted").unwrap();
        assert!(fell
            .to_string()
            .contains("capture failed: operation not permitted"));
    }

    #[test]
    fn off_is_always_eager() {
        for pools in [false, true] {
            assert_eq!(plan(GraphMode::Off, pools).unwrap().name(), "eager");
        }
    }

    #[test]
    fn on_is_refused_off_cuda_and_the_others_are_harmless() {
        assert!(check_device(GraphMode::On, "cpu")
            .unwrap_err()
            .to_string()
            .contains("--device cuda"));
        assert!(check_device(GraphMode::Auto, "cpu").is_ok());
        assert!(check_device(GraphMode::Off, "metal").is_ok());
        assert!(check_device(GraphMode::On, "cuda").is_ok());
    }

    #[test]
    fn the_flag_parses() {
        use clap::ValueEnum;
        assert_eq!(GraphMode::from_str("on", true), Ok(GraphMode::On));
        assert!(GraphMode::from_str("sometimes", true).is_err());
    }
}
