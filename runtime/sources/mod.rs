//! Where frames come from. For `classify`: files, directories and globs expanded into a sorted
//! list of image paths, the way jetson-inference takes `"*.jpg"` or a directory. For `stream`: a
//! [`FrameSource`] opened from a jetson-inference-style URI (`/dev/video0`, `v4l2:///dev/video0`,
//! `camera:0`, a path, a glob, `synthetic:640x480`).

#[cfg(feature = "camera")]
mod camera;
mod files;
#[cfg(all(feature = "gstreamer", target_os = "linux"))]
pub mod gst;
mod synthetic;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use files::FileSource;
pub use synthetic::SyntheticSource;

use crate::decode::FrameData;
use crate::profiles::{CameraRequest, PixelFormat};

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Position in the stream, from 0.
    pub index: u64,
    /// When the source produced it.
    pub captured: Instant,
    /// Where the frame sits in its stream (a video's presentation timestamp), if the source
    /// says.
    pub pts: Option<Duration>,
    /// The payload, not yet decoded.
    pub data: FrameData,
    /// Where it came from (file name, device), for messages.
    pub name: PathBuf,
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URI names nothing we can open.
    #[error("{0}")]
    Input(#[from] InputError),
    /// A malformed `synthetic:` URI or option.
    #[error("bad source `{uri}`: {reason}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// A URI scheme no source of this build reads (the URI itself is not repeated: it may hold
    /// credentials).
    #[error("{0}:// sources are not supported by this build; it reads {SUPPORTED}")]
    UnsupportedScheme(String),
    /// A camera URI in a build without the `camera` feature.
    #[error("`{0}` is a camera, but this build has no camera support; rebuild with `cargo build --release --features camera`")]
    NoCameraSupport(String),
    /// The camera could not be opened or stopped delivering.
    #[error("camera {device}: {reason}")]
    Camera {
        /// Device name.
        device: String,
        /// Back-end message.
        reason: String,
    },
    /// A GStreamer source failed: the pipeline would not build or start, or an element
    /// reported an error (a missing plugin, an unreachable host, a corrupt file).
    #[error("{source_name}: {reason}")]
    Gstreamer {
        /// The source, credentials removed.
        source_name: String,
        /// The element that failed and why.
        reason: String,
    },
    /// A file could not be read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
}

/// Anything that yields frames: cameras, files, synthetic patterns.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` at the end of the stream. May block until one is ready.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
    /// What the source is, with the format actually granted (for cameras).
    fn describe(&self) -> String;
    /// Live sources (cameras, paced streams) run at their own rate and stale frames are dropped;
    /// others (files, unpaced synthetic) wait for the consumer, so nothing is dropped.
    fn is_live(&self) -> bool {
        true
    }
}

/// Options for opening a stream source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Camera request (from the profile or flags).
    pub camera: CameraRequest,
    /// Restart file lists (and video files) at the end.
    pub looped: bool,
    /// How RTSP streams are carried.
    pub rtsp_transport: RtspTransport,
    /// How long a source may deliver nothing before it is given up (the stream's stall timeout).
    pub timeout: Duration,
}

/// RTSP over TCP (interleaved) or UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RtspTransport {
    /// Interleaved in the RTSP connection: works through NAT and firewalls.
    #[default]
    Tcp,
    /// Separate UDP ports: lower latency on a clean LAN.
    Udp,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            camera: CameraRequest {
                width: 640,
                height: 480,
                format: PixelFormat::Yuyv,
                fps: 30,
            },
            looped: false,
            rtsp_transport: RtspTransport::Tcp,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The camera index a URI names, if it names a camera.
pub fn camera_index(uri: &str) -> Option<u32> {
    let dev = uri.strip_prefix("v4l2://").unwrap_or(uri);
    if let Some(n) = dev.strip_prefix("/dev/video") {
        return n.parse().ok();
    }
    uri.strip_prefix("camera:").and_then(|n| n.parse().ok())
}

/// Whether this build reads sources through GStreamer.
pub const GSTREAMER: bool = cfg!(all(feature = "gstreamer", target_os = "linux"));

/// The sources this build reads, for messages.
pub const SUPPORTED: &str = if GSTREAMER {
    "/dev/videoN, v4l2:///dev/videoN, camera:N, csi://N, rtsp://, video files (.mp4 .mkv .avi .mov .webm .m4v) and file://, gst:PIPELINE, synthetic:WxH[@FPS][+N], synthetic-mjpeg:WxH[@FPS][+N], image files, directories and globs"
} else {
    "/dev/videoN, v4l2:///dev/videoN, camera:N, synthetic:WxH[@FPS][+N], synthetic-mjpeg:WxH[@FPS][+N], image files, directories and globs (build with the `gstreamer` feature for csi://, rtsp://, video files and gst: pipelines)"
};

/// Schemes this build's stream sources read.
const SCHEMES: &[&str] = if GSTREAMER {
    &["v4l2", "csi", "rtsp", "rtsps", "file"]
} else {
    &["v4l2"]
};

/// The scheme of a `scheme://...` URI, if `uri` is one.
pub fn uri_scheme(uri: &str) -> Option<&str> {
    let (scheme, _) = uri.split_once("://")?;
    (!scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// The scheme of a `scheme://...` URI that no stream source of this build reads, if `uri` is
/// one.
pub fn unsupported_scheme(uri: &str) -> Option<&str> {
    uri_scheme(uri).filter(|s| !SCHEMES.contains(s))
}

/// Opens a source from a URI.
pub fn open_source(uri: &str, opts: &SourceOptions) -> Result<Box<dyn FrameSource>, SourceError> {
    if let Some(scheme) = unsupported_scheme(uri) {
        return Err(SourceError::UnsupportedScheme(scheme.into()));
    }
    if let Some(spec) = uri.strip_prefix("synthetic-mjpeg:") {
        let s = SyntheticSource::parse(spec).map_err(|reason| SourceError::BadUri {
            uri: uri.into(),
            reason,
        })?;
        return Ok(Box::new(s.into_mjpeg()));
    }
    if let Some(spec) = uri.strip_prefix("synthetic:") {
        return Ok(Box::new(SyntheticSource::parse(spec).map_err(
            |reason| SourceError::BadUri {
                uri: uri.into(),
                reason,
            },
        )?));
    }
    #[cfg(all(feature = "gstreamer", target_os = "linux"))]
    if let Some(g) = gst::parse_uri(uri)? {
        // A file:// URI of an image is an image file.
        match g {
            gst::GstUri::File(ref p) if is_image(p) => {
                return Ok(Box::new(FileSource::new(vec![p.clone()], opts.looped)))
            }
            g => return Ok(Box::new(gst::GstSource::open(&g, opts)?)),
        }
    }
    if let Some(index) = camera_index(uri) {
        #[cfg(feature = "camera")]
        return Ok(Box::new(camera::CameraSource::open(index, &opts.camera)?));
        #[cfg(not(feature = "camera"))]
        {
            let _ = index;
            return Err(SourceError::NoCameraSupport(uri.into()));
        }
    }
    let paths = expand_inputs(&[PathBuf::from(uri)])?;
    Ok(Box::new(FileSource::new(paths, opts.looped)))
}

/// Extensions taken from a directory (explicit files are decoded whatever their name).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Why an input argument gives no images.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Not a file, not a directory, no glob match.
    #[error("{}: no such file or directory", .0.display())]
    NotFound(PathBuf),
    /// A directory without a single image to read.
    #[error("{}: no {} files in this directory", .0.display(), IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", "))]
    NoImages(PathBuf),
    /// A `scheme://` URI where files are expected (the URI is not repeated: it may hold
    /// credentials).
    #[error("{0}:// is not a file; this command reads image files, directories and globs")]
    Uri(String),
    /// A glob that matched nothing.
    #[error("{0}: no files match this pattern")]
    NoMatch(String),
    /// A malformed glob.
    #[error("{0}: bad glob pattern: {1}")]
    BadPattern(String, String),
    /// A directory that cannot be listed.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Expands files, directories (their images, sorted) and globs (sorted) into image paths.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = Vec::new();
    for input in inputs {
        if let Some(scheme) = input.to_str().and_then(uri_scheme) {
            return Err(InputError::Uri(scheme.into()));
        }
        if input.is_dir() {
            let io = |cause| InputError::Io {
                path: input.clone(),
                cause,
            };
            let mut found = Vec::new();
            for entry in std::fs::read_dir(input).map_err(io)? {
                let path = entry.map_err(io)?.path();
                if path.is_file() && is_image(&path) {
                    found.push(path);
                }
            }
            if found.is_empty() {
                return Err(InputError::NoImages(input.clone()));
            }
            found.sort();
            out.extend(found);
        } else if input.exists() {
            out.push(input.clone());
        } else if let Some(pattern) = input.to_str().filter(|s| s.contains(['*', '?', '['])) {
            let paths = glob::glob(pattern)
                .map_err(|e| InputError::BadPattern(pattern.into(), e.msg.into()))?;
            let mut found: Vec<PathBuf> = paths
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            if found.is_empty() {
                return Err(InputError::NoMatch(pattern.into()));
            }
            found.sort();
            out.extend(found);
        } else {
            return Err(InputError::NotFound(input.clone()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_like_jetson_inference() {
        assert_eq!(camera_index("/dev/video0"), Some(0));
        assert_eq!(camera_index("v4l2:///dev/video2"), Some(2));
        assert_eq!(camera_index("camera:1"), Some(1));
        assert_eq!(camera_index("frames/*.jpg"), None);
        let mut s = open_source("synthetic:64x48", &SourceOptions::default()).unwrap();
        assert!(s.describe().contains("64x48"));
        assert!(s.next_frame().unwrap().is_some());
        let mut m = open_source("synthetic-mjpeg:64x48+2", &SourceOptions::default()).unwrap();
        let f = m.next_frame().unwrap().unwrap();
        assert!(matches!(f.data, crate::decode::FrameData::Mjpeg(_)));
        let img = crate::decode::decode_frame(f.data, None, Path::new("m")).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
        assert!(matches!(
            open_source("synthetic:64", &SourceOptions::default()),
            Err(SourceError::BadUri { .. })
        ));
        if !cfg!(feature = "camera") {
            let e = open_source("camera:0", &SourceOptions::default())
                .err()
                .unwrap();
            assert!(e.to_string().contains("--features camera"));
        }
    }

    #[test]
    fn directories_globs_and_files() {
        let d = tempfile::tempdir().unwrap();
        for n in ["b.png", "a.JPG", "notes.txt"] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        let got = expand_inputs(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.JPG", "b.png"]);
        let glob = d.path().join("*.png");
        assert_eq!(expand_inputs(&[glob]).unwrap().len(), 1);
        let txt = d.path().join("notes.txt");
        assert_eq!(
            expand_inputs(std::slice::from_ref(&txt)).unwrap(),
            vec![txt]
        );
        assert!(matches!(
            expand_inputs(&[d.path().join("*.gif")]),
            Err(InputError::NoMatch(_))
        ));
        assert!(matches!(
            expand_inputs(&[d.path().join("missing.png")]),
            Err(InputError::NotFound(_))
        ));
    }
}
