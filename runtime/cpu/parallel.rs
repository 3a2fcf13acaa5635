//! How the kernels share a frame's work over the cores: bands of output rows through rayon,
//! and a raw pointer for threads that write disjoint parts of one buffer.

use rayon::prelude::*;

/// Values from which a memory-bound pass over a map (a max pool, the input's NCHW -> NHWC copy)
/// splits its rows over the cores.
pub(super) const COPY_SPLIT_MIN: usize = 1 << 16;

/// Rows per band when a map of `rows` rows is cut into `per_core` bands for each core, or all of
/// them in one band unless `split`.
pub(super) fn band_rows(rows: usize, split: bool, per_core: usize) -> usize {
    if split {
        rows.div_ceil(per_core * rayon::current_num_threads().max(1))
    } else {
        rows
    }
}

/// Runs `f` on each `chunk`-long piece of `out` with its index: in parallel when there are
/// several, on the calling thread when one piece covers it all.
pub(super) fn for_each_chunk(
    out: &mut [f32],
    chunk: usize,
    f: impl Fn((usize, &mut [f32])) + Send + Sync,
) {
    if chunk < out.len() {
        out.par_chunks_mut(chunk).enumerate().for_each(f);
    } else {
        f((0, out));
    }
}

/// A raw output pointer shared by threads that write disjoint parts of one buffer (the halves
/// of a GEMM column split, Winograd's work items).
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: used only where the threads write disjoint parts of a buffer that outlives them.
unsafe impl Sync for SendPtr {}
