//! Your own classes, end to end, with the CLI alone: a colour dataset of procedural pictures
//! (shapes and textures at another size and aspect than the model's input) is trained at
//! 32x32x3 with no flag but `--input`, evaluated, and held-out pictures are classified.
#![cfg(feature = "train")]

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

#[path = "support/shapes.rs"]
mod shapes;
use shapes::{picture, write_dataset, CLASSES};

#[test]
fn a_colour_folder_trains_evaluates_and_classifies_with_the_cli_alone() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("shapes");
    write_dataset(&data, 80, 15, (72, 56), 2018);
    let model = d.path().join("shapes.safetensors");
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "32x32x3", "--out"])
        .arg(d.path().join("run"))
        .arg("--export")
        .arg(&model)
        .output()
        .unwrap();
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("320 training images in 4 classes: ball 80, box 80, grass 80, stripes 80"),
        "{err}"
    );

    // The file records the input, the folder names and the measured normalisation.
    let config = wae_edge::weights::ModelFile::open(&model)
        .unwrap()
        .config()
        .clone();
    assert_eq!(config.input.to_string(), "32x32x3");
    assert_eq!(config.labels, CLASSES);
    assert_eq!(
        config.preprocess.resize,
        wae_edge::config::ResizeMode::Stretch
    );
    assert!(config
        .preprocess
        .mean
        .iter()
        .all(|m| (0.1..0.9).contains(m) && *m != 0.5));
    assert!(config.domain.is_some());

    let out = bin()
        .args(["eval", "--json", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = report["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "test accuracy {acc}\n{err}");
    assert_eq!(report["n"], 60);

    // A held-out picture of each class, written where training never looked.
    let mut r = StdRng::seed_from_u64(99);
    for (c, name) in CLASSES.iter().enumerate() {
        let p = d.path().join(format!("new-{name}.jpg"));
        picture(c, (72, 56), &mut r).save(&p).unwrap();
        let out = classify_json(&model, &p, &[]);
        assert_success(&out);
        let v = &json_lines(&out)[0];
        assert_eq!(v["top"][0]["label"], *name, "{v}");
    }
}

#[test]
fn a_dataset_over_the_memory_budget_is_refused_before_training() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("shapes");
    write_dataset(&data, 10, 1, (72, 56), 2018);
    // 40 pictures at 512x512x3 need 30 MiB; the budget is 16.
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "512x512x3", "--memory-budget", "16", "--out"])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "need 30 MiB, over the 16 MiB memory budget");
    assert!(!d.path().join("run").exists());
    let out = bin()
        .args(["train", "--dataset"])
        .arg(&data)
        .args(["--input", "33x32x3", "--out"])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "sides are even");
}
