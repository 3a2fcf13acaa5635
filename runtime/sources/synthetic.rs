//! Deterministic synthetic frames for tests, benchmarks and demos without a camera: a fixed
//! seeded noise background with a bright square and a gradient bar that move every frame.

use std::time::{Duration, Instant};

use image::RgbImage;
use rand::{Rng, SeedableRng};

use super::{Frame, FrameSource, SourceError};
use crate::decode::FrameData;

/// `synthetic:WxH[@FPS][+N]`: W x H RGB frames, paced at FPS if given, N frames if given.
/// `synthetic-mjpeg:...` delivers the same frames as Motion-JPEG, like an HD webcam.
pub struct SyntheticSource {
    background: RgbImage,
    index: u64,
    pace: Option<Duration>,
    limit: Option<u64>,
    next_due: Option<Instant>,
    /// Pre-encoded JPEG frames, cycled (encoding is not what is being measured).
    mjpeg: Vec<Vec<u8>>,
    /// Pre-rendered RGB frames, cycled: like a camera's DMA, producing a frame costs a copy,
    /// not CPU work that would compete with the classifier.
    ring: Vec<RgbImage>,
}

/// Frames in the pre-rendered and pre-encoded rings, at most.
const RING: u64 = 16;
/// Bytes the pre-rendered ring may hold: large frames get fewer ring slots (at least 2).
const RING_BYTES: u64 = 128 << 20;
/// The largest side of a synthetic frame: a 4096x4096 frame is 48 MiB, so the ring, the
/// background and a frame in flight stay within a few hundred MiB.
pub const MAX_SIDE: u32 = 4096;

impl SyntheticSource {
    /// A source of `width` x `height` frames, unpaced and endless.
    pub fn new(width: u32, height: u32) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let background = RgbImage::from_fn(width, height, |_, _| {
            let v: u8 = rng.random_range(0..64);
            image::Rgb([v, v, v])
        });
        SyntheticSource {
            background,
            index: 0,
            pace: None,
            limit: None,
            next_due: None,
            mjpeg: vec![],
            ring: vec![],
        }
        .with_ring()
    }

    fn with_ring(mut self) -> Self {
        let frame = u64::from(self.background.width()) * u64::from(self.background.height()) * 3;
        let slots = (RING_BYTES / frame.max(1)).clamp(2, RING);
        self.ring = (0..slots).map(|i| self.render(i)).collect();
        self
    }

    /// Parses `WxH[@FPS][+N]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (rest, limit) = match spec.split_once('+') {
            Some((r, n)) => (
                r,
                Some(
                    n.parse::<u64>()
                        .map_err(|_| format!("bad frame count `{n}`"))?,
                ),
            ),
            None => (spec, None),
        };
        let (size, fps) = match rest.split_once('@') {
            Some((s, f)) => (
                s,
                Some(f.parse::<f64>().map_err(|_| format!("bad fps `{f}`"))?),
            ),
            None => (rest, None),
        };
        let (w, h) = size
            .split_once('x')
            .ok_or_else(|| format!("size `{size}` is not WxH"))?;
        let parse = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|n| (8..=MAX_SIDE).contains(n))
                .ok_or_else(|| format!("side `{v}` not in 8..={MAX_SIDE}"))
        };
        let mut s = SyntheticSource::new(parse(w)?, parse(h)?);
        if let Some(f) = fps {
            if !(f > 0.0 && f <= 10_000.0) {
                return Err(format!("fps {f} not in (0, 10000]"));
            }
            s.pace = Some(Duration::from_secs_f64(1.0 / f));
        }
        s.limit = limit;
        Ok(s)
    }

    /// Switches to Motion-JPEG output (quality 85), pre-encoding a ring of frames.
    pub fn into_mjpeg(mut self) -> Self {
        self.mjpeg = self
            .ring
            .iter()
            .map(|frame| {
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                    .encode_image(frame)
                    .expect("encoding to memory");
                out
            })
            .collect();
        self
    }

    /// Renders frame `i`.
    pub fn render(&self, i: u64) -> RgbImage {
        let mut img = self.background.clone();
        let (w, h) = img.dimensions();
        let side = (w.min(h) / 4).max(2);
        let x0 = (i * 7 % (w - side) as u64) as u32;
        let y0 = (i * 5 % (h - side) as u64) as u32;
        for y in y0..y0 + side {
            for x in x0..x0 + side {
                img.put_pixel(x, y, image::Rgb([230, 230, 230]));
            }
        }
        let bar = (i * 3 % h as u64) as u32;
        for y in bar..(bar + h / 16).min(h) {
            for x in 0..w {
                let v = (x * 255 / w) as u8;
                img.put_pixel(x, y, image::Rgb([v, 255 - v, 128]));
            }
        }
        img
    }
}

impl FrameSource for SyntheticSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.limit.is_some_and(|l| self.index >= l) {
            return Ok(None);
        }
        if let Some(p) = self.pace {
            let due = self.next_due.unwrap_or_else(Instant::now);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            self.next_due = Some(due.max(Instant::now() - p) + p);
        }
        let data = if self.mjpeg.is_empty() {
            FrameData::Rgb(self.ring[(self.index % self.ring.len() as u64) as usize].clone())
        } else {
            FrameData::Mjpeg(self.mjpeg[(self.index % self.mjpeg.len() as u64) as usize].clone())
        };
        let f = Frame {
            index: self.index,
            captured: Instant::now(),
            pts: None,
            data,
            name: "synthetic".into(),
        };
        self.index += 1;
        Ok(Some(f))
    }

    fn is_live(&self) -> bool {
        self.pace.is_some()
    }

    fn describe(&self) -> String {
        let (w, h) = self.background.dimensions();
        let kind = if self.mjpeg.is_empty() {
            "RGB"
        } else {
            "MJPEG"
        };
        match self.pace {
            Some(p) => format!(
                "synthetic {w}x{h} {kind} at {:.1} fps",
                1.0 / p.as_secs_f64()
            ),
            None => format!("synthetic {w}x{h} {kind}, unpaced"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_moving_and_bounded() {
        let mut a = SyntheticSource::parse("64x48+3").unwrap();
        let b = SyntheticSource::parse("64x48").unwrap();
        let f0 = a.next_frame().unwrap().unwrap();
        let FrameData::Rgb(img0) = &f0.data else {
            panic!("rgb")
        };
        assert_eq!(img0, &b.render(0), "same frame from the same index");
        let f1 = a.next_frame().unwrap().unwrap();
        let FrameData::Rgb(img1) = &f1.data else {
            panic!("rgb")
        };
        assert_eq!(img1, &b.render(1));
        assert_ne!(b.render(0), b.render(1), "frames move");
        assert!(a.next_frame().unwrap().is_some());
        assert!(
            a.next_frame().unwrap().is_none(),
            "+3 ends after three frames"
        );
        assert!(SyntheticSource::parse("64x48@0").is_err());
        assert!(SyntheticSource::parse("4x4").is_err());
    }
}
