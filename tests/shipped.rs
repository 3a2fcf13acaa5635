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
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
    }
}
