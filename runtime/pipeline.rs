//! The streaming loop: frames from a source (`capture.rs`: its own thread, a latest-frame
//! slot), made into inputs (`prepare.rs`: decode and preprocess, inline or overlapping the
//! network), classified, timed per stage and handed to the caller, until a limit, the end of
//! the source, Ctrl-C or an error; a lost source is reopened with back-off on request. Ends
//! with a summary of per-stage percentiles.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::capture::{spawn_capture, LatestSlot, Taken};
use crate::classifier::{Classifier, Prediction};
use crate::model::StageTimes;
pub use crate::prepare::overlap_pays;
use crate::prepare::{network_pool, Prepared, Preparer};
use crate::sources::{FrameSource, SourceError};
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
/// Why a stream stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The source failed (and `--reconnect` was off or gave up).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// No frame within the timeout: a stalled or unplugged camera.
    #[error("source stalled: no frame for {0:.1} s (unplugged or stuck camera?)")]
    Stalled(f64),
    /// Frame after frame could not be decoded (a single bad frame is skipped and counted).
    #[error("{count} frames in a row could not be decoded; the last: {last}")]
    BadFrames {
        /// Undecodable frames in a row.
        count: u32,
        /// Why the last one failed.
        last: crate::preprocess::ImageError,
    },
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
    /// Undecodable frames in a row that end the source (or reopen it, with `reconnect`); fewer
    /// are skipped and counted.
    pub max_bad_frames: u32,
}

/// The default of [`StreamOptions::max_bad_frames`]: about a second of a 25-30 fps camera.
pub const MAX_BAD_FRAMES: u32 = 25;

/// Per-stage milliseconds of one frame.
pub type StageMs = BTreeMap<&'static str, f64>;

/// One classified frame.
#[derive(Serialize, Clone, Debug)]
pub struct FrameResult {
    /// Source frame index.
    pub frame: u64,
    /// Milliseconds since the stream started.
    pub t_ms: f64,
    /// The frame's timestamp in its source (a video's position), in milliseconds, where the
    /// source has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pts_ms: Option<f64>,
    /// Ranked classes.
    pub top: Vec<Prediction>,
    /// Time per stage.
    pub ms: StageMs,
    /// Why the frame is far from the model's training pictures, if it is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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
    /// Frames that could not be decoded, skipped.
    pub bad_frames: u64,
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

/// The running totals of a stream: per-stage histograms (constant memory however long it
/// runs), the live fps, and the counts the summary reports.
struct Tally {
    start: Instant,
    stages: BTreeMap<&'static str, LatencyHistogram>,
    meter: FpsMeter,
    frames: u64,
    dropped: u64,
    reconnects: u64,
    first_done: Option<Instant>,
    last_done: Instant,
}

impl Tally {
    fn new() -> Tally {
        let start = Instant::now();
        Tally {
            start,
            stages: STAGES
                .iter()
                .map(|s| (*s, LatencyHistogram::default()))
                .collect(),
            meter: FpsMeter::new(Duration::from_secs(2)),
            frames: 0,
            dropped: 0,
            reconnects: 0,
            first_done: None,
            last_done: start,
        }
    }

    /// Records a frame classified at `done`; returns its result and the live fps.
    fn record(
        &mut self,
        p: &Prepared,
        top: Vec<Prediction>,
        net: &StageTimes,
        done: Instant,
    ) -> (FrameResult, f64) {
        let mut stage_ms = StageMs::new();
        let [wait, decode, preprocess] = p.times;
        for (name, d) in [
            ("capture_wait", wait),
            ("decode", decode),
            ("preprocess", preprocess),
        ]
        .into_iter()
        .chain(net.named())
        .chain([("total", done - p.since)])
        {
            self.stages.get_mut(name).expect("known stage").record(d);
            stage_ms.insert(name, ms(d));
        }
        self.frames += 1;
        self.first_done.get_or_insert(done);
        self.last_done = done;
        let fps = self.meter.tick(done);
        let r = FrameResult {
            frame: p.index,
            t_ms: ms(done - self.start),
            pts_ms: p.pts.map(ms),
            top,
            ms: stage_ms,
            warnings: p.warning.iter().cloned().collect(),
        };
        (r, fps)
    }

    /// Whether `opts`' frame or time limit is reached.
    fn done(&self, opts: &StreamOptions) -> bool {
        opts.frames.is_some_and(|n| self.frames >= n)
            || opts
                .seconds
                .is_some_and(|s| self.start.elapsed().as_secs_f64() >= s)
    }

    fn summary(&self, bad_frames: u64) -> StreamSummary {
        // fps over the span between the first and the last classified frame (warm-up excluded).
        let span = self
            .first_done
            .map_or(0.0, |f| (self.last_done - f).as_secs_f64());
        let fps = if self.frames > 1 && span > 0.0 {
            (self.frames - 1) as f64 / span
        } else {
            0.0
        };
        StreamSummary {
            frames: self.frames,
            fps,
            dropped: self.dropped,
            bad_frames,
            stages: self.stages.iter().map(|(k, v)| (*k, v.summary())).collect(),
            reconnects: self.reconnects,
        }
    }
}

/// The wait before reopening a lost source: 0.25 s, doubling up to 8 s, and back to 0.25 s
/// once a frame has been classified.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(8);

    /// Says why on stderr, waits, and doubles the next wait.
    fn wait(&mut self, why: std::fmt::Arguments) {
        eprintln!(
            "reconnect: {}; retrying in {:.1} s",
            crate::terminal::Escaped(why),
            self.0.as_secs_f64()
        );
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Self::MAX);
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// What every source of one stream run shares.
struct Run<'a> {
    clf: &'a Classifier,
    opts: &'a StreamOptions,
    stop: &'a AtomicBool,
    /// Frames into inputs, with the count of bad frames.
    prep: Preparer<'a>,
    /// All cores but one, for the network, when preparing overlaps it.
    pool: Option<rayon::ThreadPool>,
}

impl Run<'_> {
    /// Classifies `source`'s frames until a limit, its end, `stop`, or an error.
    fn source(
        &self,
        source: Box<dyn FrameSource>,
        tally: &mut Tally,
        backoff: &mut Backoff,
        on_frame: &mut impl FnMut(&FrameResult, f64, &image::DynamicImage),
    ) -> Result<(), StreamError> {
        let (opts, clf) = (self.opts, self.clf);
        // A new source starts with a clean run of bad frames.
        self.prep.bad_run.store(0, Ordering::Relaxed);
        let slot: Arc<LatestSlot> = Arc::new(LatestSlot::default());
        let capture_stop = Arc::new(AtomicBool::new(false));
        let handle = spawn_capture(source, slot.clone(), capture_stop.clone());
        let ready: LatestSlot<Prepared, StreamError> = LatestSlot::default();
        let outcome = std::thread::scope(|scope| {
            if self.pool.is_some() {
                std::thread::Builder::new()
                    .name("prepare".into())
                    .spawn_scoped(scope, || self.prep.run(&slot, &ready, &capture_stop))
                    .expect("spawning the preparing thread");
            }
            let outcome = loop {
                if self.stop.load(Ordering::Relaxed) || tally.done(opts) {
                    break Ok(());
                }
                let p = match self.next(&slot, &ready) {
                    Ok(Some(p)) => p,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                let result = match &self.pool {
                    Some(pool) => pool.install(|| clf.classify_timed(&p.input, opts.top_k)),
                    None => clf.classify_timed(&p.input, opts.top_k),
                };
                let (top, net) = match result {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                let (r, fps) = tally.record(&p, top, &net, Instant::now());
                backoff.reset();
                on_frame(&r, fps, &p.image);
            };
            // Stops the preparing thread (joined at the end of the scope) and the capture.
            capture_stop.store(true, Ordering::Relaxed);
            outcome
        });
        tally.dropped += slot.dropped();
        release(handle);
        outcome
    }

    /// The next prepared frame: from the preparing thread, or prepared here.
    fn next(
        &self,
        frames: &LatestSlot,
        ready: &LatestSlot<Prepared, StreamError>,
    ) -> Result<Option<Prepared>, StreamError> {
        let timeout = self.opts.timeout;
        if self.pool.is_none() {
            return self.prep.next(frames, self.stop);
        }
        // The preparing thread reports a stalled source first; this is a backstop.
        match ready.take(timeout + Duration::from_secs(1)) {
            Taken::Frame(p) => Ok(Some(p)),
            Taken::Closed => Ok(None),
            Taken::Failed(e) => Err(e),
            Taken::TimedOut => Err(StreamError::Stalled(timeout.as_secs_f64())),
        }
    }
}

/// Joins a stopped capture thread, but leaves one stuck in a blocking read (a dead camera)
/// behind after 0.5 s rather than hang the stream.
fn release(handle: std::thread::JoinHandle<()>) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if handle.is_finished() {
        let _ = handle.join();
    }
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
    let run = Run {
        clf,
        opts,
        stop,
        prep: Preparer {
            clf,
            want: opts
                .scaled_decode
                .then_some((input.width as u32, input.height as u32)),
            timeout: opts.timeout,
            max_bad: opts.max_bad_frames.max(1),
            bad: AtomicU64::new(0),
            bad_run: AtomicU32::new(0),
        },
        pool: if overlap { network_pool() } else { None },
    };
    let mut tally = Tally::new();
    let mut backoff = Backoff(Backoff::FIRST);
    loop {
        let source = match open() {
            Ok(s) => s,
            Err(e) if opts.reconnect && tally.frames > 0 => {
                backoff.wait(format_args!("{e}"));
                tally.reconnects += 1;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match run.source(source, &mut tally, &mut backoff, &mut on_frame) {
            Ok(()) => break,
            Err(
                StreamError::Source(_) | StreamError::Stalled(_) | StreamError::BadFrames { .. },
            ) if opts.reconnect && !stop.load(Ordering::Relaxed) => {
                backoff.wait(format_args!("source lost after {} frames", tally.frames));
                tally.reconnects += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(tally.summary(run.prep.bad.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
