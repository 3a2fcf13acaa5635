//! The streaming pipeline: capture on its own thread into a latest-frame slot (never a queue:
//! a slow classifier drops stale frames instead of falling behind), then decode, preprocess and
//! the network's stages, each timed. Where the network gains nothing from its last core (small
//! networks, measured at start), decode and preprocessing move to a thread of their own and
//! overlap the network: capture -> [frame] -> prepare -> [input] -> network. Otherwise they run
//! inline before each pass, leaving every core to the network.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::classifier::{Classifier, Prediction};
use crate::decode::decode_frame;
use crate::sources::{Frame, FrameSource, SourceError};
use crate::stats::{LatencyHistogram, Summary};

/// Stage names, in pipeline order.
pub const STAGES: [&str; 8] = [
    "capture_wait",
    "decode",
    "preprocess",
    "encoder",
    "backbone",
    "branch",
    "heads",
    "total",
];

/// What the consumer found in the slot.
#[derive(Debug)]
pub enum Taken<T = Frame, E = SourceError> {
    /// The newest item.
    Frame(T),
    /// The producer ended normally.
    Closed,
    /// The producer failed.
    Failed(E),
    /// Nothing arrived within the timeout.
    TimedOut,
}

struct SlotState<T, E> {
    frame: Option<T>,
    dropped: u64,
    closed: bool,
    error: Option<E>,
}

/// Holds at most one item (a frame, or a prepared input): the newest. Replacing an unread item
/// counts a drop.
pub struct LatestSlot<T = Frame, E = SourceError> {
    state: Mutex<SlotState<T, E>>,
    ready: Condvar,
}

impl<T, E> Default for LatestSlot<T, E> {
    fn default() -> Self {
        LatestSlot {
            state: Mutex::new(SlotState {
                frame: None,
                dropped: 0,
                closed: false,
                error: None,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T, E> LatestSlot<T, E> {
    /// Stores `frame`, replacing (and counting as dropped) any item not yet taken.
    pub fn put(&self, frame: T) {
        let mut s = self.state.lock().expect("slot lock");
        if s.frame.replace(frame).is_some() {
            s.dropped += 1;
        }
        self.ready.notify_one();
    }

    /// Marks the end of the stream, with the producer's error if it failed.
    pub fn close(&self, error: Option<E>) {
        let mut s = self.state.lock().expect("slot lock");
        s.closed = true;
        s.error = error;
        self.ready.notify_all();
    }

    /// Waits up to `timeout` for a frame. A pending frame is delivered before the close.
    pub fn take(&self, timeout: Duration) -> Taken<T, E> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("slot lock");
        loop {
            if let Some(f) = s.frame.take() {
                self.ready.notify_all();
                return Taken::Frame(f);
            }
            if s.closed {
                return match s.error.take() {
                    Some(e) => Taken::Failed(e),
                    None => Taken::Closed,
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Taken::TimedOut;
            }
            s = self
                .ready
                .wait_timeout(s, deadline - now)
                .expect("slot lock")
                .0;
        }
    }

    /// Frames replaced before anyone took them.
    pub fn dropped(&self) -> u64 {
        self.state.lock().expect("slot lock").dropped
    }

    /// Blocks while a frame is waiting (back-pressure for non-live sources); false once closed.
    pub fn wait_empty(&self, stop: &AtomicBool) -> bool {
        let mut s = self.state.lock().expect("slot lock");
        while s.frame.is_some() && !s.closed && !stop.load(Ordering::Relaxed) {
            s = self
                .ready
                .wait_timeout(s, Duration::from_millis(50))
                .expect("slot lock")
                .0;
        }
        !s.closed
    }

    /// Whether a frame is waiting (at most one ever is).
    pub fn is_full(&self) -> bool {
        self.state.lock().expect("slot lock").frame.is_some()
    }
}

/// Runs `source` on a new thread into `slot` until it ends, fails, or `stop` is set.
pub fn spawn_capture(
    mut source: Box<dyn FrameSource>,
    slot: Arc<LatestSlot>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let live = source.is_live();
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || loop {
            if !live {
                slot.wait_empty(&stop);
            }
            if stop.load(Ordering::Relaxed) {
                slot.close(None);
                return;
            }
            match source.next_frame() {
                Ok(Some(f)) => slot.put(f),
                Ok(None) => return slot.close(None),
                Err(e) => return slot.close(Some(e)),
            }
        })
        .expect("spawning the capture thread")
}

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
fn prepare_next(
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
fn prepare_loop(
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
fn network_pool() -> Option<rayon::ThreadPool> {
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

/// Why a stream stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The source failed (and `--reconnect` was off or gave up).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// No frame within the timeout: a stalled or unplugged camera.
    #[error("source stalled: no frame for {0:.1} s (unplugged or stuck camera?)")]
    Stalled(f64),
    /// A frame could not be decoded.
    #[error(transparent)]
    Decode(#[from] crate::preprocess::ImageError),
    /// Inference failed.
    #[error("inference: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Limits and policies of one stream run.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Stop after this many classified frames.
    pub frames: Option<u64>,
    /// Stop after this long.
    pub seconds: Option<f64>,
    /// Longest wait for a frame before [`StreamError::Stalled`].
    pub timeout: Duration,
    /// Classes per frame.
    pub top_k: usize,
    /// Reopen a failed or stalled source with back-off instead of stopping.
    pub reconnect: bool,
    /// Decode MJPEG at reduced DCT scale when the model input is small.
    pub scaled_decode: bool,
    /// Prepare frames on a thread of their own, overlapping the network on all cores but one;
    /// `None` measures at start whether that pays ([`overlap_pays`]).
    pub overlap: Option<bool>,
}

/// Per-stage milliseconds of one frame.
pub type StageMs = BTreeMap<&'static str, f64>;

/// One classified frame.
#[derive(Serialize, Clone, Debug)]
pub struct FrameResult {
    /// Source frame index.
    pub frame: u64,
    /// Milliseconds since the stream started.
    pub t_ms: f64,
    /// Ranked classes.
    pub top: Vec<Prediction>,
    /// Time per stage.
    pub ms: StageMs,
}

/// The end-of-stream report.
#[derive(Serialize, Clone, Debug)]
pub struct StreamSummary {
    /// Frames classified.
    pub frames: u64,
    /// Frames classified per second of wall time.
    pub fps: f64,
    /// Frames the source produced that were never classified.
    pub dropped: u64,
    /// Latency percentiles per stage.
    pub stages: BTreeMap<&'static str, Summary>,
    /// Times the source was reopened.
    pub reconnects: u64,
}

/// Frames per second over the last `window`.
#[derive(Debug)]
pub struct FpsMeter {
    window: Duration,
    stamps: VecDeque<Instant>,
}

impl FpsMeter {
    /// A meter over a sliding window.
    pub fn new(window: Duration) -> Self {
        FpsMeter {
            window,
            stamps: VecDeque::new(),
        }
    }
    /// Records a frame finished at `t` and returns the current rate.
    pub fn tick(&mut self, t: Instant) -> f64 {
        self.stamps.push_back(t);
        while self
            .stamps
            .front()
            .is_some_and(|&s| t.duration_since(s) > self.window)
        {
            self.stamps.pop_front();
        }
        match (self.stamps.front(), self.stamps.len()) {
            (Some(&first), n) if n > 1 => {
                (n - 1) as f64 / t.duration_since(first).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Streams frames from sources made by `open` through `clf` until a limit, the end of the
/// source, `stop`, or an error; `on_frame` sees every result (with the live fps).
pub fn run_stream(
    mut open: impl FnMut() -> Result<Box<dyn FrameSource>, SourceError>,
    clf: &Classifier,
    opts: &StreamOptions,
    stop: &Arc<AtomicBool>,
    mut on_frame: impl FnMut(&FrameResult, f64, &image::DynamicImage),
) -> Result<StreamSummary, StreamError> {
    let input = clf.config().input;
    let want = opts
        .scaled_decode
        .then_some((input.width as u32, input.height as u32));
    let start = Instant::now();
    // Constant memory however long the stream runs.
    let mut samples: BTreeMap<&'static str, LatencyHistogram> = STAGES
        .iter()
        .map(|s| (*s, LatencyHistogram::default()))
        .collect();
    let mut meter = FpsMeter::new(Duration::from_secs(2));
    let (mut frames, mut dropped_before, mut reconnects) = (0u64, 0u64, 0u64);
    let mut backoff = Duration::from_millis(250);
    let mut first_done: Option<Instant> = None;
    let mut last_done = start;
    let overlap = opts.overlap.unwrap_or_else(|| {
        let o = overlap_pays(clf);
        eprintln!(
            "pipeline: decode and preprocessing {}",
            if o {
                "overlap the network (it runs on all cores but one)"
            } else {
                "run inline, every core to the network"
            }
        );
        o
    });
    let pool = if overlap { network_pool() } else { None };
    'sources: loop {
        let source = match open() {
            Ok(s) => s,
            Err(e) if opts.reconnect && frames > 0 => {
                eprintln!("reconnect: {e}; retrying in {:.1} s", backoff.as_secs_f64());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(8));
                reconnects += 1;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let slot: Arc<LatestSlot> = Arc::new(LatestSlot::default());
        let capture_stop = Arc::new(AtomicBool::new(false));
        let handle = spawn_capture(source, slot.clone(), capture_stop.clone());
        let ready: LatestSlot<Prepared, StreamError> = LatestSlot::default();
        let outcome: Result<bool, StreamError> = std::thread::scope(|scope| {
            if pool.is_some() {
                std::thread::Builder::new()
                    .name("prepare".into())
                    .spawn_scoped(scope, || {
                        prepare_loop(&slot, &ready, &capture_stop, clf, want, opts.timeout)
                    })
                    .expect("spawning the preparing thread");
            }
            let outcome = loop {
                if stop.load(Ordering::Relaxed)
                    || opts.frames.is_some_and(|n| frames >= n)
                    || opts
                        .seconds
                        .is_some_and(|s| start.elapsed().as_secs_f64() >= s)
                {
                    break Ok(true);
                }
                let next = if pool.is_some() {
                    // The preparing thread reports a stalled source first; this is a backstop.
                    match ready.take(opts.timeout + Duration::from_secs(1)) {
                        Taken::Frame(p) => Ok(Some(p)),
                        Taken::Closed => Ok(None),
                        Taken::Failed(e) => Err(e),
                        Taken::TimedOut => Err(StreamError::Stalled(opts.timeout.as_secs_f64())),
                    }
                } else {
                    prepare_next(&slot, stop, clf, want, opts.timeout)
                };
                let p = match next {
                    Ok(Some(p)) => p,
                    Ok(None) => break Ok(true),
                    Err(e) => break Err(e),
                };
                let result = match &pool {
                    Some(pool) => pool.install(|| clf.classify_timed(&p.input, opts.top_k)),
                    None => clf.classify_timed(&p.input, opts.top_k),
                };
                let (top, st) = match result {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                let done = Instant::now();
                let mut stage_ms = StageMs::new();
                let [wait, decode, preprocess] = p.times;
                for (name, d) in [
                    ("capture_wait", wait),
                    ("decode", decode),
                    ("preprocess", preprocess),
                ]
                .into_iter()
                .chain(st.named())
                .chain([("total", done - p.since)])
                {
                    samples.get_mut(name).expect("known stage").record(d);
                    stage_ms.insert(name, ms(d));
                }
                frames += 1;
                backoff = Duration::from_millis(250);
                first_done.get_or_insert(done);
                last_done = done;
                let fps = meter.tick(done);
                let r = FrameResult {
                    frame: p.index,
                    t_ms: ms(done - start),
                    top,
                    ms: stage_ms,
                };
                on_frame(&r, fps, &p.image);
            };
            // Stops the preparing thread (joined at the end of the scope) and the capture.
            capture_stop.store(true, Ordering::Relaxed);
            outcome
        });
        capture_stop.store(true, Ordering::Relaxed);
        dropped_before += slot.dropped();
        // A capture thread stuck in a blocking read (a dead camera) is left behind, not joined.
        let deadline = Instant::now() + Duration::from_millis(500);
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
        match outcome {
            Ok(_) => break 'sources,
            Err(StreamError::Source(_) | StreamError::Stalled(_))
                if opts.reconnect && !stop.load(Ordering::Relaxed) =>
            {
                eprintln!(
                    "reconnect: source lost after {frames} frames; reopening in {:.1} s",
                    backoff.as_secs_f64()
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(8));
                reconnects += 1;
            }
            Err(e) => return Err(e),
        }
    }
    // fps over the span between the first and the last classified frame (warm-up excluded).
    let span = first_done.map_or(0.0, |f| (last_done - f).as_secs_f64());
    let fps = if frames > 1 && span > 0.0 {
        (frames - 1) as f64 / span
    } else {
        0.0
    };
    Ok(StreamSummary {
        frames,
        fps,
        dropped: dropped_before,
        stages: samples.iter().map(|(k, v)| (*k, v.summary())).collect(),
        reconnects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::FrameData;

    fn frame(i: u64) -> Frame {
        Frame {
            index: i,
            captured: Instant::now(),
            data: FrameData::Encoded(vec![0u8; 1024]),
            name: "t".into(),
        }
    }

    #[test]
    fn latest_frame_wins_and_drops_are_counted() {
        let slot: LatestSlot = LatestSlot::default();
        for i in 0..100 {
            slot.put(frame(i));
            assert!(slot.is_full());
        }
        assert_eq!(slot.dropped(), 99);
        match slot.take(Duration::from_millis(10)) {
            Taken::Frame(f) => assert_eq!(f.index, 99),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            slot.take(Duration::from_millis(10)),
            Taken::TimedOut
        ));
        slot.put(frame(100));
        slot.close(None);
        assert!(
            matches!(slot.take(Duration::ZERO), Taken::Frame(_)),
            "pending frame before the close"
        );
        assert!(matches!(slot.take(Duration::ZERO), Taken::Closed));
    }

    /// A fast producer and a slow consumer: memory stays at one frame, the rest are dropped.
    #[test]
    fn slow_consumer_bounded_memory() {
        struct Fast(u64);
        impl FrameSource for Fast {
            fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
                self.0 += 1;
                std::thread::sleep(Duration::from_micros(200));
                Ok((self.0 <= 2000).then(|| frame(self.0)))
            }
            fn describe(&self) -> String {
                "fast".into()
            }
        }
        let slot = Arc::new(LatestSlot::default());
        let stop = Arc::new(AtomicBool::new(false));
        let h = spawn_capture(Box::new(Fast(0)), slot.clone(), stop.clone());
        let mut taken = 0u64;
        loop {
            match slot.take(Duration::from_secs(5)) {
                Taken::Frame(_) => {
                    taken += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Taken::Closed => break,
                other => panic!("{other:?}"),
            }
        }
        h.join().unwrap();
        assert_eq!(
            taken + slot.dropped(),
            2000,
            "every frame is either classified or counted as dropped"
        );
        assert!(slot.dropped() > 1000, "dropped {}", slot.dropped());
    }

    #[test]
    fn non_live_sources_wait_instead_of_dropping() {
        let slot = Arc::new(LatestSlot::default());
        let stop = Arc::new(AtomicBool::new(false));
        let src = crate::sources::SyntheticSource::parse("16x16+50").unwrap();
        let h = spawn_capture(Box::new(src), slot.clone(), stop);
        let mut seen = Vec::new();
        while let Taken::Frame(f) = slot.take(Duration::from_secs(5)) {
            std::thread::sleep(Duration::from_millis(1));
            seen.push(f.index);
        }
        h.join().unwrap();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!(slot.dropped(), 0);
    }

    #[test]
    fn capture_stops_on_request_and_errors_propagate() {
        struct Failing;
        impl FrameSource for Failing {
            fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
                Err(SourceError::Camera {
                    device: "/dev/video9".into(),
                    reason: "unplugged".into(),
                })
            }
            fn describe(&self) -> String {
                "failing".into()
            }
        }
        let slot = Arc::new(LatestSlot::default());
        let h = spawn_capture(
            Box::new(Failing),
            slot.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        h.join().unwrap();
        assert!(matches!(
            slot.take(Duration::from_secs(1)),
            Taken::Failed(SourceError::Camera { .. })
        ));
        // An endless source stops when asked.
        let slot = Arc::new(LatestSlot::default());
        let stop = Arc::new(AtomicBool::new(false));
        let h = spawn_capture(
            Box::new(crate::sources::SyntheticSource::new(16, 16)),
            slot.clone(),
            stop.clone(),
        );
        assert!(matches!(slot.take(Duration::from_secs(5)), Taken::Frame(_)));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn fps_meter_over_a_window() {
        let mut m = FpsMeter::new(Duration::from_secs(1));
        let t = Instant::now();
        let mut fps = 0.0;
        for i in 0..11 {
            fps = m.tick(t + Duration::from_millis(100 * i));
        }
        assert!((fps - 10.0).abs() < 1e-6, "{fps}");
    }
}
