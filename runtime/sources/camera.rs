//! USB cameras through nokhwa (V4L2 on Linux, AVFoundation on macOS). Asks for the profile's
//! format (MJPEG for high resolutions, YUYV at 640x480 and below), reports what was granted, and
//! hands frames over undecoded so decoding happens off the capture thread.

use std::time::Instant;

use nokhwa::utils::{
    CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
};
use nokhwa::Camera;

use super::{Frame, FrameSource, SourceError};
use crate::decode::FrameData;
use crate::profiles::{CameraRequest, PixelFormat};

/// An open, streaming camera.
pub struct CameraSource {
    camera: Camera,
    device: String,
    granted: CameraFormat,
    index: u64,
}

impl CameraSource {
    /// Opens camera `index` with the closest format to `req` and starts streaming.
    pub fn open(index: u32, req: &CameraRequest) -> Result<Self, SourceError> {
        let device = format!("/dev/video{index}");
        let err = |e: nokhwa::NokhwaError| SourceError::Camera {
            device: device.clone(),
            reason: e.to_string().replace('\n', " "),
        };
        let formats: &[FrameFormat] = match req.format {
            PixelFormat::Mjpeg => &[FrameFormat::MJPEG],
            PixelFormat::Yuyv => &[FrameFormat::YUYV],
            PixelFormat::Any => &[FrameFormat::MJPEG, FrameFormat::YUYV],
        };
        let want = CameraFormat::new(Resolution::new(req.width, req.height), formats[0], req.fps);
        let requested = RequestedFormat::with_formats(RequestedFormatType::Closest(want), formats);
        let mut camera = Camera::new(CameraIndex::Index(index), requested).map_err(err)?;
        camera.open_stream().map_err(err)?;
        let granted = camera.camera_format();
        Ok(CameraSource {
            camera,
            device,
            granted,
            index: 0,
        })
    }
}

impl FrameSource for CameraSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let raw = self.camera.frame_raw().map_err(|e| SourceError::Camera {
            device: self.device.clone(),
            reason: format!("capture failed (unplugged?): {e}"),
        })?;
        let res = self.granted.resolution();
        let data = match self.granted.format() {
            FrameFormat::MJPEG => FrameData::Mjpeg(raw.into_owned()),
            FrameFormat::YUYV => FrameData::Yuyv {
                width: res.width(),
                height: res.height(),
                bytes: raw.into_owned(),
            },
            other => {
                return Err(SourceError::Camera {
                    device: self.device.clone(),
                    reason: format!("granted format {other} is not MJPEG or YUYV"),
                })
            }
        };
        let f = Frame {
            index: self.index,
            captured: Instant::now(),
            pts: None,
            data,
            name: self.device.clone().into(),
        };
        self.index += 1;
        Ok(Some(f))
    }

    fn describe(&self) -> String {
        let r = self.granted.resolution();
        format!(
            "camera {}: {}x{} {} at {} fps (granted)",
            self.device,
            r.width(),
            r.height(),
            self.granted.format(),
            self.granted.frame_rate()
        )
    }
}
