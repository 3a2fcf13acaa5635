#!/usr/bin/env python3
"""wae-edge against ONNX Runtime on the same network with the same weights.

    pip install onnxruntime numpy
    python3 scripts/peer_ort.py --model models/fashion-wae/model.safetensors [--threads 2] [--seconds 12]

1. `wae-edge export-onnx` writes the model's inference network (f32 weights) to peer-out/.
2. The same seeded inputs go through ONNX Runtime and through `wae-edge logits`; the logits must
   agree (max abs difference reported; non-zero exit above --tolerance).
3. Timing, batch --batch, --threads threads each: ORT (sess.run, 10 warm-ups, perf_counter) and
   `wae-edge bench` alternate in 3 rounds of seconds/6 each, so machine drift hits both; medians of
   the rounds are reported, with the ratio wae-edge / ORT (below 1.0: wae-edge is faster).
Results go to peer-out/peer-<model name>.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

BIN = os.environ.get("WAE_EDGE_BIN", "target/release/wae-edge")


def wae(*args):
    out = subprocess.run([BIN, *args], check=True, capture_output=True, text=True).stdout
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--out", default="peer-out")
    a = ap.parse_args()
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        sys.exit("needs: pip install onnxruntime numpy")

    os.makedirs(a.out, exist_ok=True)
    name = os.path.basename(os.path.dirname(os.path.abspath(a.model))) or "model"
    onnx_path = os.path.join(a.out, f"{name}.onnx")
    wae("export-onnx", "--model", a.model, "-o", onnx_path)
    cfg = json.loads(wae("inspect", "--json", a.model))
    i = cfg["config"]["input"]
    shape = (a.batch, i["channels"], i["height"], i["width"])

    # Same inputs through both runtimes.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8,) + shape[1:]).astype(np.float32)
    xin, xout = os.path.join(a.out, "x.f32"), os.path.join(a.out, "y.f32")
    x.tofile(xin)
    wae("logits", "--model", a.model, "--input", xin, "-o", xout)
    ours = np.fromfile(xout, dtype=np.float32).reshape(8, -1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    theirs = sess.run(["logits"], {"input": x})[0]
    diff = float(np.abs(ours - theirs).max())
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())

    xb = x[: a.batch] if a.batch <= 8 else rng.standard_normal(shape).astype(np.float32)
    round_s = a.seconds / 6
    ort_p50, ort_p90, wae_p50, wae_p90 = [], [], [], []
    for _ in range(3):
        for _ in range(10):
            sess.run(["logits"], {"input": xb})
        t_end = time.perf_counter() + round_s
        samples = []
        while time.perf_counter() < t_end or len(samples) < 20:
            t = time.perf_counter()
            sess.run(["logits"], {"input": xb})
            samples.append((time.perf_counter() - t) * 1e3)
        samples.sort()
        ort_p50.append(samples[len(samples) // 2])
        ort_p90.append(samples[int(len(samples) * 0.9)])
        b = json.loads(wae("bench", "--model", a.model, "--batch", str(a.batch), "--threads", str(a.threads),
                           "--device", "cpu", "--seconds", str(round_s), "--json").strip().splitlines()[-1])
        wae_p50.append(b["model"]["p50_ms"])
        wae_p90.append(b["model"]["p90_ms"])

    med = lambda v: sorted(v)[len(v) // 2]
    result = {
        "model": a.model,
        "onnx": onnx_path,
        "threads": a.threads,
        "batch": a.batch,
        "onnxruntime": ort.__version__,
        "max_abs_logit_diff": diff,
        "top1_agreement": agree,
        "ort_p50_ms": med(ort_p50), "ort_p90_ms": med(ort_p90),
        "wae_edge_p50_ms": med(wae_p50), "wae_edge_p90_ms": med(wae_p90),
        "rounds": {"ort_p50_ms": ort_p50, "wae_edge_p50_ms": wae_p50},
    }
    result["ratio_wae_edge_over_ort"] = result["wae_edge_p50_ms"] / result["ort_p50_ms"]
    with open(os.path.join(a.out, f"peer-{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{a.model}: batch {a.batch}, {a.threads} threads, onnxruntime {ort.__version__}")
    print(f"  logits: max |wae-edge - ORT| = {diff:.2e}, top-1 agreement {agree:.3f}")
    print(f"  ONNX Runtime p50 {result['ort_p50_ms']:.3f} ms (p90 {result['ort_p90_ms']:.3f})")
    print(f"  wae-edge     p50 {result['wae_edge_p50_ms']:.3f} ms (p90 {result['wae_edge_p90_ms']:.3f})")
    print(f"  ratio wae-edge / ORT = {result['ratio_wae_edge_over_ort']:.2f} (below 1.0: wae-edge faster)")
    if diff > a.tolerance:
        sys.exit(f"logits differ by {diff} > {a.tolerance}")


if __name__ == "__main__":
    main()
