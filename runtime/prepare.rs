//! Turning a captured frame into the network's input: wait for the newest frame, decode it,
//! preprocess it. Either inline before each pass, or on a thread of its own that overlaps the
//! network when the network loses nothing measurable on one core fewer (`overlap_pays`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::capture::{LatestSlot, Taken};
use crate::classifier::Classifier;
use crate::decode::decode_frame;
use crate::pipeline::StreamError;

/// A frame decoded and preprocessed, ready for the network.
pub struct Prepared {
    /// Source frame index.
    pub index: u64,
    /// The decoded picture (for overlays).
    pub image: image::DynamicImage,
    /// The network's input.
    pub input: candle_core::Tensor,
    /// When the wait for this frame began.
    pub since: Instant,
    /// Wait for the source, decode, preprocess.
    pub times: [Duration; 3],
}

/// Waits up to `timeout` for the newest frame, checking `stop` every 50 ms, then decodes and
/// preprocesses it. `Ok(None)`: the source ended or `stop` was set.
pub(crate) fn prepare_next(
    frames: &LatestSlot,
    stop: &AtomicBool,
    clf: &Classifier,
    want: Option<(u32, u32)>,
    timeout: Duration,
) -> Result<Option<Prepared>, StreamError> {
    let since = Instant::now();
    let frame = loop {
        let left = timeout.saturating_sub(since.elapsed());
        match frames.take(left.min(Duration::from_millis(50))) {
            Taken::Frame(f) => break f,
            Taken::Closed => return Ok(None),
            Taken::Failed(e) => return Err(e.into()),
            Taken::TimedOut if stop.load(Ordering::Relaxed) => return Ok(None),
            Taken::TimedOut if left.is_zero() => {
                return Err(StreamError::Stalled(timeout.as_secs_f64()))
            }
            Taken::TimedOut => {}
        }
    };
    let t1 = Instant::now();
    let name = frame.name.clone();
    let image = decode_frame(frame.data, want, Path::new(&name))?;
    let t2 = Instant::now();
    let input = clf.preprocessor().to_tensor(&image, clf.device())?;
    Ok(Some(Prepared {
        index: frame.index,
        image,
        input,
        since,
        times: [t1 - since, t2 - t1, t2.elapsed()],
    }))
}

/// The preparing thread: fills `out` whenever it is empty, until the source ends, `stop`, or
/// the first error, which it passes on through `out`.
pub(crate) fn prepare_loop(
    frames: &LatestSlot,
    out: &LatestSlot<Prepared, StreamError>,
    stop: &AtomicBool,
    clf: &Classifier,
    want: Option<(u32, u32)>,
    timeout: Duration,
) {
    while out.wait_empty(stop) && !stop.load(Ordering::Relaxed) {
        match prepare_next(frames, stop, clf, want, timeout) {
            Ok(Some(p)) => out.put(p),
            Ok(None) => break,
            Err(e) => return out.close(Some(e)),
        }
    }
    out.close(None);
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
        clf.device(),
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
