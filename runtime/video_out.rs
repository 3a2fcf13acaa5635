//! Annotated video out (`stream --output FILE.mp4|.mkv`) through GStreamer: frames go into an
//! `appsrc`, are encoded as H.264 (the Jetson's hardware encoder where it exists, else x264)
//! and muxed into a temporary file beside the target, which is renamed over it only once the
//! muxer has finished it on end of stream. An interrupted or failed run leaves no file.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Why a video cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// Not `.mp4` or `.mkv`.
    #[error("{}: --output writes .mp4 or .mkv video", .0.display())]
    Extension(PathBuf),
    /// The temporary file could not be made or renamed.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The target.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
    /// GStreamer refused: a missing encoder or muxer, or an error while encoding.
    #[error("{}: {reason}", path.display())]
    Gstreamer {
        /// The target.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The muxer for a target's extension: `.mp4` or `.mkv`.
pub fn muxer(path: &Path) -> Result<&'static str, VideoError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("mp4") => Ok("mp4mux"),
        Some("mkv") => Ok("matroskamux"),
        _ => Err(VideoError::Extension(path.into())),
    }
}

/// A pipeline stopped when dropped.
struct Running(gst::Pipeline);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

/// An H.264 video being written.
pub struct VideoWriter {
    pipeline: Running,
    src: gst_app::AppSrc,
    target: PathBuf,
    tmp: tempfile::TempPath,
    _pending: crate::atomic::Pending,
    width: u32,
    height: u32,
    fps: u32,
    frames: u64,
}

impl VideoWriter {
    /// Starts a `width` x `height` video at `fps` frames a second (sizes are rounded down to
    /// even, as 4:2:0 encoders need).
    pub fn create(path: &Path, width: u32, height: u32, fps: u32) -> Result<Self, VideoError> {
        let fail = |reason: String| VideoError::Gstreamer {
            path: path.into(),
            reason,
        };
        let mux = muxer(path)?;
        gst::init().map_err(|e| fail(e.to_string()))?;
        let encoder = if gst::ElementFactory::find("nvv4l2h264enc").is_some() {
            // The Jetson's hardware encoder takes frames in NVMM memory.
            "nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! nvv4l2h264enc"
        } else {
            "videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=veryfast"
        };
        let (width, height) = ((width & !1).max(2), (height & !1).max(2));
        let (tmp, pending) =
            crate::atomic::pending_tempfile(path).map_err(|cause| VideoError::Io {
                path: path.into(),
                cause,
            })?;
        let tmp = tmp.into_temp_path();
        let desc = format!(
            "appsrc name=wae_src format=time block=true ! {encoder} ! h264parse ! {mux} ! filesink name=wae_sink"
        );
        let pipeline = gst::parse::launch(&desc)
            .map_err(|e| fail(format!("{e} (are the x264 and muxer plugins installed?)")))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| fail("not a pipeline".into()))?;
        let sink = pipeline
            .by_name("wae_sink")
            .ok_or_else(|| fail("no filesink".into()))?;
        sink.set_property("location", tmp.to_string_lossy().as_ref());
        let src = pipeline
            .by_name("wae_src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| fail("no appsrc".into()))?;
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, width, height)
            .fps(gst::Fraction::new(fps as i32, 1))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        src.set_caps(Some(&info.to_caps().map_err(|e| fail(e.to_string()))?));
        let writer = VideoWriter {
            pipeline: Running(pipeline),
            src,
            target: path.into(),
            tmp,
            _pending: pending,
            width,
            height,
            fps: fps.max(1),
            frames: 0,
        };
        writer
            .pipeline
            .0
            .set_state(gst::State::Playing)
            .map_err(|_| {
                writer
                    .bus_error()
                    .unwrap_or_else(|| fail("would not start".into()))
            })?;
        Ok(writer)
    }

    fn error(&self, reason: String) -> VideoError {
        VideoError::Gstreamer {
            path: self.target.clone(),
            reason,
        }
    }

    /// The first error on the bus, if any.
    fn bus_error(&self) -> Option<VideoError> {
        crate::gst_error::first_error(&self.pipeline.0).map(|e| self.error(e))
    }

    /// Appends a frame, resized to the video's size if it differs.
    pub fn push(&mut self, img: &RgbImage) -> Result<(), VideoError> {
        if let Some(e) = self.bus_error() {
            return Err(e);
        }
        let resized;
        let img = if img.dimensions() == (self.width, self.height) {
            img
        } else {
            resized = image::imageops::resize(
                img,
                self.width,
                self.height,
                image::imageops::FilterType::Triangle,
            );
            &resized
        };
        let mut buffer = gst::Buffer::from_mut_slice(img.as_raw().clone());
        {
            let b = buffer.get_mut().expect("a new buffer is writable");
            let frame = gst::ClockTime::SECOND / u64::from(self.fps);
            b.set_pts(frame * self.frames);
            b.set_duration(frame);
        }
        self.src.push_buffer(buffer).map_err(|e| {
            self.bus_error()
                .unwrap_or_else(|| self.error(e.to_string()))
        })?;
        self.frames += 1;
        Ok(())
    }

    /// Ends the stream, waits until the muxer has finished the file, and renames it over the
    /// target; returns the frames written.
    pub fn finish(self) -> Result<u64, VideoError> {
        self.src
            .end_of_stream()
            .map_err(|e| self.error(e.to_string()))?;
        let bus = self
            .pipeline
            .0
            .bus()
            .ok_or_else(|| self.error("no bus".into()))?;
        let done = bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        let _ = self.pipeline.0.set_state(gst::State::Null);
        match done.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => {}
            Some(gst::MessageView::Error(e)) => return Err(self.error(e.error().to_string())),
            _ => return Err(self.error("the muxer did not finish within a minute".into())),
        }
        let frames = self.frames;
        let target = self.target.clone();
        // The temporary file is private (0600); a video is an ordinary readable file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.tmp, std::fs::Permissions::from_mode(0o644)).map_err(
                |cause| VideoError::Io {
                    path: target.clone(),
                    cause,
                },
            )?;
        }
        self.tmp.persist(&target).map_err(|e| VideoError::Io {
            path: target.clone(),
            cause: e.error,
        })?;
        Ok(frames)
    }
}
