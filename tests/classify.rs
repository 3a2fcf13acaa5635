//! `wae-edge classify` end to end: outputs, input expansion, and the decoder-never-read property.

mod common;

use common::*;

#[test]
fn json_lines_have_input_top_and_ms() {
    let Fixture {
        dir: _d,
        model,
        img,
    } = fixture();
    let out = classify_json(&model, &img, &["--top-k", "10"]);
    assert_success(&out);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    assert_eq!(l["input"], img.to_string_lossy().as_ref());
    assert!(l["ms"].as_f64().unwrap() > 0.0);
    let top = l["top"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    let scores: Vec<f64> = top.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted best first");
    assert!(
        (scores.iter().sum::<f64>() - 1.0).abs() < 1e-3,
        "softmax over all classes sums to 1"
    );
    let classes: std::collections::BTreeSet<u64> =
        top.iter().map(|p| p["class"].as_u64().unwrap()).collect();
    assert_eq!(classes.len(), 10);
    assert_eq!(
        top.iter().find(|p| p["class"] == 9).unwrap()["label"],
        "Ankle boot"
    );
    // A model from `new` is loudly untrained.
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNTRAINED"));
    assert_eq!(l["untrained"], true);
}

#[test]
fn human_output_lists_top_k_like_imagenet() {
    let Fixture {
        dir: _d,
        model,
        img,
    } = fixture();
    let out = bin()
        .args(["classify", "--top-k", "3", "--device", "cpu", "--model"])
        .arg(&model)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with(img.to_str().unwrap()) && lines[0].ends_with("ms)"));
    assert!(lines[1..]
        .iter()
        .all(|l| l.contains("% ") && l.contains("class #")));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device: cpu"));
}

#[test]
fn directories_and_globs_expand_and_one_bad_file_fails_the_run() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let imgs = d.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for n in ["1.png", "2.png", "3.png"] {
        sample_png(&imgs, n);
    }
    std::fs::write(imgs.join("readme.txt"), "not an image").unwrap();
    let out = classify_json(&model, &imgs, &[]);
    assert!(out.status.success());
    assert_eq!(json_lines(&out).len(), 3);
    let glob = imgs.join("[12].png");
    let out = classify_json(&model, &glob, &[]);
    assert_eq!(json_lines(&out).len(), 2);
    // A corrupt image among good ones: the good ones are still classified, the run fails.
    std::fs::write(imgs.join("4.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let out = classify_json(&model, &imgs, &[]);
    assert_eq!(json_lines(&out).len(), 3);
    assert_clean_failure(&out, "4.png");
}

/// Weights of the decoder are never read: garbage or absent decoder tensors change nothing.
#[test]
fn decoder_tensors_are_never_read() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, raws) = raw_model("wae-fashion");
    assert!(raws.iter().any(|(n, _)| n.starts_with("decoder.")));
    let good = d.path().join("good.safetensors");
    write_model(&good, &cfg, &raws);
    let garbage = with_nan(&raws, |n| n.starts_with("decoder."));
    let garbled = d.path().join("garbled.safetensors");
    write_model(&garbled, &cfg, &garbage);
    let stripped = d.path().join("stripped.safetensors");
    write_model(
        &stripped,
        &cfg,
        &raws
            .iter()
            .filter(|(n, _)| !n.starts_with("decoder."))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let img = sample_png(d.path(), "x.png");
    let top = |m: &std::path::Path| {
        let out = classify_json(m, &img, &["--top-k", "10"]);
        assert!(
            out.status.success(),
            "{}: {}",
            m.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&out)[0]["top"].clone()
    };
    let reference = top(&good);
    assert_eq!(top(&garbled), reference);
    assert_eq!(top(&stripped), reference);
    // The same garbage in an inference tensor is read, detected and refused.
    let bad: Vec<_> = raws
        .iter()
        .map(|(n, r)| {
            let mut r = r.clone();
            if n == "head_low.fc0.weight" {
                r.data[..64].iter_mut().for_each(|b| *b = 0xff);
            }
            (n.clone(), r)
        })
        .collect();
    let nan = d.path().join("nan.safetensors");
    write_model(&nan, &cfg, &bad);
    let out = bin()
        .args(["classify", "--model"])
        .arg(&nan)
        .arg(&img)
        .output()
        .unwrap();
    assert_clean_failure(&out, "head_low.fc0.weight");
}

#[test]
fn the_model_runs_in_the_library_with_the_shapes_the_paper_gives() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, raws) = raw_model("wae-fashion");
    let p = d.path().join("m.safetensors");
    write_model(&p, &cfg, &raws);
    let net = wae_edge::weights::load(&p, &candle_core::Device::Cpu).unwrap();
    let x = candle_core::Tensor::zeros(
        (4, 1, 28, 28),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (low, high) = net.split(&x, false).unwrap();
    assert_eq!(low.dims(), &[4, 1, 14, 14]);
    assert_eq!(high.unwrap().dims(), &[4, 1, 14, 14]);
    let (logits, times) = net.forward_timed(&x).unwrap();
    assert_eq!(logits.dims(), &[4, 10]);
    assert!(times.backbone > std::time::Duration::ZERO);
}

#[test]
fn decompose_writes_the_split_as_pictures() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let img = sample_png(d.path(), "boot.png");
    let out_dir = d.path().join("dec");
    let out = bin()
        .args(["decompose", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(&out_dir)
        .arg(&img)
        .output()
        .unwrap();
    assert_success(&out);
    for part in ["input", "low", "high", "rec", "strip"] {
        let p = out_dir.join(format!("boot_{part}.png"));
        let pic = image::open(&p).unwrap();
        let want = match part {
            "input" | "rec" => (28, 28),
            "low" | "high" => (14, 14),
            _ => (4 * 224 + 3 * 14, 224),
        };
        assert_eq!((pic.width(), pic.height()), want, "{part}");
    }
    // Stretched: the low image uses the full range.
    let low = image::open(out_dir.join("boot_low.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(low.pixels().map(|p| p.0[0]).max(), Some(255));
    assert_eq!(low.pixels().map(|p| p.0[0]).min(), Some(0));
    // A model without I_H has nothing to decompose.
    let (cfg, raws) = raw_model("plain-fashion");
    let plain = d.path().join("plain.safetensors");
    write_model(&plain, &cfg, &raws);
    let out = bin()
        .args(["decompose", "--model"])
        .arg(&plain)
        .arg("-o")
        .arg(&out_dir)
        .arg(&img)
        .output()
        .unwrap();
    assert_clean_failure(&out, "plain.safetensors");
}

/// `wae-edge classify DIR | head -1`: once the reader goes away, the process ends quietly (as
/// `cat` does, by SIGPIPE) instead of panicking in `println!`.
#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    use std::io::{BufRead, BufReader};
    // 500 images: the run is still printing long after the reader has gone.
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("wae-edge"))
        .args(["classify", "--device", "cpu"])
        .args(["models/fashion-wae/samples"; 50])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("samples"), "{first}");
    // The reader is dropped here; the remaining lines go to a closed pipe.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}
