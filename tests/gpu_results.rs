//! `scripts/gpu_results.py`, which turns a device check's output into `docs/gpu-results.json`
//! and the done-when verdicts, on outputs shaped like `bench --device cuda --json` and
//! `scripts/peer_torch.py --json` write them (python3 comes from `scripts/setup.sh`).

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// A `bench --device cuda --json` line: the graph run and its eager twin.
fn bench(graph: (f64, f64), eager: f64, diff: f64) -> Value {
    json!({
        "engine": "cuda", "device": "cuda",
        "model": {"p50_ms": graph.0, "gpu_p50_ms": graph.1, "execution": "graph", "max_rel_diff": diff},
        "eager": {"p50_ms": eager, "gpu_p50_ms": eager, "execution": "eager", "max_rel_diff": diff},
    })
}

fn write(dir: &Path, name: &str, v: &Value) {
    std::fs::write(dir.join(name), format!("{v}\n")).unwrap();
}

#[test]
fn rows_follow_the_issue_schema_and_the_verdicts_follow_the_numbers() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("gpu.txt"),
        "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB\n",
    )
    .unwrap();
    for b in [1, 8] {
        let k = b as f64;
        write(
            d.path(),
            &format!("bench-wae-vgg16-{b}.json"),
            &bench((0.30 * k, 0.20 * k), 2.0, 1e-3),
        );
        write(
            d.path(),
            &format!("bench-vgg16-{b}.json"),
            &bench((0.90 * k, 0.80 * k), 2.3, 2e-3),
        );
        write(
            d.path(),
            &format!("bench-fashion-wae-{b}.json"),
            &bench((0.05, 0.02), 0.9, 8e-3),
        );
        write(
            d.path(),
            &format!("bench-fashion-plain-{b}.json"),
            &bench((0.06, 0.03), 0.5, 1e-3),
        );
    }
    write(
        d.path(),
        "cudnn-vgg16-1.json",
        &bench((0.7, 0.6), 2.0, 1e-3),
    );
    let torch = json!({"device": "NVIDIA H100", "rows": [
        {"model": "wae-vgg16", "batch": 1, "engine": "torch", "mode": "graph", "p50_ms": 0.2, "gpu_ms": 0.15, "max_rel_diff": 1e-3},
        {"model": "wae-vgg16", "batch": 1, "engine": "torch", "mode": "eager", "p50_ms": 1.1, "gpu_ms": null, "max_rel_diff": 1e-3},
    ]});
    write(d.path(), "torch.json", &torch);
    // Not a bench's output: ignored, not fatal.
    std::fs::write(d.path().join("bench-broken-1.json"), "error: no GPU\n").unwrap();

    let out = Command::new("python3")
        .arg("scripts/gpu_results.py")
        .arg(d.path())
        .arg("0123456789abcdef")
        .output()
        .expect("python3 (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let doc: Value =
        serde_json::from_slice(&std::fs::read(d.path().join("gpu-results.json")).unwrap()).unwrap();
    assert_eq!(doc["device"], "NVIDIA H100 80GB HBM3");
    assert_eq!(doc["driver"], "580.159.04");
    assert_eq!(doc["commit"], "0123456789abcdef");
    assert!(doc["date"].as_str().unwrap().ends_with('Z'));
    let rows = doc["rows"].as_array().unwrap();
    // 4 models x 2 batches x (graph, eager), the cuDNN pair, the two torch rows.
    assert_eq!(rows.len(), 16 + 2 + 2);
    for r in rows {
        for key in [
            "model",
            "batch",
            "engine",
            "mode",
            "p50_ms",
            "gpu_ms",
            "max_rel_diff",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        assert!(["wae-edge", "torch"].contains(&r["engine"].as_str().unwrap()));
        assert!(["graph", "eager"].contains(&r["mode"].as_str().unwrap()));
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r.get("build") == Some(&json!("cudnn")))
            .count(),
        2
    );

    // 0.90 / 0.30 = 3x wall, 0.80 / 0.20 = 4x GPU time, fashion 0.06 / 0.05, 0.30 / 0.20 = 1.5x
    // PyTorch's graph, and fashion-wae's 8e-3 over the 5e-3 bar.
    for line in [
        "PASS: WAE-VGG16 at least 2.5x faster than VGG16, batch 1, graph, wall: 3",
        "PASS: WAE-VGG16 at least 3x less GPU time than VGG16, batch 1, graph: 4",
        "PASS: fashion-wae no slower than fashion-plain, batch 1, graph: 1.2",
        "MISS: WAE-VGG16 within 1.2x of PyTorch's CUDA graph, batch 1: 1.5",
        "MISS: every wae-edge row within 5e-3 of the CPU engine: 0.008",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    let table = std::fs::read_to_string(d.path().join("gpu-results.md")).unwrap();
    assert!(
        table.contains("| vgg16 | 1 | 2.300 | 0.900 | 0.800 | 0.700 | - | - | 2.0e-03 |"),
        "{table}"
    );
}
