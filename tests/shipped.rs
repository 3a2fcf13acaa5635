//! The shipped models: they load, are trained, and `eval` reproduces the test accuracy their
//! metadata (and model card) records.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const DATASET: &str = "/usr/share/datasets/fashion-mnist";

fn shipped() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir("models")
        .unwrap()
        .map(|e| e.unwrap().path().join("model.safetensors"))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v
}

#[test]
fn the_default_model_is_shipped_trained_and_classifies_the_samples() {
    assert!(
        Path::new(wae_edge::DEFAULT_MODEL).exists(),
        "the README's first command needs {}",
        wae_edge::DEFAULT_MODEL
    );
    let out = bin()
        .args([
            "classify",
            "--json",
            "--device",
            "cpu",
            "models/fashion-wae/samples",
        ])
        .output()
        .unwrap();
    assert_success(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("UNTRAINED"));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 10, "one sample per class");
    // Sample NN_label.png is a test image of class NN: a trained model gets most of them right.
    let right = lines
        .iter()
        .filter(|l| {
            let name = Path::new(l["input"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            name[..2].parse::<u64>().unwrap() == l["top"][0]["class"].as_u64().unwrap()
        })
        .count();
    assert!(right >= 7, "{right}/10 samples right");
}

#[test]
fn eval_reproduces_the_recorded_test_accuracy() {
    assert!(
        Path::new(DATASET).is_dir(),
        "run scripts/setup.sh: the test needs Debian's dataset-fashion-mnist"
    );
    let models = shipped();
    assert!(!models.is_empty(), "no models/*/model.safetensors shipped");
    for model in models {
        let ins: Value = serde_json::from_slice(
            &bin()
                .args(["inspect", "--json"])
                .arg(&model)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let cfg = &ins["config"];
        assert_eq!(cfg["untrained"], false, "{}", model.display());
        let recorded = cfg["training"]["test_accuracy"]
            .as_f64()
            .expect("test accuracy in the metadata");
        let out = bin()
            .args(["eval", "--json", "--model"])
            .arg(&model)
            .output()
            .unwrap();
        assert_success(&out);
        let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ev["n"], 10_000);
        let got = ev["accuracy"].as_f64().unwrap();
        // Summation order across threads can flip a near-tie; allow 3 of 10,000 images.
        assert!(
            (got - recorded).abs() <= 3e-4,
            "{}: eval {got} vs recorded {recorded}",
            model.display()
        );
        // Calibrated: its own test pictures almost never draw the domain warning.
        let warned = ev["domain_warnings"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: not calibrated", model.display()));
        assert!(warned <= 0.01, "{}: {warned} false alarms", model.display());
    }
}

/// The default model warns on pictures unlike its training ones (a colour photo-like frame, a
/// white frame), and not on its own samples.
#[test]
fn pictures_far_from_the_training_ones_draw_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let colour = d.path().join("colour.png");
    image::RgbImage::from_fn(320, 240, |x, y| {
        image::Rgb([(x * 255 / 320) as u8, (y * 255 / 240) as u8, 160])
    })
    .save(&colour)
    .unwrap();
    let white = d.path().join("white.png");
    image::GrayImage::from_pixel(64, 64, image::Luma([255]))
        .save(&white)
        .unwrap();
    let out = bin()
        .args(["classify", "--json", "--device", "cpu"])
        .arg(&colour)
        .arg(&white)
        .arg("models/fashion-wae/samples")
        .output()
        .unwrap();
    assert_success(&out);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 12);
    let warnings = |l: &Value| l["warnings"].as_array().map_or(0, Vec::len);
    assert!(lines[0]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("saturation"));
    assert_eq!(warnings(&lines[1]), 1);
    assert!(
        lines[2..].iter().all(|l| warnings(l) == 0),
        "a sample warned"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("warning: ").count(), 2, "{stderr}");
    // A stream says it per frame in JSON, and once on stderr.
    let model = Path::new(wae_edge::DEFAULT_MODEL);
    for (source, warned) in [("synthetic:320x240", 3), ("models/fashion-wae/samples", 0)] {
        let (out, lines) = stream_json(model, &["--frames", "3"], source);
        assert_success(&out);
        let n = lines[..3].iter().filter(|l| warnings(l) == 1).count();
        assert_eq!(n, warned, "{source}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.matches("warning: ").count(),
            warned.min(1),
            "{stderr}"
        );
    }
}

/// `calibrate` rewrites the config and leaves every tensor byte as it was.
#[test]
fn calibrate_changes_the_config_and_not_the_weights() {
    let d = tempfile::tempdir().unwrap();
    let out_path = d.path().join("calibrated.safetensors");
    let (_m, model) = {
        let m = tempfile::tempdir().unwrap();
        let p = fashion_model(m.path());
        (m, p)
    };
    let out = bin()
        .args(["calibrate", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(&out_path)
        .output()
        .unwrap();
    assert_success(&out);
    let (a, b) = (
        std::fs::read(&model).unwrap(),
        std::fs::read(&out_path).unwrap(),
    );
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names = sa.names();
    names.sort();
    let mut names_b = sb.names();
    names_b.sort();
    assert_eq!(names, names_b);
    for n in names {
        assert_eq!(
            sa.tensor(n).unwrap().data(),
            sb.tensor(n).unwrap().data(),
            "{n}"
        );
    }
    let ins: Value = serde_json::from_slice(
        &bin()
            .args(["inspect", "--json"])
            .arg(&out_path)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dom = &ins["config"]["domain"];
    assert_eq!(dom["images"], 60_000);
    assert_eq!(dom["ranges"].as_array().unwrap().len(), 4);
}
