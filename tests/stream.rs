//! `wae-edge stream`: the summary contract, clean shutdown, stalls and missing cameras.

mod common;

use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use wae_edge::pipeline::{run_stream, StreamError, StreamOptions, STAGES};
use wae_edge::sources::{Frame, FrameSource, SourceError};

#[test]
fn synthetic_json_ends_with_a_summary() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let out = bin()
        .args([
            "stream", "--json", "--frames", "60", "--top-k", "2", "--model",
        ])
        .arg(&model)
        .arg("synthetic:320x240")
        .output()
        .unwrap();
    assert_success(&out);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 61);
    for (i, l) in lines[..60].iter().enumerate() {
        assert_eq!(
            l["frame"], i as u64,
            "unpaced synthetic frames are all classified, in order"
        );
        assert_eq!(l["top"].as_array().unwrap().len(), 2);
        for s in STAGES {
            assert!(l["ms"][s].as_f64().unwrap() >= 0.0, "{s}");
        }
        assert!(l["t_ms"].as_f64().unwrap() > 0.0);
    }
    let s = &lines[60]["summary"];
    assert_eq!(s["frames"], 60);
    assert_eq!(s["dropped"], 0);
    assert!(s["fps"].as_f64().unwrap() > 0.0);
    for stage in STAGES {
        let st = &s["stages"][stage];
        let (p50, p90, p99) = (
            st["p50_ms"].as_f64().unwrap(),
            st["p90_ms"].as_f64().unwrap(),
            st["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 <= p90 && p90 <= p99, "{stage}: {p50} {p90} {p99}");
    }
}

#[test]
fn camera_without_a_camera_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let out = bin()
        .args(["stream", "--frames", "1", "--model"])
        .arg(&model)
        .arg("camera:0")
        .output()
        .unwrap();
    let needle = if cfg!(feature = "camera") {
        "camera /dev/video0"
    } else {
        "--features camera"
    };
    assert_clean_failure(&out, needle);
}

#[cfg(unix)]
#[test]
fn a_stalled_source_times_out_instead_of_hanging() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    // A live source that delivers a frame a second, like a camera that stalls after its first
    // frame, against a half-second timeout. (A FIFO nobody writes to would be refused as a
    // special file before it is read.)
    let out = bin()
        .args(["stream", "--timeout", "0.5", "--model"])
        .arg(&model)
        .arg("synthetic:64x64@1")
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    assert_clean_failure(&out, "source stalled: no frame for 0.5 s");
}

#[cfg(unix)]
#[test]
fn ctrl_c_ends_cleanly_with_a_summary() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("wae-edge"))
        .args(["stream", "--json", "--model"])
        .arg(&model)
        .arg("synthetic:64x64@200")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let v: Value = serde_json::from_str(&last).unwrap();
    assert!(v["summary"]["frames"].as_u64().unwrap() > 0);
}

/// A source that delivers `n` frames, then blocks forever.
struct StallsAfter(u64, u64);
impl FrameSource for StallsAfter {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.0 >= self.1 {
            std::thread::sleep(Duration::from_secs(3600));
        }
        self.0 += 1;
        let img = image::RgbImage::from_pixel(28, 28, image::Rgb([9, 9, 9]));
        Ok(Some(Frame {
            index: self.0 - 1,
            captured: Instant::now(),
            pts: None,
            data: wae_edge::decode::FrameData::Rgb(img),
            name: "stall".into(),
        }))
    }
    fn describe(&self) -> String {
        "stalls".into()
    }
    fn is_live(&self) -> bool {
        false // every frame reaches the consumer, so the counts below are exact
    }
}

fn options(reconnect: bool, overlap: bool) -> StreamOptions {
    StreamOptions {
        frames: Some(6),
        seconds: Some(20.0),
        timeout: Duration::from_millis(300),
        top_k: 1,
        reconnect,
        scaled_decode: true,
        overlap: Some(overlap),
        max_bad_frames: wae_edge::pipeline::MAX_BAD_FRAMES,
    }
}

/// Both layouts: frames prepared inline, or on their own thread overlapping the network.
const LAYOUTS: [bool; 2] = [false, true];

#[test]
fn stalls_fail_or_reconnect() {
    let d = tempfile::tempdir().unwrap();
    let clf =
        wae_edge::Classifier::load(fashion_model(d.path()), &candle_core::Device::Cpu).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    for overlap in LAYOUTS {
        let err = run_stream(
            || Ok(Box::new(StallsAfter(0, 3))),
            &clf,
            &options(false, overlap),
            &stop,
            |_, _, _| (),
        )
        .unwrap_err();
        assert!(matches!(err, StreamError::Stalled(_)), "{err}");
        // With reconnect, a new source is opened after each stall until the frame budget is met.
        let mut opened = 0;
        let mut seen = Vec::new();
        let s = run_stream(
            || {
                opened += 1;
                Ok(Box::new(StallsAfter(0, 3)))
            },
            &clf,
            &options(true, overlap),
            &stop,
            |r, _, _| seen.push(r.frame),
        )
        .unwrap();
        assert_eq!(s.frames, 6, "overlap {overlap}");
        assert_eq!(seen, [0, 1, 2, 0, 1, 2], "every frame once, in order");
        assert_eq!(opened, 2);
        assert_eq!(s.reconnects, 1);
    }
}

#[test]
fn source_errors_propagate() {
    struct Unplugged;
    impl FrameSource for Unplugged {
        fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
            Err(SourceError::Camera {
                device: "/dev/video0".into(),
                reason: "capture failed (unplugged?)".into(),
            })
        }
        fn describe(&self) -> String {
            "unplugged".into()
        }
    }
    let d = tempfile::tempdir().unwrap();
    let clf =
        wae_edge::Classifier::load(fashion_model(d.path()), &candle_core::Device::Cpu).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    for overlap in LAYOUTS {
        let err = run_stream(
            || Ok(Box::new(Unplugged)),
            &clf,
            &options(false, overlap),
            &stop,
            |_, _, _| (),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unplugged"), "{err}");
    }
}
