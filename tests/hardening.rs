//! An unattended camera box's failure modes, each through the real binary: webcam frames
//! without Huffman tables, bad frames in a stream, rotated phone pictures, unsupported URIs,
//! hostile text, special files, model files cut short while loading, configs and images that
//! explode, interrupted writers, and absurd options.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SHIPPED: &str = "models/fashion-wae/model.safetensors";
const SAMPLES: &str = "models/fashion-wae/samples";

fn shipped_samples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(SAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

/// A picture as a webcam sends it: RGB, 4:2:2, the standard Huffman tables (not optimised),
/// then its DHT and APP0 segments removed.
fn webcam_jpeg(img: &image::RgbImage) -> Vec<u8> {
    wae_edge::mjpeg::strip_tables(&jpeg(img, |enc| {
        enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_2);
        enc.set_optimized_huffman_tables(false);
    }))
}

/// `img` as a quality-95 JPEG from jpeg-encoder, set up by `setup` first.
fn jpeg(
    img: &image::RgbImage,
    setup: impl FnOnce(&mut jpeg_encoder::Encoder<&mut Vec<u8>>),
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 95);
    setup(&mut enc);
    enc.encode(
        img.as_raw(),
        img.width() as u16,
        img.height() as u16,
        jpeg_encoder::ColorType::Rgb,
    )
    .unwrap();
    out
}

/// Top-1 labels of `classify --json` over `inputs`, in order.
fn top1(model: &str, inputs: &[&Path]) -> Vec<String> {
    let out = bin()
        .args(["classify", "--json", "--model", model])
        .args(inputs)
        .output()
        .unwrap();
    assert_success(&out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["top"][0]["label"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn webcam_frames_without_huffman_tables_classify_like_their_pictures() {
    let d = tempfile::tempdir().unwrap();
    let samples = shipped_samples();
    let mut frames = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        // A camera's frame: RGB, larger than the model's input.
        let gray = image::open(s).unwrap().to_luma8();
        let big = image::imageops::resize(&gray, 112, 112, image::imageops::FilterType::Nearest);
        let rgb = image::DynamicImage::ImageLuma8(big).to_rgb8();
        let jpeg = webcam_jpeg(&rgb);
        assert!(
            !jpeg.windows(2).any(|w| w == [0xFF, 0xC4]),
            "the frame still has a DHT segment"
        );
        let p = d.path().join(format!("frame_{i:02}.jpg"));
        std::fs::write(&p, &jpeg).unwrap();
        frames.push(p);
    }
    let want = top1(
        SHIPPED,
        &samples.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let got = top1(
        SHIPPED,
        &frames.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    assert_eq!(got, want);
    // The directory streams through, every frame classified, none bad.
    let (out, lines) = stream_json(Path::new(SHIPPED), &[], d.path());
    assert_success(&out);
    assert_eq!(lines.len(), samples.len() + 1);
    let streamed: Vec<&str> = lines[..samples.len()]
        .iter()
        .map(|l| l["top"][0]["label"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, want);
    assert_eq!(lines[samples.len()]["summary"]["bad_frames"], 0);
}

#[test]
fn a_bad_frame_is_skipped_and_counted_and_a_run_of_them_ends_the_stream() {
    let Fixture { dir: d, model, .. } = fixture();
    let frames = d.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    for i in 0..8 {
        let p = frames.join(format!("{i:02}.png"));
        if i == 2 || i == 5 {
            std::fs::write(&p, b"\x89PNG\r\n\x1a\n not really").unwrap();
        } else {
            sample_png(&frames, &format!("{i:02}.png"));
        }
    }
    let (out, lines) = stream_json(&model, &[], &frames);
    assert_success(&out);
    assert_eq!(lines.len(), 7, "6 frames and the summary");
    let indices: Vec<u64> = lines[..6]
        .iter()
        .map(|l| l["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 3, 4, 6, 7]);
    assert_eq!(lines[6]["summary"]["bad_frames"], 2);
    assert_eq!(lines[6]["summary"]["frames"], 6);
    // Nothing but bad frames: the stream ends after --max-bad-frames of them in a row.
    let bad = d.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for i in 0..12 {
        std::fs::write(bad.join(format!("{i:02}.jpg")), b"\xFF\xD8\xFF garbage").unwrap();
    }
    let (out, _) = stream_json(&model, &["--max-bad-frames", "5"], &bad);
    assert_clean_failure(&out, "5 frames in a row could not be decoded");
}

/// A minimal EXIF block (APP1 payload) with one tag: Orientation.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut e = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    e.extend_from_slice(&1u16.to_be_bytes()); // one entry
    e.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    e.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    e.extend_from_slice(&1u32.to_be_bytes()); // one value
    e.extend_from_slice(&value.to_be_bytes());
    e.extend_from_slice(&[0, 0]); // padding of the value field
    e.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    e
}

#[test]
fn phone_pictures_are_classified_the_way_they_are_seen() {
    let d = tempfile::tempdir().unwrap();
    let sample = Path::new(SAMPLES).join("01_trouser.png");
    let upright = image::open(&sample).unwrap().to_rgb8();
    // Stored turned a quarter to the left, with the tag that says "turn right to view".
    let stored = image::imageops::rotate270(&upright);
    let encode = |exif: Option<Vec<u8>>| {
        jpeg(&stored, |enc| {
            if let Some(e) = exif {
                enc.add_app_segment(1, e).unwrap();
            }
        })
    };
    let tagged = d.path().join("tagged.jpg");
    std::fs::write(&tagged, encode(Some(exif_orientation(6)))).unwrap();
    let untagged = d.path().join("untagged.jpg");
    std::fs::write(&untagged, encode(None)).unwrap();
    let got = top1(SHIPPED, &[&tagged, &untagged, &sample]);
    assert_eq!(got[0], "Trouser", "the tag was not applied");
    assert_eq!(got[2], "Trouser");
    assert_ne!(
        got[1], "Trouser",
        "the sideways picture should look different"
    );
}

#[test]
fn unsupported_uris_say_what_this_build_reads_and_never_echo_credentials() {
    let Fixture { dir: _d, model, .. } = fixture();
    // Schemes no build reads (with the `gstreamer` feature, csi://, rtsp:// and file:// are
    // sources: tests/gstreamer.rs).
    for (uri, scheme) in [
        ("http://192.0.2.1/video.mjpg", "http"),
        ("ftp://admin:hunter2@192.0.2.1/clip", "ftp"),
    ] {
        let out = run_with_model("stream", &model, [uri]);
        assert_clean_failure(&out, &format!("{scheme}:// sources are not supported"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("synthetic:") && err.contains("/dev/video"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "credentials leaked: {err}");
    }
    for (uri, scheme) in [
        ("rtsp://admin:hunter2@192.0.2.1:554/stream", "rtsp"),
        ("csi://0", "csi"),
    ] {
        let out = run_with_model("classify", &model, [uri]);
        assert_clean_failure(&out, &format!("{scheme}:// is not a file"));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    }
}

/// No byte that could drive a terminal: C0 controls other than the newline, DEL, and the
/// UTF-8 forms of C1 controls and bidi overrides.
fn assert_terminal_safe(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for c in text.chars() {
        assert!(
            c == '\n' || !(c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c)),
            "{what} holds {c:?}: {text:?}"
        );
    }
}

#[test]
fn untrusted_text_is_escaped_on_the_terminal_and_exact_in_json() {
    let d = tempfile::tempdir().unwrap();
    let (mut cfg, raws) = raw_model("wae-fashion");
    let forged = "Bag\n  99.99%  class #0   T-shirt/top";
    cfg.labels[0] = forged.into();
    cfg.labels[1] = "\u{1b}]0;pwned\u{7}\u{1b}[31mred".into();
    cfg.labels[2] = "gpj.\u{202e}exe".into();
    cfg.labels[3] = "nul\0byte".into();
    cfg.name = "name\u{1b}[2J".into();
    let model = d.path().join("hostile.safetensors");
    write_model(&model, &cfg, &raws);
    let img = sample_png(d.path(), "x\n  12.00%  class #4   Forged.png");
    let out = run_with_model(
        "classify",
        &model,
        [OsStr::new("--top-k"), "10".as_ref(), img.as_os_str()],
    );
    assert_success(&out);
    assert_terminal_safe("stdout", &out.stdout);
    assert_terminal_safe("stderr", &out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        11,
        "one path line and ten classes: {stdout}"
    );
    assert!(stdout.contains("Bag\\n  99.99%"), "{stdout}");
    assert!(stdout.contains("\\u{1b}]0;pwned"), "{stdout}");
    // JSON carries the labels exactly (escaped by JSON's own rules).
    let out = classify_json(&model, &img, &["--top-k", "10"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = v["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["label"].as_str().unwrap())
        .collect();
    assert!(labels.contains(&forged));
    // The model's name, a stream's labels, a profile's name, and an error naming the file.
    for args in [
        vec!["inspect".to_string(), model.to_str().unwrap().to_string()],
        vec![
            "stream".into(),
            "--frames".into(),
            "3".into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "synthetic:64x64".into(),
        ],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_success(&out);
        assert_terminal_safe(&args[0], &out.stdout);
        assert_terminal_safe(&args[0], &out.stderr);
    }
    let text = std::fs::read_to_string("firmware-profiles/x86-64-cpu.toml")
        .unwrap()
        .replace(
            "name = \"x86-64-cpu\"",
            "name = \"cpu\\u001b]0;owned\\u0007\"",
        );
    let prof = d.path().join("p.toml");
    std::fs::write(&prof, text).unwrap();
    let out = run_with_model("classify", &model, [Path::new("--profile"), &prof, &img]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("\\u{1b}]0;owned"));
    assert_terminal_safe("profile", &out.stderr);
    let missing = d.path().join("gone\u{1b}[2J.png");
    let out = run_with_model("classify", &model, [&missing]);
    assert_clean_failure(&out, "gone\\u{1b}[2J.png");
    assert_terminal_safe("error", &out.stderr);
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let status = Process::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn special_files_are_refused_before_reading_without_blocking() {
    let Fixture { dir: d, model, img } = fixture();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    let run = |args: Vec<std::ffi::OsString>| {
        bin()
            .args(args)
            .timeout(Duration::from_secs(20))
            .output()
            .unwrap()
    };
    let os = std::ffi::OsString::from;
    let (m, i) = (model.as_os_str().to_owned(), img.as_os_str().to_owned());
    let y = d.path().join("y.f32");
    for (special, needle) in [
        (fifo.clone(), "FIFO"),
        (PathBuf::from("/dev/zero"), "character device"),
        (d.path().to_path_buf(), "a directory"),
    ] {
        let s = special.as_os_str().to_owned();
        // As the model, as a profile, and as the input of `logits`.
        let out = run(vec![os("classify"), os("--model"), s.clone(), i.clone()]);
        assert_clean_failure(&out, needle);
        let out = run(vec![
            os("classify"),
            os("--profile"),
            s.clone(),
            os("--model"),
            m.clone(),
            i.clone(),
        ]);
        assert_clean_failure(&out, needle);
        let out = run(vec![
            os("logits"),
            os("--model"),
            m.clone(),
            os("--input"),
            s,
            os("-o"),
            y.as_os_str().to_owned(),
        ]);
        assert_clean_failure(&out, needle);
        assert!(!y.exists());
    }
    // As an image, and as a stream source.
    let out = run(vec![
        os("classify"),
        os("--model"),
        m.clone(),
        fifo.as_os_str().to_owned(),
    ]);
    assert_clean_failure(&out, "FIFO");
    let out = run(vec![
        os("stream"),
        os("--model"),
        m,
        fifo.as_os_str().to_owned(),
    ]);
    assert_clean_failure(&out, "FIFO");
}

#[test]
fn a_model_cut_short_while_it_loads_is_an_error_not_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let source = d.path().join("wae-vgg16.safetensors");
    assert_success(
        &bin()
            .args(["new", "--preset", "wae-vgg16", "-o"])
            .arg(&source)
            .output()
            .unwrap(),
    );
    let img = Path::new(SAMPLES).join("00_t-shirt-top.png");
    let mut cut_short = 0;
    for (i, delay_ms) in [20u64, 60, 120, 250].into_iter().enumerate() {
        let model = d.path().join(format!("copy{i}.safetensors"));
        std::fs::copy(&source, &model).unwrap();
        let child = Process::new(env!("CARGO_BIN_EXE_wae-edge"))
            .args(["classify", "--model"])
            .arg(&model)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        // Finished first (0) or refused the file (1); never a signal.
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if code == Some(1) {
            assert_clean_failure(&out, "copy");
            cut_short += usize::from(String::from_utf8_lossy(&out.stderr).contains("cut short"));
        }
    }
    assert!(cut_short > 0, "no run was cut short while it loaded");
}

#[test]
fn configs_that_explode_are_refused_before_anything_is_built() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, raws) = raw_model("wae-fashion");
    let mut json: Value = serde_json::from_str(&cfg.to_json()).unwrap();
    type Change = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "stages",
            Box::new(|j| j["arch"]["backbone"] = serde_json::json!(vec![vec![8]; 1_000_000])),
            "1000000 backbone stages",
        ),
        (
            "convs",
            Box::new(|j| j["arch"]["backbone"] = serde_json::json!([vec![8; 2_000_000]])),
            "a backbone stage of 2000000 convs",
        ),
        (
            "decoder",
            Box::new(|j| j["arch"]["decoder"]["convs"] = serde_json::json!(1_000_000_000u64)),
            "1000000000 decoder convs",
        ),
        (
            "classes",
            Box::new(|j| {
                j["classes"] = serde_json::json!(500_000);
                j["labels"] = serde_json::json!(vec!["x"; 500_000]);
            }),
            "500000 classes",
        ),
    ];
    for (name, change, needle) in cases {
        let original = json.clone();
        change(&mut json);
        let p = d.path().join(format!("{name}.safetensors"));
        write_raw(
            &p,
            &raws,
            Some(std::collections::HashMap::from([(
                wae_edge::config::CONFIG_KEY.to_string(),
                json.to_string(),
            )])),
        );
        json = original;
        for cmd in ["classify", "inspect"] {
            let mut c = bin();
            c.arg(cmd);
            if cmd == "classify" {
                c.arg("--model")
                    .arg(&p)
                    .arg(Path::new(SAMPLES).join("01_trouser.png"));
            } else {
                c.arg(&p);
            }
            let out = c.timeout(Duration::from_secs(30)).output().unwrap();
            assert_clean_failure(&out, needle);
        }
    }
}

#[test]
fn images_and_synthetic_sources_too_big_after_decoding_are_refused() {
    let Fixture { dir: d, model, .. } = fixture();
    // 16-bit gray, 16384 x 16383: within the side limit, 512 MiB decoded, 268 megapixels.
    let big = d.path().join("big16.png");
    std::fs::write(&big, png_header(16384, 16383, 16, 0)).unwrap();
    let out = run_with_model("classify", &model, [&big]);
    assert_clean_failure(&out, "image too large to decode");
    let out = run_with_model("stream", &model, ["--frames", "1", "synthetic:8192x8192"]);
    assert_clean_failure(&out, "not in 8..=4096");
}

/// SIGINT to a child process.
fn interrupt(child: &std::process::Child) {
    // Directly, not through kill(1): the signal must land while the file is being written.
    // SAFETY: kill(2) with a child's pid and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
}

#[test]
fn an_interrupted_writer_leaves_no_temporary_file() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("big.safetensors");
    let temps = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count()
    };
    // The 277 MB file is written in well under a second: interrupt it while its temporary
    // file exists, retrying if the writer happens to finish first.
    let mut interrupted = false;
    for _ in 0..3 {
        let mut child = Process::new(env!("CARGO_BIN_EXE_wae-edge"))
            .args(["new", "--preset", "vgg16", "-o"])
            .arg(&target)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while temps() == 0 && start.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        interrupt(&child);
        let out = child.wait_with_output().unwrap();
        assert_eq!(temps(), 0, "a temporary file was left behind");
        if target.exists() {
            // The writer finished (and renamed a complete file) before the signal landed.
            assert!(
                matches!(out.status.code(), Some(0 | 130)),
                "{:?}",
                out.status
            );
            std::fs::remove_file(&target).unwrap();
            continue;
        }
        assert_eq!(out.status.code(), Some(130), "{:?}", out.status);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("removed 1 unfinished file"), "{err}");
        interrupted = true;
        break;
    }
    assert!(interrupted, "the writer finished before every interrupt");
}

#[test]
fn absurd_options_get_one_error_line() {
    let Fixture { dir: d, model, img } = fixture();
    let m = model.to_str().unwrap();
    let i = img.to_str().unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), b"no images here").unwrap();
    let e = empty.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = ["inf", "1e300", "NaN"]
        .into_iter()
        .map(|t| {
            (
                vec!["stream", "--model", m, "--timeout", t, "synthetic:64x64"],
                "--timeout",
            )
        })
        .collect();
    cases.extend([
        (
            vec!["stream", "--model", m, "--seconds=-1", "synthetic:64x64"],
            "--seconds",
        ),
        (vec!["bench", "--model", m, "--iters", "0"], "--iters"),
        (vec!["bench", "--model", m, "--batch", "0"], "--batch"),
        (
            vec!["bench", "--model", m, "--threads", "100000", "--iters", "1"],
            "100000 threads",
        ),
        (vec!["classify", "--model", m, "--top-k", "0", i], "--top-k"),
        (
            vec!["classify", "--model", m, e],
            "no .jpg, .jpeg, .png files",
        ),
        (vec!["eval", "--model", m, "--batch", "0"], "--batch"),
    ]);
    for (args, needle) in cases {
        let out = bin()
            .args(&args)
            .timeout(Duration::from_secs(30))
            .output()
            .unwrap();
        assert_clean_failure(&out, needle);
    }
    for (value, needle) in [("100000", "100000 threads"), ("lots", "RAYON_NUM_THREADS")] {
        let out = bin()
            .env("RAYON_NUM_THREADS", value)
            .args(["classify", "--model", m, i])
            .output()
            .unwrap();
        assert_clean_failure(&out, needle);
    }
    if !cfg!(feature = "cuda") {
        let out = bin()
            .args(["classify", "--profile", "jetson-orin-nano", "--model", m, i])
            .output()
            .unwrap();
        assert_clean_failure(
            &out,
            "profile `jetson-orin-nano` asks for a device this build cannot use: this build has no CUDA support",
        );
    }
}
