#!/usr/bin/env python3
"""Prints the model-card table (like the paper's Table 1) for the given model files, from the
JSON that `wae-edge eval`, `wae-edge inspect` and `wae-edge bench` print, so every number in the
card is reproducible by running this script:

    python3 scripts/model_table.py models/fashion-wae/model.safetensors [more models...]

Latency is batch 1 on this machine's CPU, all models timed in one `bench` run each against the
first model (alternating), median of the timed iterations.
"""
import json
import subprocess
import sys

BIN = "target/release/wae-edge"


def run(*args):
    out = subprocess.run([BIN, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(models):
    if not models:
        sys.exit(__doc__)
    rows = []
    for m in models:
        ev = run("eval", "--model", m, "--json")
        ins = run("inspect", "--json", m)
        b = run("bench", "--model", m, "--baseline", models[0], "--seconds", "10", "--json")
        rows.append((m, ins, ev, b))
    print("| model | kind | test accuracy | MACs | MACs without encoder | plain/this MACs | CPU latency p50 (batch 1) | p90 |")
    print("|---|---|---|---|---|---|---|---|")
    for m, ins, ev, b in rows:
        macs = ins["macs"]
        print(
            f"| `{m}` | {ins['config']['arch']['kind']} | {ev['accuracy']:.4f} ({ev['n']} images) "
            f"| {macs['total'] / 1e6:.2f} M | {ins['macs_without_encoder'] / 1e6:.2f} M | {ins['macs_ratio']:.2f}x "
            f"| {b['model']['p50_ms']:.3f} ms | {b['model']['p90_ms']:.3f} ms |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
