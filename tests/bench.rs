//! `wae-edge bench`: the JSON contract of issue 5 (percentiles, stages, baseline, speed-up) and
//! the stage chart. Times are not asserted, only their consistency.

mod common;

use common::*;
use serde_json::Value;

/// A wae-fashion and a plain-fashion model in `dir`.
fn two_models(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (wae, plain) = (dir.join("wae.safetensors"), dir.join("plain.safetensors"));
    for (preset, path) in [("wae-fashion", &wae), ("plain-fashion", &plain)] {
        bin()
            .args(["new", "--preset", preset, "-o"])
            .arg(path)
            .assert()
            .success();
    }
    (wae, plain)
}

#[test]
fn json_reports_percentiles_stages_and_the_speedup() {
    let d = tempfile::tempdir().unwrap();
    let (wae, plain) = two_models(d.path());
    let out = bin()
        .args([
            "bench", "--iters", "5", "--warmup", "1", "--json", "--model",
        ])
        .arg(&wae)
        .arg("--baseline")
        .arg(&plain)
        .output()
        .unwrap();
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(text.trim().lines().last().unwrap()).unwrap();
    for side in ["model", "baseline"] {
        let r = &v[side];
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{side}.{k}: {r}"));
        assert!(f("p50_ms") > 0.0 && f("p50_ms") <= f("p90_ms") && f("p90_ms") <= f("p99_ms"));
        assert!(f("min_ms") <= f("p50_ms"));
        assert!((f("fps") - 1e3 / f("p50_ms")).abs() < 1e-6 * f("fps"));
        assert!(r["iters"].as_u64().unwrap() >= 5);
    }
    // The WAE reports all four stages; the plain model has no branch time.
    for stage in ["encoder", "backbone", "branch", "heads"] {
        assert!(
            v["model"]["stages"][stage]["p50_ms"].as_f64().unwrap() > 0.0,
            "{stage}"
        );
    }
    let speedup = v["speedup"].as_f64().unwrap();
    let want = v["baseline"]["p50_ms"].as_f64().unwrap() / v["model"]["p50_ms"].as_f64().unwrap();
    assert!((speedup - want).abs() < 1e-9, "{speedup} vs {want}");
}

#[test]
fn chart_is_an_svg_of_both_models_stages() {
    let d = tempfile::tempdir().unwrap();
    let (wae, plain) = two_models(d.path());
    let chart = d.path().join("stages.svg");
    let out = bin()
        .args(["bench", "--iters", "3", "--warmup", "1", "--model"])
        .arg(&wae)
        .arg("--baseline")
        .arg(&plain)
        .arg("--chart")
        .arg(&chart)
        .output()
        .unwrap();
    assert_success(&out);
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    for label in [
        "encoder",
        "I_L backbone",
        "I_H branch",
        "heads",
        "whole pass",
        "\nwae\n",
        "\nplain\n",
    ] {
        assert!(svg.contains(label), "no {label:?} in the chart");
    }
    // Written through a temporary file and a rename: nothing else is left beside it.
    let mut names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["plain.safetensors", "stages.svg", "wae.safetensors"]
    );
}

#[test]
fn chart_into_a_missing_directory_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (wae, _) = two_models(d.path());
    let out = bin()
        .args(["bench", "--iters", "2", "--warmup", "0", "--model"])
        .arg(&wae)
        .arg("--chart")
        .arg(d.path().join("no/such/dir/stages.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the chart"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn layers_lists_every_conv_in_network_order() {
    let d = tempfile::tempdir().unwrap();
    let (wae, _) = two_models(d.path());
    let out = bin()
        .args([
            "bench", "--iters", "2", "--warmup", "1", "--json", "--layers", "3",
        ])
        .arg("--model")
        .arg(&wae)
        .output()
        .unwrap();
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(text.trim().lines().last().unwrap()).unwrap();
    let layers = v["model"]["layers"].as_array().expect("layers");
    let names: Vec<&str> = layers
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    // The encoder first, its split last among its convs, then the backbone, then the branch.
    assert_eq!(names[0], "encoder.conv0", "{names:?}");
    let split = names.iter().position(|n| *n == "encoder.split").unwrap();
    assert!(names[..split].iter().all(|n| n.starts_with("encoder.conv")));
    let first_branch = names.iter().position(|n| n.starts_with("branch.")).unwrap();
    assert!(names[split + 1..first_branch]
        .iter()
        .all(|n| n.starts_with("backbone.")));
    assert!(names[first_branch..]
        .iter()
        .all(|n| n.starts_with("branch.")));
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    for l in layers {
        assert!(l["p50_ms"].as_f64().unwrap() > 0.0, "{l}");
        // Weights as laid out for the kernel: at least the 9 taps per channel pair and the bias,
        // at most Winograd F(4x4)'s 36 positions with output channels padded to a group of 64.
        let shape = l["shape"].as_str().unwrap();
        let chans = shape.split(' ').nth(1).unwrap();
        let (cin, cout) = chans.split_once("->").unwrap();
        let (cin, cout): (f64, f64) = (cin.parse().unwrap(), cout.parse().unwrap());
        let mb = l["weight_mb"].as_f64().unwrap();
        assert!(mb >= 4.0 * (9.0 * cin * cout + cout) / 1e6, "{l}");
        assert!(mb <= 4.0 * (36.0 * cin * (cout + 63.0) + cout) / 1e6, "{l}");
        let gb_s = l["weight_gb_s"].as_f64().unwrap();
        assert!(
            (gb_s - mb / l["p50_ms"].as_f64().unwrap()).abs() <= 1e-9 * gb_s.max(1.0),
            "{l}"
        );
        // Multiply-adds: direct convolution's 9 per channel pair and output pixel, or Winograd's
        // products, between a quarter of that (F(4x4)'s saving) and all of it.
        let (h, w) = shape.split(' ').next().unwrap().split_once('x').unwrap();
        let (h, w): (f64, f64) = (h.parse().unwrap(), w.parse().unwrap());
        let (oh, ow) = if shape.ends_with("/2") {
            ((h / 2.0).ceil(), (w / 2.0).ceil())
        } else {
            (h, w)
        };
        let direct = oh * ow * 9.0 * cin * cout / 1e6;
        let mults = l["mults_m"].as_f64().unwrap();
        let k = l["kernel"].as_str().unwrap();
        if k.starts_with("winograd") {
            assert!(mults >= direct / 4.0 && mults < direct, "{l}");
        } else {
            assert!((mults - direct).abs() <= 1e-9 * direct, "{l}");
        }
        let g_s = l["mults_g_s"].as_f64().unwrap();
        assert!(
            (g_s - mults / l["p50_ms"].as_f64().unwrap()).abs() <= 1e-9 * g_s.max(1.0),
            "{l}"
        );
        assert!(
            [
                "direct",
                "im2col + gemm",
                "winograd F(2x2)",
                "winograd F(4x4)"
            ]
            .contains(&k),
            "{l}"
        );
    }
    // The first conv reads the 28x28 frame with its one channel.
    assert!(
        layers[0]["shape"]
            .as_str()
            .unwrap()
            .starts_with("28x28 1->"),
        "{}",
        layers[0]
    );
}

#[test]
fn layers_needs_the_native_engine() {
    let d = tempfile::tempdir().unwrap();
    let (wae, _) = two_models(d.path());
    let out = bin()
        .args([
            "bench", "--iters", "1", "--layers", "--engine", "candle", "--model",
        ])
        .arg(&wae)
        .output()
        .unwrap();
    assert_clean_failure(&out, "native CPU engine");
}
