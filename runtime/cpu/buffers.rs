//! The engine's activation maps (NHWC, one image) and the pool of buffers they live in, kept
//! between frames so that a warm frame neither allocates nor zeroes.

use std::sync::{Mutex, PoisonError};

/// An activation map, NHWC for one image.
#[derive(Clone, Debug)]
pub(super) struct Map {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    pub(super) data: Buf,
}

/// Activation and scratch buffers kept between frames. A frame takes the buffers it needs and
/// gives them back, so from the second frame on the engine neither allocates nor zeroes (what
/// TFLite's arena and ONNX Runtime's memory pattern do). It holds one frame's working set per
/// frame in flight and is freed with the net.
#[derive(Default)]
pub(super) struct Buffers(pub(super) Mutex<Vec<Buf>>);

/// A pooled buffer: the first `len` values of a vector that stays written to its full length.
/// Handed out again at a smaller size it writes nothing, and at its old size again nothing, so a
/// frame never refills what the one before shrank (a plain `Vec` resized on each take did:
/// 13.5 MB of zeroes a frame in WAE-VGG16, 30 MB in VGG16).
#[derive(Clone, Debug, Default)]
pub(super) struct Buf {
    pub(super) v: Vec<f32>,
    len: usize,
}

impl std::ops::Deref for Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.len]
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Buf {
        Buf { len: v.len(), v }
    }
}

impl Buffers {
    /// `len` values with unspecified contents: callers write every value they later read.
    pub(super) fn take(&self, len: usize) -> Buf {
        let found = {
            let mut free = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest buffer that fits, so big ones stay for the big layers.
            let best = (0..free.len())
                .filter(|&i| free[i].v.len() >= len)
                .min_by_key(|&i| free[i].v.len());
            best.map(|i| free.swap_remove(i))
        };
        let mut b = found.unwrap_or_else(|| Buf::from(vec![0.0; len]));
        b.len = len;
        b
    }

    /// Returns a buffer for later frames.
    pub(super) fn give(&self, b: Buf) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(b);
    }

    /// A fresh map of the given shape from the pool.
    pub(super) fn map(&self, h: usize, w: usize, c: usize) -> Map {
        Map {
            h,
            w,
            c,
            data: self.take(h * w * c),
        }
    }
}

impl Map {
    /// The first `c` channels and the rest, as two maps.
    pub(super) fn split_channels(&self, c: usize, bufs: &Buffers) -> (Map, Map) {
        let (mut a, mut b) = (
            bufs.map(self.h, self.w, c),
            bufs.map(self.h, self.w, self.c - c),
        );
        for ((px, pa), pb) in self
            .data
            .chunks_exact(self.c)
            .zip(a.data.chunks_exact_mut(a.c))
            .zip(b.data.chunks_exact_mut(b.c))
        {
            pa.copy_from_slice(&px[..c]);
            pb.copy_from_slice(&px[c..]);
        }
        (a, b)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A buffer given back after a small take comes out again at its old size unwritten: the
    /// pool does not refill what a smaller take left alone.
    #[test]
    fn pool_reuses_buffers_without_writing_them() {
        let bufs = Buffers::default();
        let mut b = bufs.take(100);
        b.fill(7.0);
        bufs.give(b);
        let small = bufs.take(10);
        assert_eq!(small.len(), 10);
        bufs.give(small);
        let big = bufs.take(100);
        assert_eq!(big.len(), 100);
        assert!(
            big.iter().all(|&v| v == 7.0),
            "the pool wrote to a reused buffer"
        );
    }

    /// A pool holding buffers full of NaN: any value a kernel reads without writing it first
    /// poisons the result.
    pub(in crate::cpu) fn poisoned() -> Buffers {
        let bufs = Buffers::default();
        for n in [1 << 18, 1 << 14, 4096, 1000, 300, 64] {
            bufs.give(vec![f32::NAN; n].into());
        }
        bufs
    }
}
