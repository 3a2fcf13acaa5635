//! `wae-edge stream`: frames from a camera, files or a synthetic source through the pipeline,
//! with a live status line, JSON Lines per frame, annotated snapshots and a summary at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use wae_edge::classifier::EngineKind;
use wae_edge::pipeline::{run_stream, StreamOptions, StreamSummary, STAGES};
use wae_edge::profiles::{PixelFormat, Profile};
use wae_edge::sources::{open_source, RtspTransport, SourceOptions};
use wae_edge::terminal::Escaped;
use wae_edge::Classifier;

use super::{model_path, Placement};

/// Arguments of `stream`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model file (default: the shipped model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Stop after N classified frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Stop after S seconds.
    #[arg(long, value_parser = super::seconds)]
    seconds: Option<f64>,
    /// One JSON object per frame, then a summary line.
    #[arg(long)]
    json: bool,
    /// Write annotated frames (label and score drawn) into DIR.
    #[arg(long)]
    save: Option<PathBuf>,
    /// With --save: every Nth frame.
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Classes per frame.
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one)]
    top_k: usize,
    /// Seconds without a frame before the stream fails as stalled.
    #[arg(long, default_value_t = 5.0, value_parser = super::seconds)]
    timeout: f64,
    /// Undecodable frames in a row that end the stream (or reopen the source, with
    /// --reconnect); fewer are skipped and counted as bad_frames.
    #[arg(long, default_value_t = wae_edge::pipeline::MAX_BAD_FRAMES as usize, value_parser = super::at_least_one)]
    max_bad_frames: usize,
    /// Write the annotated frames as H.264 video (.mp4 or .mkv), finished on end of stream and
    /// on Ctrl-C (feature `gstreamer`).
    #[arg(long, value_name = "FILE.mp4")]
    output: Option<PathBuf>,
    /// Serve a live preview on ADDR (e.g. 127.0.0.1:8080): `/` a page with the annotated
    /// video and live numbers, `/stream.mjpg` the video, `/stats.json` the numbers.
    #[arg(long, value_name = "ADDR")]
    serve: Option<std::net::SocketAddr>,
    /// Require this token on every preview request (`?token=` or `Authorization: Bearer`).
    #[arg(long, env = wae_edge::preview::TOKEN_ENV, hide_env_values = true)]
    serve_token: Option<String>,
    /// Preview video viewers at once; more get 503.
    #[arg(long, default_value_t = wae_edge::preview::MAX_VIEWERS, value_parser = super::at_least_one)]
    serve_viewers: usize,
    /// Frame rate recorded in --output.
    #[arg(long, default_value_t = 30, value_parser = super::at_least_one)]
    output_fps: usize,
    /// How RTSP sources are carried.
    #[arg(long, value_enum, default_value = "tcp")]
    rtsp_transport: RtspTransport,
    /// Reopen a lost or stalled source with back-off instead of failing.
    #[arg(long)]
    reconnect: bool,
    /// Restart file sources at their end.
    #[arg(long = "loop")]
    looped: bool,
    /// Decode MJPEG at full size even when the model input is small (to measure DCT scaling).
    #[arg(long)]
    full_decode: bool,
    /// Camera width (default: the profile's, else 640).
    #[arg(long)]
    width: Option<u32>,
    /// Camera height (default: the profile's, else 480).
    #[arg(long)]
    height: Option<u32>,
    /// Camera pixel format: mjpeg, yuyv or any.
    #[arg(long, value_parser = ["mjpeg", "yuyv", "any"])]
    pixel_format: Option<String>,
    /// Camera frame rate.
    #[arg(long)]
    fps: Option<u32>,
    #[command(flatten)]
    pub(super) placement: Placement,
    #[cfg(feature = "mqtt")]
    #[command(flatten)]
    mqtt: super::publish::MqttArgs,
    /// /dev/videoN, v4l2:///dev/videoN, camera:N, a file, directory or glob, synthetic:WxH[@FPS][+N].
    source: String,
}

fn summary_json(s: &StreamSummary) -> serde_json::Value {
    let stages: serde_json::Map<String, serde_json::Value> = s
        .stages
        .iter()
        .map(|(k, v)| (k.to_string(), json!({"p50_ms": v.p50_ms, "p90_ms": v.p90_ms, "p99_ms": v.p99_ms, "mean_ms": v.mean_ms, "max_ms": v.max_ms})))
        .collect();
    json!({"summary": {"frames": s.frames, "fps": s.fps, "dropped": s.dropped, "bad_frames": s.bad_frames, "reconnects": s.reconnects, "stages": stages}})
}

fn print_table(s: &StreamSummary) {
    println!(
        "{} frames, {:.1} fps, {} dropped, {} bad, {} reconnects",
        s.frames, s.fps, s.dropped, s.bad_frames, s.reconnects
    );
    println!(
        "  {:<13} {:>9} {:>9} {:>9} {:>9}",
        "stage", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for name in STAGES {
        let v = &s.stages[name];
        println!(
            "  {name:<13} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            v.p50_ms, v.p90_ms, v.p99_ms, v.max_ms
        );
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    let profile = a
        .placement
        .profile
        .as_deref()
        .map(Profile::resolve)
        .transpose()?;
    let device = a.placement.open()?;
    let model = model_path(a.model.clone());
    let clf = a.placement.load(&model, &device, EngineKind::Auto)?;
    if clf.config().untrained {
        eprintln!(
            "WARNING: {} is UNTRAINED (random weights): its labels are meaningless",
            Escaped(model.display())
        );
    }
    let mut camera = profile
        .map(|p| p.camera)
        .unwrap_or_else(|| SourceOptions::default().camera);
    camera.width = a.width.unwrap_or(camera.width);
    camera.height = a.height.unwrap_or(camera.height);
    camera.fps = a.fps.unwrap_or(camera.fps);
    if let Some(f) = &a.pixel_format {
        camera.format = match f.as_str() {
            "mjpeg" => PixelFormat::Mjpeg,
            "yuyv" => PixelFormat::Yuyv,
            _ => PixelFormat::Any,
        };
    }
    let src_opts = SourceOptions {
        camera,
        looped: a.looped,
        rtsp_transport: a.rtsp_transport,
        timeout: Duration::from_secs_f64(a.timeout),
    };
    let mut video = a
        .output
        .as_deref()
        .map(|p| VideoOut::new(p, a.output_fps))
        .transpose()?;
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut preview = a
        .serve
        .map(|addr| start_preview(&a, addr, &clf))
        .transpose()?;
    #[cfg(feature = "mqtt")]
    let mut publishing = super::publish::Publishing::start(&a.mqtt, &clf.config().name)?;
    let stop = Arc::new(AtomicBool::new(false));
    // Ctrl-C ends the stream cleanly; the summary is still printed. A second one exits.
    super::interrupt::stop_with(stop.clone());
    let opts = StreamOptions {
        max_bad_frames: u32::try_from(a.max_bad_frames).unwrap_or(u32::MAX),
        frames: a.frames,
        seconds: a.seconds,
        timeout: Duration::from_secs_f64(a.timeout),
        top_k: a.top_k.min(clf.config().classes),
        reconnect: a.reconnect,
        scaled_decode: !a.full_decode,
        overlap: None,
    };
    let live = !a.json && std::io::stderr().is_terminal();
    let mut last_status = Instant::now();
    let mut save_error: Option<anyhow::Error> = None;
    let uri = a.source.clone();
    let mut described = false;
    let mut classified = 0u64;
    let mut warned = false;
    let summary = run_stream(
        || {
            let s = open_source(&uri, &src_opts)?;
            if !described {
                eprintln!("source: {}", Escaped(s.describe()));
                described = true;
            }
            Ok(s)
        },
        &clf,
        &opts,
        &stop,
        |r, fps, img| {
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string(r).expect("plain data serialises")
                );
            } else if live && last_status.elapsed() > Duration::from_millis(100) {
                last_status = Instant::now();
                let best = &r.top[0];
                eprint!(
                    "\r{fps:8.1} fps | frame {:>7} | {:>6.2}% {:<14}",
                    r.frame,
                    best.score * 100.0,
                    Escaped(&best.label)
                );
            }
            classified += 1;
            if let Some(p) = preview.as_mut() {
                p.observe(r, fps, classified);
                p.offer_frame(img, &r.top[0]);
            }
            #[cfg(feature = "mqtt")]
            if let Some(p) = publishing.as_mut() {
                p.frame(r, &stop);
            }
            if let (false, Some(w)) = (warned, r.warnings.first()) {
                warned = true;
                let rest = if a.json {
                    ""
                } else {
                    " (later frames: see --json)"
                };
                let clear = if live { "\r" } else { "" };
                eprintln!("{clear}warning: frame {}: {}{rest}", r.frame, Escaped(w));
            }
            if let Some(v) = video.as_mut().filter(|_| save_error.is_none()) {
                if let Err(e) = v.push(&wae_edge::overlay::annotated(img, &r.top[0])) {
                    stop.store(true, Ordering::Relaxed);
                    save_error = Some(e);
                }
            }
            if let Some(dir) = &a.save {
                if (classified - 1).is_multiple_of(a.save_every.max(1)) && save_error.is_none() {
                    let rgb = wae_edge::overlay::annotated(img, &r.top[0]);
                    let path = dir.join(format!("frame_{:06}.png", r.frame));
                    let res =
                        wae_edge::atomic::write_png(&path, &image::DynamicImage::ImageRgb8(rgb))
                            .with_context(|| format!("writing {}", path.display()));
                    if let Err(e) = res {
                        stop.store(true, Ordering::Relaxed);
                        save_error = Some(e);
                    }
                }
            }
        },
    );
    if live {
        eprintln!();
    }
    let summary = summary?;
    if let Some(e) = save_error {
        return Err(e);
    }
    if let Some(v) = video {
        v.finish()?;
    }
    #[allow(unused_mut)]
    let mut summary_line = summary_json(&summary);
    #[cfg(feature = "mqtt")]
    if let Some(p) = publishing {
        let report = p.finish(summary_line["summary"].clone())?;
        summary_line["summary"]["mqtt"] = serde_json::to_value(report)?;
    }
    if a.json {
        println!("{summary_line}");
    } else {
        print_table(&summary);
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `--serve`, warning when the address is reachable from other machines.
fn start_preview(
    a: &Args,
    addr: std::net::SocketAddr,
    clf: &Classifier,
) -> Result<wae_edge::preview::Preview> {
    let token = a.serve_token.clone().filter(|t| !t.is_empty());
    let p = wae_edge::preview::Preview::start(wae_edge::preview::PreviewOptions {
        addr,
        token: token.clone(),
        max_viewers: a.serve_viewers,
        model: clf.config().name.clone(),
    })?;
    let bound = p.local_addr();
    if wae_edge::preview::is_public(&bound) {
        eprintln!(
            "warning: --serve {bound} is reachable from other machines{}",
            if token.is_some() {
                ""
            } else {
                "; anyone who reaches it sees the camera (set --serve-token)"
            }
        );
    }
    eprintln!(
        "preview: http://{bound}/{}{}",
        if token.is_some() { "?token=..." } else { "" },
        if bound.ip().is_unspecified() {
            " (on any of this machine's addresses)"
        } else {
            ""
        }
    );
    Ok(p)
}

/// `--output`: the video is started at the first frame's size. (Without GStreamer it cannot be
/// made, so its fields go unread.)
#[cfg_attr(not(all(feature = "gstreamer", target_os = "linux")), allow(dead_code))]
struct VideoOut {
    path: PathBuf,
    fps: u32,
    #[cfg(all(feature = "gstreamer", target_os = "linux"))]
    writer: Option<wae_edge::video_out::VideoWriter>,
}

impl VideoOut {
    #[cfg(all(feature = "gstreamer", target_os = "linux"))]
    fn new(path: &std::path::Path, fps: usize) -> Result<VideoOut> {
        wae_edge::video_out::muxer(path)?;
        Ok(VideoOut {
            path: path.into(),
            fps: u32::try_from(fps).unwrap_or(u32::MAX).min(1000),
            writer: None,
        })
    }

    #[cfg(not(all(feature = "gstreamer", target_os = "linux")))]
    fn new(path: &std::path::Path, _: usize) -> Result<VideoOut> {
        anyhow::bail!(
            "{}: --output writes video through GStreamer, which this build lacks; rebuild with `cargo build --release --features gstreamer` (Linux)",
            path.display()
        )
    }

    #[cfg(all(feature = "gstreamer", target_os = "linux"))]
    fn push(&mut self, frame: &image::RgbImage) -> Result<()> {
        if self.writer.is_none() {
            self.writer = Some(wae_edge::video_out::VideoWriter::create(
                &self.path,
                frame.width(),
                frame.height(),
                self.fps,
            )?);
        }
        self.writer.as_mut().expect("created above").push(frame)?;
        Ok(())
    }

    #[cfg(not(all(feature = "gstreamer", target_os = "linux")))]
    fn push(&mut self, _: &image::RgbImage) -> Result<()> {
        Ok(())
    }

    /// Finishes the file; a run that classified nothing writes none.
    fn finish(self) -> Result<()> {
        #[cfg(all(feature = "gstreamer", target_os = "linux"))]
        if let Some(w) = self.writer {
            let frames = w.finish()?;
            eprintln!(
                "wrote {} ({frames} frames at {} fps)",
                Escaped(self.path.display()),
                self.fps
            );
        }
        Ok(())
    }
}
