//! `wae-edge new` and `wae-edge inspect`: the paper's multiply-accumulate figures, and profiles.

mod common;

use common::*;
use serde_json::Value;

fn inspect(path: &std::path::Path) -> Value {
    let out = bin()
        .args(["inspect", "--json"])
        .arg(path)
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn wae_vgg16_has_the_papers_macs_against_vgg16() {
    let d = tempfile::tempdir().unwrap();
    let wae = d.path().join("wae.safetensors");
    let vgg = d.path().join("vgg.safetensors");
    bin()
        .args(["new", "--preset", "wae-vgg16", "-o"])
        .arg(&wae)
        .assert()
        .success();
    bin()
        .args(["new", "--preset", "vgg16", "-o"])
        .arg(&vgg)
        .assert()
        .success();
    let w = inspect(&wae);
    let v = inspect(&vgg);
    let g = |x: &Value| x.as_f64().unwrap() / 1e9;
    // Paper Table 1: 4.11 G (encoder excluded) vs 15.36 G.
    assert!(
        (g(&w["macs_without_encoder"]) - 4.11).abs() < 0.05,
        "{}",
        w["macs_without_encoder"]
    );
    assert!((g(&w["plain_macs"]) - 15.4).abs() < 0.1);
    assert!((g(&v["macs"]["total"]) - 15.4).abs() < 0.1);
    let parts: f64 = ["encoder", "backbone", "branch", "heads"]
        .iter()
        .map(|p| g(&w["macs"][p]))
        .sum();
    assert!(
        (parts - g(&w["macs"]["total"])).abs() < 1e-9,
        "total is inference without decoder"
    );
    assert!(w["macs"]["decoder"].as_u64().unwrap() > 0);
    assert_eq!(v["params"]["total"], 138_357_544u64);
    assert!(w["load_ms"].as_f64().unwrap() > 0.0);
    assert!(w["config"]["untrained"].as_bool().unwrap());
    // fp16 on disk: two bytes per parameter (plus the decoder and the header).
    let params = w["params"]["total"].as_u64().unwrap() + w["params"]["decoder"].as_u64().unwrap();
    let bytes = w["file_bytes"].as_u64().unwrap();
    assert!(bytes > 2 * params && bytes < 2 * params + 100_000);
}

#[test]
fn new_is_deterministic_in_its_seed() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    for (name, seed) in [("a", "1"), ("b", "1"), ("c", "2")] {
        bin()
            .args(["new", "--preset", "wae-fashion", "--seed", seed, "-o"])
            .arg(p(name))
            .assert()
            .success();
    }
    let read = |n: &str| std::fs::read(p(n)).unwrap();
    assert_eq!(read("a"), read("b"));
    assert_ne!(read("a"), read("c"));
}

#[test]
fn profiles_lists_every_shipped_board() {
    let out = bin().args(["profiles", "--json"]).output().unwrap();
    assert!(out.status.success());
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for want in [
        "jetson-orin-nano",
        "jetson-xavier-nx",
        "jetson-nano",
        "apple-m-series",
        "x86-64-cpu",
        "raspberry-pi-5",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[test]
fn a_cpu_profile_runs_and_sets_the_device() {
    let Fixture {
        dir: _d,
        model,
        img,
    } = fixture();
    let out = bin()
        .args(["classify", "--profile", "x86-64-cpu", "--model"])
        .arg(&model)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device: cpu (profile x86-64-cpu)"));
}

/// `--version` names the crate version and the commit the binary was built from: the checkout's
/// HEAD where git can say, `unknown` outside a checkout.
#[test]
fn version_names_the_commit() {
    let out = bin().arg("--version").output().unwrap();
    assert_success(&out);
    let line = String::from_utf8(out.stdout).unwrap();
    let want = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8(o.stdout).unwrap().trim().to_string()
        });
    assert_eq!(
        line.trim(),
        format!("wae-edge {} ({want})", env!("CARGO_PKG_VERSION"))
    );
}
