//! Sources and video out through real GStreamer: clips made by GStreamer itself, an RTSP
//! server on loopback (GStreamer's own, from Python), `gst:` pipelines, the CSI camera's
//! error where the Argus stack is absent, and `--output` read back by `gst-discoverer-1.0`.
#![cfg(all(feature = "gstreamer", target_os = "linux"))]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `gst-launch-1.0 -q` with a pipeline; panics if it fails.
fn gst_launch(pipeline: &str) {
    let status = Process::new("gst-launch-1.0")
        .arg("-q")
        .args(pipeline.split_whitespace())
        .status()
        .expect("gst-launch-1.0 (scripts/setup.sh installs gstreamer1.0-tools)");
    assert!(status.success(), "gst-launch-1.0 {pipeline}");
}

/// A `frames`-frame 320x240 clip at 30 fps: H.264 in MP4, or VP8 in Matroska.
fn clip(dir: &Path, name: &str, frames: u32) -> PathBuf {
    let path = dir.join(name);
    let (enc, mux) = if name.ends_with(".mkv") {
        ("vp8enc", "matroskamux")
    } else {
        ("x264enc", "mp4mux")
    };
    gst_launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 ! {enc} ! {mux} ! filesink location={}",
        path.display()
    ));
    path
}

/// `stream --json ARGS SOURCE` with a seeded model: the output and its parsed lines.
fn stream(args: &[&str], source: &str) -> (std::process::Output, Vec<Value>) {
    let (_d, model) = fixture_model();
    stream_json(&model, args, source)
}

/// A seeded model in a temporary directory kept alive by the returned guard.
fn fixture_model() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = fashion_model(d.path());
    (d, m)
}

/// `wae-edge stream --json --model MODEL ARGS...` started in the background.
fn spawn_stream(model: &Path, args: &[&str]) -> Child {
    Process::new(env!("CARGO_BIN_EXE_wae-edge"))
        .args(["stream", "--json", "--model"])
        .arg(model)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn frame_indices(lines: &[Value]) -> Vec<u64> {
    lines.iter().filter_map(|l| l["frame"].as_u64()).collect()
}

#[test]
fn every_frame_of_a_clip_arrives_in_order() {
    let d = tempfile::tempdir().unwrap();
    for (name, n) in [("clip.mp4", 45), ("clip.mkv", 20)] {
        let path = clip(d.path(), name, n);
        let (out, lines) = stream(&[], path.to_str().unwrap());
        assert_success(&out);
        assert_eq!(frame_indices(&lines), (0..u64::from(n)).collect::<Vec<_>>());
        // Frames keep their timestamps: a frame every 1/30 s of the video.
        let pts: Vec<f64> = lines.iter().filter_map(|l| l["pts_ms"].as_f64()).collect();
        assert_eq!(pts.len(), n as usize);
        // (H.264 in MP4 may start late by its decoding delay; the spacing is what counts.)
        for (i, t) in pts.iter().enumerate() {
            let want = pts[0] + i as f64 * 1000.0 / 30.0;
            assert!((t - want).abs() < 1.0, "frame {i} at {t} ms, not {want}");
        }
        let s = &lines.last().unwrap()["summary"];
        assert_eq!(s["frames"], n);
        assert_eq!(s["dropped"], 0, "a file is paced by the classifier");
        // The same clip as a file:// URI.
        let uri = format!("file://{}", path.display());
        let (out, lines) = stream(&[], &uri);
        assert_success(&out);
        assert_eq!(frame_indices(&lines).len(), n as usize);
    }
}

#[test]
fn loop_replays_a_clip_and_a_cut_clip_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let path = clip(d.path(), "clip.mp4", 30);
    let (out, lines) = stream(&["--loop", "--frames", "75"], path.to_str().unwrap());
    assert_success(&out);
    let idx = frame_indices(&lines);
    assert_eq!(
        idx,
        (0..75).collect::<Vec<_>>(),
        "three passes, numbered on"
    );
    // Half a file: its index (moov) is gone, so the demuxer refuses it in one line.
    let bytes = std::fs::read(&path).unwrap();
    let cut = d.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (out, lines) = stream(&[], cut.to_str().unwrap());
    if out.status.success() {
        assert!(
            frame_indices(&lines).len() < 30,
            "a cut clip cannot have every frame"
        );
    } else {
        assert_clean_failure(&out, "cut.mp4");
    }
}

#[test]
fn a_gst_pipeline_is_a_source() {
    let (out, lines) = stream(&[], "gst:videotestsrc num-buffers=12 pattern=snow");
    assert_success(&out);
    assert_eq!(frame_indices(&lines), (0..12).collect::<Vec<_>>());
    let (out, _) = stream(&[], "gst:nosuchelement");
    assert_clean_failure(&out, "gst:nosuchelement");
}

#[test]
fn csi_without_the_argus_stack_says_so() {
    let (out, _) = stream(&[], "csi://0");
    assert_clean_failure(&out, "csi://0: this system has no nvarguscamerasrc element");
}

/// GStreamer's RTSP server on a free loopback port, serving a live H.264 stream at /test.
struct RtspServer {
    child: Child,
    port: u16,
}

impl RtspServer {
    fn start_on(port: u16) -> RtspServer {
        let mut child = Process::new("/usr/bin/python3")
            .arg("tests/support/rtsp_server.py")
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (scripts/setup.sh installs python3-gi)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the RTSP server did not start");
        RtspServer { child, port }
    }

    fn start() -> RtspServer {
        // A port the OS just handed out and released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RtspServer::start_on(port)
    }

    fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/test", self.port)
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_live_rtsp_stream_is_classified_over_tcp_and_udp() {
    let server = RtspServer::start();
    for transport in ["tcp", "udp"] {
        let (out, lines) = stream(
            &[
                "--frames",
                "30",
                "--timeout",
                "10",
                "--rtsp-transport",
                transport,
            ],
            &server.url(),
        );
        assert_success(&out);
        assert_eq!(frame_indices(&lines).len(), 30, "{transport}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("GStreamer, live"));
    }
    // A path the server does not serve: its 404, in one line.
    let wrong = server.url().replace("/test", "/nope");
    let (out, _) = stream(&["--timeout", "10"], &wrong);
    assert_clean_failure(&out, "/nope");
}

#[test]
fn a_dead_rtsp_server_stalls_cleanly_or_is_reconnected() {
    let model = fixture_model();
    // Killed mid-run: a one-line error, not a hang.
    let server = RtspServer::start();
    let child = Process::new(env!("CARGO_BIN_EXE_wae-edge"))
        .args([
            "stream",
            "--json",
            "--timeout",
            "2",
            "--seconds",
            "60",
            "--model",
        ])
        .arg(&model.1)
        .arg(server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let port = server.port;
    drop(server);
    let out = child.wait_with_output().unwrap();
    assert_clean_failure(&out, &format!("rtsp://127.0.0.1:{port}/test"));
    // With --reconnect, the stream comes back when the server does.
    let server = RtspServer::start();
    let port = server.port;
    let url = server.url();
    let child = spawn_stream(
        &model.1,
        &["--timeout", "2", "--reconnect", "--frames", "150", &url],
    );
    std::thread::sleep(Duration::from_secs(2));
    drop(server);
    std::thread::sleep(Duration::from_secs(2));
    let _again = RtspServer::start_on(port);
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let last: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["summary"]["frames"], 150);
    assert!(last["summary"]["reconnects"].as_u64().unwrap() >= 1);
}

#[test]
fn an_unreachable_rtsp_url_fails_in_one_line_without_its_password() {
    let (out, _) = stream(&["--timeout", "5"], "rtsp://admin:hunter2@127.0.0.1:1/live");
    assert_clean_failure(&out, "rtsp://***@127.0.0.1:1/live");
    let all = [out.stdout, out.stderr].concat();
    assert!(!String::from_utf8_lossy(&all).contains("hunter2"));
}

#[test]
fn output_writes_a_playable_annotated_video() {
    let d = tempfile::tempdir().unwrap();
    let path = clip(d.path(), "clip.mp4", 36);
    let out_path = d.path().join("annotated.mp4");
    let (out, lines) = stream(
        &["--output", out_path.to_str().unwrap()],
        path.to_str().unwrap(),
    );
    assert_success(&out);
    assert_eq!(frame_indices(&lines).len(), 36);
    let report = Process::new("gst-discoverer-1.0")
        .arg("-v")
        .arg(&out_path)
        .output()
        .expect("gst-discoverer-1.0 (scripts/setup.sh installs gstreamer1.0-plugins-base-apps)");
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{text}");
    assert!(
        text.contains("Width: 320") && text.contains("Height: 240"),
        "{text}"
    );
    // 36 frames at 30 fps.
    assert!(text.contains("Duration: 0:00:01.2"), "{text}");
    // No temporary file is left beside it, and a bad extension is refused up front.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let (out, _) = stream(&["--output", "x.avi"], path.to_str().unwrap());
    assert_clean_failure(&out, "--output writes .mp4 or .mkv");
}

#[test]
fn output_is_finished_on_ctrl_c() {
    let model = fixture_model();
    let d = tempfile::tempdir().unwrap();
    let out_path = d.path().join("live.mkv");
    let child = spawn_stream(
        &model.1,
        &[
            "--output",
            out_path.to_str().unwrap(),
            "gst:videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let status = Process::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let report = Process::new("gst-discoverer-1.0")
        .arg("-v")
        .arg(&out_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success() && text.contains("Width: 160"),
        "{text}"
    );
}
