//! Sources through GStreamer, as on a Jetson: the board's CSI camera (`csi://N`, the Argus
//! stack's `nvarguscamerasrc`), IP cameras (`rtsp://`), video files (by extension or
//! `file://`), and any pipeline a user writes (`gst:PIPELINE`). `decodebin` picks the decoder,
//! a hardware one where it is ranked higher (`nvv4l2decoder` on a Jetson), and the pipeline
//! converts frames to the RGB the preprocessing wants before they reach wae-edge, which copies
//! each one once out of its buffer. Video files are not live: the classifier paces them and no
//! frame is dropped; cameras and RTSP are live and keep only the newest frame.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use image::RgbImage;

use super::{Frame, FrameSource, RtspTransport, SourceError, SourceOptions};
use crate::decode::FrameData;
use crate::preprocess::check_size;

/// Extensions streamed as video files.
pub const VIDEO_EXTENSIONS: [&str; 6] = ["mp4", "mkv", "avi", "mov", "webm", "m4v"];

/// How the frames reach wae-edge: converted to packed RGB on all cores (the conversion, not
/// the decoder, is the expensive part in software: 900 640x480 H.264 frames decode in 0.9 s,
/// and take 2.7 s with a one-thread conversion, 1.9 s with two), then an appsink named
/// `wae_sink`.
const TAIL: &str = "videoconvert n-threads=0 ! video/x-raw,format=RGB ! appsink name=wae_sink";

/// What a GStreamer URI names.
#[derive(Clone, Debug, PartialEq)]
pub enum GstUri {
    /// A Jetson CSI camera, by sensor id.
    Csi(u32),
    /// An RTSP stream (credentials kept for the connection, never shown).
    Rtsp(String),
    /// A video file.
    File(PathBuf),
    /// A pipeline the user wrote, up to where frames leave it.
    Pipeline(String),
}

/// Whether `path` has one of [`VIDEO_EXTENSIONS`].
pub fn is_video(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The GStreamer source a URI names, if it names one.
pub fn parse_uri(uri: &str) -> Result<Option<GstUri>, SourceError> {
    if let Some(n) = uri.strip_prefix("csi://") {
        let id = n.parse().map_err(|_| SourceError::BadUri {
            uri: uri.into(),
            reason: "csi://N takes a sensor number".into(),
        })?;
        return Ok(Some(GstUri::Csi(id)));
    }
    if uri.starts_with("rtsp://") || uri.starts_with("rtsps://") {
        return Ok(Some(GstUri::Rtsp(uri.into())));
    }
    if let Some(p) = uri.strip_prefix("gst:") {
        return Ok(Some(GstUri::Pipeline(p.trim().into())));
    }
    if uri.starts_with("file://") {
        init()?;
        let (path, _) = gst::glib::filename_from_uri(uri).map_err(|e| SourceError::BadUri {
            uri: uri.into(),
            reason: e.to_string(),
        })?;
        return Ok(Some(GstUri::File(path)));
    }
    let path = Path::new(uri);
    Ok(is_video(path).then(|| GstUri::File(path.into())))
}

/// `uri` without the user name and password of `scheme://user:pass@host/...`.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.into();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => uri.into(),
    }
}

/// Starts GStreamer once.
fn init() -> Result<(), SourceError> {
    gst::init().map_err(|e| SourceError::Gstreamer {
        source_name: "GStreamer".into(),
        reason: e.to_string(),
    })
}

/// A running pipeline that ends in an appsink.
pub struct GstSource {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    /// The source for messages (credentials removed).
    name: String,
    /// Secrets that must not reach a message (an RTSP password).
    secrets: Vec<String>,
    live: bool,
    /// Cameras and RTSP streams: an end of stream is a failure.
    endless: bool,
    looped: bool,
    index: u64,
    /// How long without a frame before `next_frame` gives up, so a dead stream's thread ends.
    patience: Duration,
}

impl GstSource {
    /// Builds and starts the pipeline for `uri`.
    pub fn open(uri: &GstUri, opts: &SourceOptions) -> Result<GstSource, SourceError> {
        init()?;
        let cam = &opts.camera;
        let (desc, name, live) = match uri {
            GstUri::Csi(id) => {
                if gst::ElementFactory::find("nvarguscamerasrc").is_none() {
                    return Err(SourceError::Gstreamer {
                        source_name: format!("csi://{id}"),
                        reason: "this system has no nvarguscamerasrc element: CSI cameras need a Jetson's Argus camera stack (JetPack); a USB camera is /dev/videoN".into(),
                    });
                }
                (
                    format!(
                        "nvarguscamerasrc sensor-id={id} ! video/x-raw(memory:NVMM),width={},height={},framerate={}/1 ! nvvidconv ! video/x-raw,format=BGRx ! {TAIL}",
                        cam.width, cam.height, cam.fps
                    ),
                    format!("csi://{id}"),
                    true,
                )
            }
            GstUri::Rtsp(_) => (
                format!(
                    "rtspsrc name=wae_src latency=200 protocols={} ! decodebin ! {TAIL}",
                    match opts.rtsp_transport {
                        RtspTransport::Tcp => "tcp",
                        RtspTransport::Udp => "udp",
                    }
                ),
                String::new(),
                true,
            ),
            GstUri::File(path) => (
                format!("filesrc name=wae_src ! decodebin ! {TAIL}"),
                path.display().to_string(),
                false,
            ),
            GstUri::Pipeline(p) => (
                format!("{p} ! {TAIL}"),
                format!("gst:{p}"),
                is_live_pipeline(p),
            ),
        };
        let (name, secrets) = match uri {
            GstUri::Rtsp(url) => (redact(url), password(url).into_iter().collect()),
            _ => (name, Vec::new()),
        };
        let fail = |reason: String| SourceError::Gstreamer {
            source_name: name.clone(),
            reason,
        };
        let pipeline = gst::parse::launch(&desc)
            .map_err(|e| fail(e.to_string()))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| fail("not a pipeline".into()))?;
        if let Some(src) = pipeline.by_name("wae_src") {
            match uri {
                GstUri::Rtsp(url) => src.set_property("location", url),
                GstUri::File(path) => {
                    if !path.is_file() {
                        return Err(SourceError::Input(super::InputError::NotFound(
                            path.clone(),
                        )));
                    }
                    src.set_property("location", path.to_string_lossy().as_ref())
                }
                _ => {}
            }
        }
        let sink = pipeline
            .by_name("wae_sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| fail("the pipeline has no appsink".into()))?;
        // Live sources keep only the newest frame; files wait for the classifier (the capture
        // thread takes a frame only when the last one was used), so none is dropped.
        sink.set_property("sync", false);
        sink.set_property("max-buffers", if live { 1u32 } else { 2u32 });
        sink.set_property("drop", live);
        let mut source = GstSource {
            pipeline,
            sink,
            name,
            secrets,
            live,
            endless: matches!(uri, GstUri::Csi(_) | GstUri::Rtsp(_)),
            looped: opts.looped && !live,
            index: 0,
            patience: opts.timeout + Duration::from_secs(1),
        };
        if source.pipeline.set_state(gst::State::Playing).is_err() {
            return Err(source
                .bus_error()
                .unwrap_or_else(|| source.error("the pipeline would not start".into())));
        }
        source.name = source.scrub(&source.name);
        Ok(source)
    }

    /// A source error naming this source, with secrets removed.
    fn error(&self, reason: String) -> SourceError {
        SourceError::Gstreamer {
            source_name: self.name.clone(),
            reason: self.scrub(&reason),
        }
    }

    fn scrub(&self, text: &str) -> String {
        self.secrets
            .iter()
            .filter(|s| !s.is_empty())
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
    }

    /// The first error on the bus, if any: the element that failed and why.
    fn bus_error(&self) -> Option<SourceError> {
        crate::gst_error::first_error(&self.pipeline).map(|e| self.error(e))
    }

    /// Copies a sample's RGB frame (rows may be padded) into a packed image.
    fn frame(&mut self, sample: &gst::Sample) -> Result<Frame, SourceError> {
        let caps = sample
            .caps()
            .ok_or_else(|| self.error("a frame without caps".into()))?;
        let info = gst_video::VideoInfo::from_caps(caps)
            .map_err(|e| self.error(format!("frame caps: {e}")))?;
        let (w, h) = (info.width(), info.height());
        check_size(w, h, u64::from(w) * u64::from(h) * 3, Path::new(&self.name))
            .map_err(|e| self.error(e.to_string()))?;
        let buffer = sample
            .buffer()
            .ok_or_else(|| self.error("a frame without data".into()))?;
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
            .map_err(|e| self.error(format!("mapping a frame: {e}")))?;
        let stride = frame.plane_stride()[0] as usize;
        let data = frame
            .plane_data(0)
            .map_err(|e| self.error(format!("frame data: {e}")))?;
        let row = w as usize * 3;
        let mut packed = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            let line = data
                .get(y * stride..y * stride + row)
                .ok_or_else(|| self.error("a frame shorter than its caps".into()))?;
            packed.extend_from_slice(line);
        }
        let img = RgbImage::from_raw(w, h, packed).expect("packed rows fill the image");
        let f = Frame {
            index: self.index,
            captured: Instant::now(),
            pts: buffer.pts().map(|t| Duration::from_nanos(t.nseconds())),
            data: FrameData::Rgb(img),
            name: PathBuf::from(&self.name),
        };
        self.index += 1;
        Ok(f)
    }
}

/// Whether a user pipeline is live: when it says so (`is-live=true`) or reads a camera or a
/// network stream; otherwise the classifier paces it, as a file.
fn is_live_pipeline(p: &str) -> bool {
    [
        "is-live=true",
        "v4l2src",
        "nvarguscamerasrc",
        "rtspsrc",
        "udpsrc",
        "souphttpsrc",
    ]
    .iter()
    .any(|k| p.contains(k))
}

/// The password of `scheme://user:pass@host/...`, if any.
fn password(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let userinfo = &rest[..rest[..rest.find('/').unwrap_or(rest.len())].rfind('@')?];
    Some(
        userinfo
            .split_once(':')
            .map_or(userinfo, |(_, p)| p)
            .to_string(),
    )
}

impl FrameSource for GstSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let since = Instant::now();
        loop {
            if let Some(sample) = self
                .sink
                .try_pull_sample(gst::ClockTime::from_mseconds(100))
            {
                return self.frame(&sample).map(Some);
            }
            if let Some(e) = self.bus_error() {
                return Err(e);
            }
            if self.sink.is_eos() {
                // A camera or an RTSP stream does not end: its end is a lost connection, which
                // `--reconnect` reopens. Files and user pipelines end normally.
                if self.endless {
                    return Err(self.error("the stream ended (connection closed?)".into()));
                }
                if !self.looped {
                    return Ok(None);
                }
                self.pipeline
                    .seek_simple(
                        gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                        gst::ClockTime::ZERO,
                    )
                    .map_err(|e| self.error(format!("rewinding for --loop: {e}")))?;
                continue;
            }
            if since.elapsed() > self.patience {
                return Err(
                    self.error(format!("no frame for {:.1} s", self.patience.as_secs_f64()))
                );
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} (GStreamer, {})",
            self.name,
            if self.live {
                "live"
            } else {
                "paced by the classifier"
            }
        )
    }

    fn is_live(&self) -> bool {
        self.live
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_like_jetson_inference() {
        assert_eq!(parse_uri("csi://1").unwrap(), Some(GstUri::Csi(1)));
        assert!(parse_uri("csi://x").is_err());
        assert_eq!(
            parse_uri("rtsp://cam/live").unwrap(),
            Some(GstUri::Rtsp("rtsp://cam/live".into()))
        );
        assert_eq!(
            parse_uri("clip.MP4").unwrap(),
            Some(GstUri::File("clip.MP4".into()))
        );
        assert_eq!(
            parse_uri("file:///tmp/my%20clip.mkv").unwrap(),
            Some(GstUri::File("/tmp/my clip.mkv".into()))
        );
        assert_eq!(
            parse_uri("gst: videotestsrc").unwrap(),
            Some(GstUri::Pipeline("videotestsrc".into()))
        );
        assert_eq!(parse_uri("frame.png").unwrap(), None);
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact("rtsp://admin:hunter2@10.0.0.2:554/live"),
            "rtsp://***@10.0.0.2:554/live"
        );
        assert_eq!(redact("rtsp://10.0.0.2/a@b"), "rtsp://10.0.0.2/a@b");
        assert_eq!(
            password("rtsp://admin:hunter2@10.0.0.2/x").as_deref(),
            Some("hunter2")
        );
        assert_eq!(password("rtsp://10.0.0.2/x@y"), None);
    }
}
