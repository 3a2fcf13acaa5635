#!/usr/bin/env python3
"""Collects a device check's results (scripts/device_check.sh) into gpu-results.json, the table
for docs/performance.md (gpu-results.md) and the GPU issue's done-when checks, printed.

    python3 scripts/gpu_results.py OUT_DIR COMMIT

Reads OUT_DIR/gpu.txt (nvidia-smi's name, driver), OUT_DIR/bench-MODEL-BATCH.json (`wae-edge
bench --device cuda --json`: the graph run as "model", its eager twin as "eager") and
OUT_DIR/torch.json (scripts/peer_torch.py --json).
"""
import datetime
import glob
import json
import os
import sys

MODELS = ("wae-vgg16", "vgg16", "fashion-wae", "fashion-plain")


def rows_of(out):
    rows = []
    for build, prefix in (("cuda", "bench-"), ("cudnn", "cudnn-")):
        for f in sorted(glob.glob(os.path.join(out, prefix + "*.json"))):
            try:
                r = json.loads(open(f).read().strip().splitlines()[-1])
            except (ValueError, IndexError):
                continue
            name, batch = os.path.basename(f)[len(prefix):-len(".json")].rsplit("-", 1)
            for role in ("model", "eager"):
                m = r.get(role)
                if m and m.get("execution"):
                    rows.append({"model": name, "batch": int(batch), "engine": "wae-edge", "build": build,
                                 "mode": m["execution"], "p50_ms": m["p50_ms"], "gpu_ms": m.get("gpu_p50_ms"),
                                 "max_rel_diff": m.get("max_rel_diff")})
    try:
        rows += json.load(open(os.path.join(out, "torch.json")))["rows"]
    except (OSError, ValueError, KeyError):
        pass
    return rows


def main():
    out, commit = sys.argv[1], sys.argv[2]
    gpu = open(os.path.join(out, "gpu.txt")).read().strip().split(", ")
    rows = rows_of(out)
    doc = {"device": gpu[0], "driver": gpu[1] if len(gpu) > 1 else None, "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "rows": rows}
    with open(os.path.join(out, "gpu-results.json"), "w") as f:
        json.dump(doc, f, indent=1)

    def get(model, batch, engine, mode, key="p50_ms", build="cuda"):
        for r in rows:
            if (r["model"], r["batch"], r["engine"], r["mode"], r.get("build", "cuda")) == (model, batch, engine, mode, build):
                return r.get(key)
        return None

    ms = lambda v: "-" if v is None else f"{v:.3f}"
    sci = lambda v: "-" if v is None else f"{v:.1e}"
    lines = [f"{doc['device']}, driver {doc['driver']}, commit {commit[:12]}, {doc['date']}; medians in ms, batch-1"
             " frames include the copy in and out.", "",
             "| model | batch | wae-edge eager | wae-edge graph | graph GPU time | cuDNN build, graph | PyTorch eager | PyTorch graph | max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for b in (1, 8):
            w = lambda mode, key="p50_ms": get(model, b, "wae-edge", mode, key)
            t = lambda mode: get(model, b, "torch", mode)
            lines.append(f"| {model} | {b} | {ms(w('eager'))} | {ms(w('graph'))} | {ms(w('graph', 'gpu_ms'))} "
                         f"| {ms(get(model, b, 'wae-edge', 'graph', build='cudnn'))} "
                         f"| {ms(t('eager'))} | {ms(t('graph'))} | {sci(w('graph', 'max_rel_diff'))} |")
    with open(os.path.join(out, "gpu-results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    diffs = [r["max_rel_diff"] for r in rows if r["engine"] == "wae-edge" and r.get("max_rel_diff") is not None]
    checks = [
        ("WAE-VGG16 at least 2.5x faster than VGG16, batch 1, graph, wall",
         ratio(get("vgg16", 1, "wae-edge", "graph"), get("wae-vgg16", 1, "wae-edge", "graph")), 2.5, True),
        ("WAE-VGG16 at least 3x less GPU time than VGG16, batch 1, graph",
         ratio(get("vgg16", 1, "wae-edge", "graph", "gpu_ms"), get("wae-vgg16", 1, "wae-edge", "graph", "gpu_ms")), 3.0, True),
        ("fashion-wae no slower than fashion-plain, batch 1, graph",
         ratio(get("fashion-plain", 1, "wae-edge", "graph"), get("fashion-wae", 1, "wae-edge", "graph")), 1.0, True),
        ("WAE-VGG16 within 1.2x of PyTorch's CUDA graph, batch 1",
         ratio(get("wae-vgg16", 1, "wae-edge", "graph"), get("wae-vgg16", 1, "torch", "graph")), 1.2, False),
        ("every wae-edge row within 5e-3 of the CPU engine", max(diffs) if diffs else None, 5e-3, False),
    ]
    for what, v, bar, at_least in checks:
        ok = v is not None and (v >= bar if at_least else v <= bar)
        print(f"{'PASS' if ok else 'MISS'}: {what}: {'-' if v is None else f'{v:.4g}'}")


if __name__ == "__main__":
    main()
