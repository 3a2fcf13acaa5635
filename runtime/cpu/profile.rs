//! Per-layer timing: each conv's wall time, kernel, weight bytes and multiply-adds in one
//! profiled frame (`bench --layers`), and one conv timed alone (`benches/conv_layers.rs`).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{step, Buffers, Conv3, Map};

/// One conv's time in one frame (see [`CpuNet::profile`]).
#[derive(Clone, Debug)]
pub struct LayerTime {
    /// The conv's tensor prefix, e.g. `backbone.s2.c1`.
    pub name: String,
    /// Input map and channels, e.g. `28x28 256->256`, with `/2` for stride 2.
    pub shape: String,
    /// The kernel that ran it: `direct`, `im2col + gemm`, `winograd F(2x2)` or `F(4x4)`.
    pub kernel: &'static str,
    /// Bytes of weights the conv reads, as laid out for its kernel (Winograd's in their domain).
    pub weight_bytes: usize,
    /// Multiply-adds its kernel does (see [`Conv3::multiplies`]).
    pub multiplies: usize,
    /// Wall time.
    pub time: Duration,
}

/// Where a profiled frame's conv times go; the I_H branch records from another thread.
pub(super) type Recorder = Mutex<Vec<LayerTime>>;

/// `conv` applied to `x` as [`step`] does, timed into `rec` under `name` when profiling.
pub(super) fn conv_step(
    x: Map,
    conv: &Conv3,
    bufs: &Buffers,
    rec: Option<&Recorder>,
    name: impl FnOnce() -> String,
) -> Map {
    let t = Instant::now();
    let (h, w) = (x.h, x.w);
    let y = step(x, bufs, |x| conv.forward(x, bufs));
    if let Some(rec) = rec {
        let stride = if conv.stride == 1 { "" } else { " /2" };
        let t = LayerTime {
            name: name(),
            shape: format!("{h}x{w} {}->{}{stride}", conv.cin, conv.cout),
            kernel: conv.kernel(),
            weight_bytes: conv.weight_bytes(),
            multiplies: conv.multiplies(h, w),
            time: t.elapsed(),
        };
        rec.lock().unwrap_or_else(PoisonError::into_inner).push(t);
    }
    y
}

/// Median time of one 3x3 conv (pad 1, ReLU) on an `h x h x cin` map over `iters` runs, through
/// whichever kernel the engine picks for that shape. For `benches/conv_layers.rs`.
#[doc(hidden)]
pub fn time_conv3(h: usize, cin: usize, cout: usize, stride: usize, iters: usize) -> Duration {
    let conv = Conv3::new(
        cin,
        cout,
        stride,
        true,
        (0..9 * cin * cout).map(|i| (i % 7) as f32 * 0.01).collect(),
        vec![0.1; cout],
        h,
    );
    let x = Map {
        h,
        w: h,
        c: cin,
        data: vec![0.5; h * h * cin].into(),
    };
    let bufs = Buffers::default();
    let run = || bufs.give(std::hint::black_box(conv.forward(&x, &bufs)).data);
    // On a pool thread, as in `CpuNet::forward`.
    let mut t: Vec<Duration> = rayon::scope(|_| {
        for _ in 0..iters.div_ceil(10) {
            run();
        }
        (0..iters.max(1))
            .map(|_| {
                let t0 = Instant::now();
                run();
                t0.elapsed()
            })
            .collect()
    });
    t.sort();
    t[t.len() / 2]
}
