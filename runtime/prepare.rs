//! Turning a captured frame into the network's input: wait for the newest frame, decode it,
//! preprocess it. Either inline before each pass, or on a thread of its own that overlaps the
//! network when the network loses nothing measurable on one core fewer (`overlap_pays`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::capture::{LatestSlot, Taken};
use crate::classifier::Classifier;
use crate::decode::decode_frame;
use crate::pipeline::StreamError;
use crate::sources::Frame;

/// A frame decoded and preprocessed, ready for the network.
pub struct Prepared {
    /// Source frame index.
    pub index: u64,
    /// The decoded picture (for overlays).
    pub image: image::DynamicImage,
    /// The network's input.
    pub input: candle_core::Tensor,
    /// Why the picture is far from the model's training pictures, if it is.
    pub warning: Option<String>,
    /// When the wait for this frame began.
    pub since: Instant,
    /// The source's timestamp of the frame, if it has one.
    pub pts: Option<Duration>,
    /// Wait for the source, decode, preprocess.
    pub times: [Duration; 3],
}

/// How a stream's frames are made into inputs, and the count of those that could not be.
pub(crate) struct Preparer<'a> {
    pub clf: &'a Classifier,
    /// The size MJPEG frames may be decoded down to.
    pub want: Option<(u32, u32)>,
    /// Longest wait for a frame.
    pub timeout: Duration,
    /// Undecodable frames in a row that end the source ([`StreamError::BadFrames`]).
    pub max_bad: u32,
    /// Undecodable frames skipped, over the whole stream.
    pub bad: AtomicU64,
    /// Undecodable frames since the last good one.
    pub bad_run: AtomicU32,
}

impl Preparer<'_> {
    /// Waits up to the timeout for the newest frame, checking `stop` every 50 ms, then decodes
    /// and preprocesses it. A frame that cannot be decoded is skipped and counted, and the next
    /// one waited for, until `max_bad` fail in a row. `Ok(None)`: the source ended or `stop`
    /// was set.
    pub fn next(
        &self,
        frames: &LatestSlot,
        stop: &AtomicBool,
    ) -> Result<Option<Prepared>, StreamError> {
        let since = Instant::now();
        loop {
            let Some(frame) = self.take(frames, stop, since)? else {
                return Ok(None);
            };
            let t1 = Instant::now();
            let image = match decode_frame(frame.data, self.want, Path::new(&frame.name)) {
                Ok(image) => image,
                Err(e) => {
                    self.skip(frame.index, e)?;
                    continue;
                }
            };
            self.bad_run.store(0, Ordering::Relaxed);
            let t2 = Instant::now();
            let (input, warning) = self.clf.input_and_warning(&image)?;
            return Ok(Some(Prepared {
                index: frame.index,
                pts: frame.pts,
                image,
                input,
                warning,
                since,
                times: [t1 - since, t2 - t1, t2.elapsed()],
            }));
        }
    }

    /// The newest frame, waiting until `since` + the timeout at most.
    fn take(
        &self,
        frames: &LatestSlot,
        stop: &AtomicBool,
        since: Instant,
    ) -> Result<Option<Frame>, StreamError> {
        loop {
            let left = self.timeout.saturating_sub(since.elapsed());
            match frames.take(left.min(Duration::from_millis(50))) {
                Taken::Frame(f) => return Ok(Some(f)),
                Taken::Closed => return Ok(None),
                Taken::Failed(e) => return Err(e.into()),
                Taken::TimedOut if stop.load(Ordering::Relaxed) => return Ok(None),
                Taken::TimedOut if left.is_zero() => {
                    return Err(StreamError::Stalled(self.timeout.as_secs_f64()))
                }
                Taken::TimedOut => {}
            }
        }
    }

    /// Counts an undecodable frame; an error once `max_bad` came in a row. The first few are
    /// reported on stderr, then every hundredth, so a flaky camera cannot flood a log.
    fn skip(&self, index: u64, e: crate::preprocess::ImageError) -> Result<(), StreamError> {
        let total = self.bad.fetch_add(1, Ordering::Relaxed) + 1;
        let run = self.bad_run.fetch_add(1, Ordering::Relaxed) + 1;
        if run >= self.max_bad {
            return Err(StreamError::BadFrames {
                count: run,
                last: e,
            });
        }
        if total <= 3 || total.is_multiple_of(100) {
            eprintln!(
                "skipping frame {index} ({total} skipped so far): {}",
                crate::terminal::Escaped(&e)
            );
        }
        Ok(())
    }

    /// The preparing thread: fills `out` whenever it is empty, until the source ends, `stop`,
    /// or the first error, which it passes on through `out`.
    pub fn run(
        &self,
        frames: &LatestSlot,
        out: &LatestSlot<Prepared, StreamError>,
        stop: &AtomicBool,
    ) {
        while out.wait_empty(stop) && !stop.load(Ordering::Relaxed) {
            match self.next(frames, stop) {
                Ok(Some(p)) => out.put(p),
                Ok(None) => break,
                Err(e) => return out.close(Some(e)),
            }
        }
        out.close(None);
    }
}

/// Networks slower than this run with the inline layout: preparing a frame (about 0.05 ms) is
/// then a small share, and calibrating would delay the first frame.
const OVERLAP_MAX_PASS: Duration = Duration::from_millis(5);

/// Whether the network loses at most 5% + 20 us on all cores but one, measured on the model's
/// own input: then the spare core can prepare the next frame (about 0.03-0.05 ms for a 640x480
/// frame) while the network runs, and the stream gains more than the network loses.
pub fn overlap_pays(clf: &Classifier) -> bool {
    if !clf.device().is_cpu() {
        return false;
    }
    let Some(pool) = network_pool() else {
        return false;
    };
    let i = clf.config().input;
    let Ok(x) = candle_core::Tensor::zeros(
        (i.channels, i.height, i.width),
        candle_core::DType::F32,
        clf.input_device(),
    ) else {
        return false;
    };
    let median = |runs: usize| -> Option<Duration> {
        let mut t: Vec<Duration> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                clf.classify_timed(&x, 1).map(|_| t0.elapsed())
            })
            .collect::<Result<_, _>>()
            .ok()?;
        t.sort();
        Some(t[t.len() / 2])
    };
    let decide = || {
        median(3)?;
        if median(3)? > OVERLAP_MAX_PASS {
            return Some(false);
        }
        let all = median(41)?;
        let fewer = pool.install(|| median(41))?;
        Some(fewer.as_secs_f64() <= 1.05 * all.as_secs_f64() + 20e-6)
    };
    decide().unwrap_or(false)
}

/// A pool of all cores but one, for the network while a frame is being prepared.
pub(crate) fn network_pool() -> Option<rayon::ThreadPool> {
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads - 1)
        .thread_name(|i| format!("network-{i}"))
        .build()
        .ok()
}
