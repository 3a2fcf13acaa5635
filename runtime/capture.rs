//! The capture side of a stream: the source runs on a thread of its own into a latest-frame
//! slot, never a queue, so a slow classifier drops stale frames instead of falling behind and
//! memory stays at one frame. Sources that are not live (files) wait for the slot to empty
//! instead, so none of their frames is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sources::{Frame, FrameSource, SourceError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::FrameData;

    fn frame(i: u64) -> Frame {
        Frame {
            index: i,
            captured: Instant::now(),
            pts: None,
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
}
