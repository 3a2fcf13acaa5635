//! Every bad input the foundation issue names gets one error line naming the file and the
//! problem, a non-zero exit, and no panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use safetensors::Dtype;
use wae_edge::config::CONFIG_KEY;

/// Runs `classify` with `model` on a good image and checks the failure.
fn classify_fails(model: &Path, needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let img = sample_png(d.path(), "ok.png");
    let out = bin()
        .args(["classify", "--model"])
        .arg(model)
        .arg(&img)
        .output()
        .unwrap();
    assert_clean_failure(&out, needle);
    let name = model.file_name().unwrap().to_string_lossy();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains(name.as_ref())),
        "error must name the file: {stderr}"
    );
}

fn with_model(
    edit: impl FnOnce(&mut wae_edge::ModelConfig, &mut Vec<(String, Raw)>),
) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (mut cfg, mut raws) = raw_model("wae-fashion");
    edit(&mut cfg, &mut raws);
    let p = d.path().join("broken.safetensors");
    write_model(&p, &cfg, &raws);
    (d, p)
}

#[test]
fn missing_model_file() {
    classify_fails(Path::new("/nonexistent/model.safetensors"), "No such file");
}

#[test]
fn zero_byte_model() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.safetensors");
    std::fs::write(&p, b"").unwrap();
    classify_fails(&p, "empty file");
}

#[test]
fn truncated_model() {
    let d = tempfile::tempdir().unwrap();
    let good = fashion_model(d.path());
    let bytes = std::fs::read(&good).unwrap();
    let p = d.path().join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    classify_fails(&p, "not a valid safetensors file");
}

#[test]
fn random_bytes_model() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("random.safetensors");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&p, bytes).unwrap();
    classify_fails(&p, "not a valid safetensors file");
}

#[test]
fn header_pointing_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    let header = br#"{"x":{"dtype":"F16","shape":[1024],"data_offsets":[0,2048]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    let p = d.path().join("short.safetensors");
    std::fs::write(&p, bytes).unwrap();
    classify_fails(&p, "not a valid safetensors file");
}

#[test]
fn missing_tensor() {
    let (_d, p) = with_model(|_, raws| raws.retain(|(n, _)| n != "head_low.fc0.weight"));
    classify_fails(&p, "tensor `head_low.fc0.weight` is missing");
}

#[test]
fn wrong_shaped_tensor() {
    let (_d, p) = with_model(|_, raws| {
        let t = &mut raws
            .iter_mut()
            .find(|(n, _)| n == "backbone.s0.c0.weight")
            .unwrap()
            .1;
        t.shape = vec![t.shape[0] / 2, 2, 3, 3];
    });
    classify_fails(
        &p,
        "tensor `backbone.s0.c0.weight` has shape [32, 2, 3, 3], the config expects [64, 1, 3, 3]",
    );
}

#[test]
fn wrong_dtype_tensor() {
    let (_d, p) = with_model(|_, raws| {
        let t = &mut raws
            .iter_mut()
            .find(|(n, _)| n == "encoder.low.bias")
            .unwrap()
            .1;
        t.dtype = Dtype::F32;
        t.data = vec![0u8; 4 * t.shape.iter().product::<usize>()];
    });
    classify_fails(&p, "tensor `encoder.low.bias` is F32");
}

#[test]
fn missing_metadata() {
    let d = tempfile::tempdir().unwrap();
    let (_, raws) = raw_model("wae-fashion");
    let p = d.path().join("nometa.safetensors");
    write_raw(&p, &raws, None);
    classify_fails(&p, "missing metadata");
}

#[test]
fn malformed_metadata() {
    let d = tempfile::tempdir().unwrap();
    let (_, raws) = raw_model("wae-fashion");
    let p = d.path().join("badmeta.safetensors");
    write_raw(
        &p,
        &raws,
        Some(HashMap::from([(
            CONFIG_KEY.to_string(),
            "{\"format\": 1, \"name\": ".to_string(),
        )])),
    );
    classify_fails(&p, "malformed model config");
}

#[test]
fn label_count_mismatch() {
    let (_d, p) = with_model(|cfg, _| {
        cfg.labels.pop();
    });
    classify_fails(&p, "label count 9 does not match the model's 10 classes");
}

#[test]
fn config_that_disagrees_with_tensors() {
    // The config says a wider first conv than the tensors hold.
    let (_d, p) = with_model(|cfg, _| cfg.arch.backbone[0][0] = 48);
    classify_fails(
        &p,
        "tensor `backbone.s0.c0.bias` has shape [64], the config expects [48]",
    );
}

fn classify_image_fails(write: impl FnOnce(&Path), needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let img = d.path().join("frame.png");
    write(&img);
    let out = bin()
        .args(["classify", "--model"])
        .arg(&model)
        .arg(&img)
        .output()
        .unwrap();
    assert_clean_failure(&out, needle);
    assert!(String::from_utf8_lossy(&out.stderr).contains("frame.png"));
}

#[test]
fn corrupt_image() {
    classify_image_fails(
        |p| std::fs::write(p, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap(),
        "cannot decode image",
    );
}

#[test]
fn zero_byte_image() {
    classify_image_fails(|p| std::fs::write(p, b"").unwrap(), "empty file");
}

#[test]
fn image_claiming_enormous_dimensions() {
    classify_image_fails(
        |p| std::fs::write(p, png_header(100_000, 100_000, 8, 6)).unwrap(),
        "image too large to decode",
    );
}

#[test]
fn missing_image() {
    let d = tempfile::tempdir().unwrap();
    let model = fashion_model(d.path());
    let out = bin()
        .args(["classify", "--model"])
        .arg(&model)
        .arg(d.path().join("nope.jpg"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "nope.jpg: no such file or directory");
}

#[test]
fn unknown_profile_key() {
    let Fixture { dir: d, model, img } = fixture();
    let text = std::fs::read_to_string("firmware-profiles/x86-64-cpu.toml").unwrap()
        + "\noverclock = true\n";
    let prof = d.path().join("mine.toml");
    std::fs::write(&prof, text).unwrap();
    let out = run_with_model("classify", &model, [Path::new("--profile"), &prof, &img]);
    assert_clean_failure(&out, "overclock");
    let out = bin()
        .args(["classify", "--profile", "no-such-board", "--model"])
        .arg(&model)
        .arg(&img)
        .output()
        .unwrap();
    assert_clean_failure(&out, "unknown profile `no-such-board`");
}

#[test]
fn cuda_graph_on_elsewhere_is_one_line_and_auto_or_off_change_nothing() {
    let Fixture {
        dir: _d,
        model,
        img,
    } = fixture();
    for command in ["classify", "bench"] {
        let mut c = bin();
        c.args([command, "--device", "cpu", "--cuda-graph", "on", "--model"])
            .arg(&model);
        if command == "classify" {
            c.arg(&img);
        }
        let out = c.output().unwrap();
        assert_clean_failure(&out, "CUDA graphs need --device cuda");
    }
    let out = bin()
        .args([
            "stream",
            "--device",
            "cpu",
            "--cuda-graph",
            "on",
            "--frames",
            "1",
        ])
        .arg("synthetic:64x48")
        .output()
        .unwrap();
    assert_clean_failure(&out, "CUDA graphs need --device cuda");
    let out = bin()
        .args(["classify", "--cuda-graph", "sometimes", "--model"])
        .arg(&model)
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: auto, on, off"));
    for mode in ["auto", "off"] {
        let out = bin()
            .args([
                "classify",
                "--device",
                "cpu",
                "--cuda-graph",
                mode,
                "--model",
            ])
            .arg(&model)
            .arg(&img)
            .output()
            .unwrap();
        assert_success(&out);
    }
}

#[test]
fn device_this_build_cannot_use() {
    let Fixture {
        dir: _d,
        model,
        img,
    } = fixture();
    if !cfg!(feature = "cuda") {
        let out = bin()
            .args(["classify", "--device", "cuda", "--model"])
            .arg(&model)
            .arg(&img)
            .output()
            .unwrap();
        assert_clean_failure(&out, "--features cuda");
        let out = bin()
            .args(["classify", "--profile", "jetson-orin-nano", "--model"])
            .arg(&model)
            .arg(&img)
            .output()
            .unwrap();
        assert_clean_failure(&out, "--features cuda");
        // Training fails before it loads data or creates its run directory.
        let run = _d.path().join("run");
        let out = bin()
            .args(["train", "--device", "cuda", "--limit", "10", "--out"])
            .arg(&run)
            .output()
            .unwrap();
        assert_clean_failure(&out, "--features cuda");
        assert!(!run.exists());
    }
    if !cfg!(feature = "metal") {
        let out = bin()
            .args(["classify", "--device", "metal", "--model"])
            .arg(&model)
            .arg(&img)
            .output()
            .unwrap();
        assert_clean_failure(&out, "--features metal");
    }
}

#[test]
fn branch_width_out_of_range() {
    // Rejected with the config's own check, before any data loads or the run directory exists.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    for w in ["0", "1.5"] {
        let out = bin()
            .args(["train", "--branch-width", w, "--limit", "10", "--out"])
            .arg(&run)
            .output()
            .unwrap();
        assert_clean_failure(&out, &format!("branch_width {w} outside (0, 1]"));
        assert!(!run.exists());
    }
}
