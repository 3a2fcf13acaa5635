//! Soak: 100,000 synthetic frames through the streaming pipeline with resident memory sampled
//! every 5,000 frames; it must stay flat (within 5% after warm-up). Not part of the default run:
//! `cargo test --release --test soak -- --ignored --nocapture` (a few minutes).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use wae_edge::pipeline::{run_stream, StreamOptions};
use wae_edge::sources::{open_source, SourceOptions};

#[test]
#[ignore = "soak: minutes long; run explicitly"]
fn hundred_thousand_frames_keep_memory_flat() {
    let d = tempfile::tempdir().unwrap();
    let clf =
        wae_edge::Classifier::load(common::fashion_model(d.path()), &candle_core::Device::Cpu)
            .unwrap();
    let opts = StreamOptions {
        frames: Some(100_000),
        seconds: None,
        timeout: Duration::from_secs(5),
        top_k: 1,
        reconnect: false,
        scaled_decode: true,
        overlap: None,
        max_bad_frames: wae_edge::pipeline::MAX_BAD_FRAMES,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut samples = Vec::new();
    let mut n = 0u64;
    let s = run_stream(
        || open_source("synthetic:160x120", &SourceOptions::default()),
        &clf,
        &opts,
        &stop,
        |_, _, _| {
            n += 1;
            if n.is_multiple_of(5000) {
                let rss = wae_edge::stats::resident_memory().map_or(0, |m| m.0);
                println!("soak frame {n:>6} rss_bytes {rss}");
                samples.push(rss);
            }
        },
    )
    .unwrap();
    assert_eq!(s.frames, 100_000);
    let steady = &samples[1..];
    let (lo, hi) = (*steady.iter().min().unwrap(), *steady.iter().max().unwrap());
    println!(
        "soak: {:.1} fps, rss {:.1}..{:.1} MB",
        s.fps,
        lo as f64 / 1e6,
        hi as f64 / 1e6
    );
    assert!(
        hi as f64 <= lo as f64 * 1.05,
        "resident memory grew from {lo} to {hi} bytes"
    );
}
