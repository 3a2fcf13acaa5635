//! `wae-edge capture`: pictures of a class from a source into the dataset layout `train` reads.

mod common;

use std::path::Path;

use common::*;

fn jpgs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn capture_writes_the_train_and_test_layout_and_adds_to_it() {
    let d = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "capture",
            "synthetic:64x48",
            "--label",
            "cat",
            "--count",
            "20",
        ])
        .args(["--test-share", "0.25", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_success(&out);
    let (train, test) = (d.path().join("train/cat"), d.path().join("test/cat"));
    let names = jpgs(&train);
    assert_eq!(names.len(), 15);
    assert_eq!(jpgs(&test).len(), 5);
    assert_eq!(names[0], "000000.jpg");
    for n in &names {
        let img = image::open(train.join(n)).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved 20 pictures of cat: 15 to"));
    // A second capture of the class numbers on; every 3rd frame of 9 gives 3 pictures.
    let out = bin()
        .args([
            "capture",
            "synthetic:64x48+9",
            "--label",
            "cat",
            "--count",
            "3",
        ])
        .args(["--every", "3", "--test-share", "0", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_success(&out);
    let names = jpgs(&train);
    assert_eq!(names.len(), 18);
    assert_eq!(names.last().unwrap(), "000017.jpg");
    // `train` reads the layout: the class is found.
    let ds = wae_edge::dataset::load(
        d.path(),
        wae_edge::dataset::Split::Train,
        wae_edge::dataset::FolderSpec::new(
            wae_edge::config::InputSpec {
                channels: 1,
                height: 28,
                width: 28,
            },
            wae_edge::config::ResizeMode::Stretch,
        ),
    )
    .unwrap();
    assert_eq!(ds.classes, ["cat"]);
    assert_eq!(ds.len(), 18);
}

#[test]
fn capture_refuses_bad_labels_and_says_when_the_source_runs_out() {
    let d = tempfile::tempdir().unwrap();
    for label in ["../up", "a/b", "", "new\nline"] {
        let out = bin()
            .args([
                "capture",
                "synthetic:64x48",
                "--count",
                "2",
                "--label",
                label,
                "--out",
            ])
            .arg(d.path())
            .output()
            .unwrap();
        assert_clean_failure(&out, "--label");
    }
    assert!(!d.path().join("up").exists());
    let out = bin()
        .args([
            "capture",
            "synthetic:64x48+3",
            "--label",
            "dog",
            "--count",
            "5",
            "--out",
        ])
        .arg(d.path())
        .output()
        .unwrap();
    assert_clean_failure(&out, "the source ended after 3 of 5 pictures");
    assert_eq!(jpgs(&d.path().join("train/dog")).len(), 3);
}
