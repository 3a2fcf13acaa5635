#!/usr/bin/env bash
# EBCLE, measured rather than guessed: trains the WAE with backbones of increasing depth for the
# same short budget and reports accuracy, time and how close each added layer is to an identity
# map (`wae-edge layers`), next to the dataset entropy. Each run checkpoints and resumes, so the sweep can span
# several sittings: run it again to continue.
#
#   scripts/ebcle_sweep.sh [EPOCHS]   (results in runs/ebcle/)
#   DEVICE=cuda JOBS=7 WAE_EDGE_BIN=path/to/cuda/wae-edge scripts/ebcle_sweep.sh
# JOBS runs train at once (on a GPU they share it; on 2 CPU cores keep 1).
set -euo pipefail
epochs=${1:-3}
jobs=${JOBS:-1}
device=${DEVICE:-auto}
bin=${WAE_EDGE_BIN:-target/release/wae-edge}
[ -n "${WAE_EDGE_BIN:-}" ] || cargo build --release -q
mkdir -p runs/ebcle
$bin entropy --json > runs/ebcle/entropy.json
one() {
  local spec=$1 depth out resume=""
  depth=$(echo "$spec" | tr '/,' '\n\n' | grep -c .)
  out=runs/ebcle/depth-$depth
  [ -f "$out/state.json" ] && resume="--resume"
  [ -f "$out/model.safetensors" ] || $bin train --device "$device" --out "$out" $resume \
      --backbone "$spec" --ae-epochs 1 --cls-epochs "$epochs" --joint-epochs 0 --val 5000 \
      >"runs/ebcle/depth-$depth.log" 2>&1
  [ -f "$out/layers.jsonl" ] || $bin layers --model "$out/model.safetensors" --json > "$out/layers.jsonl"
}
# Depths 2..8 convs over three stages on the 14x14 I_L (widths 32/64/128).
for spec in "32/64" "32/64/128" "32,32/64/128" "32,32/64,64/128" "32,32/64,64/128,128" "32,32,32/64,64/128,128" "32,32,32/64,64,64/128,128"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  one "$spec" &
done
wait
python3 - <<'PY'
import csv, glob, json, os
ent = json.load(open("runs/ebcle/entropy.json"))
print(f"Fashion-MNIST entropy: {ent['mean_nats']:.3f} nats (std {ent['std_nats']:.3f})")
print("| convs | val accuracy | train s | relative change of last same-shape conv | min CKA with previous |")
print("|---|---|---|---|---|")
best = None
for d in sorted((p for p in glob.glob("runs/ebcle/depth-*") if os.path.isdir(p)), key=lambda p: int(p.rsplit("-", 1)[1])):
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))
    acc = max(float(r["val_acc"]) for r in rows if r["val_acc"])
    secs = sum(float(r["seconds"]) for r in rows)
    layers = [json.loads(l) for l in open(os.path.join(d, "layers.jsonl"))]
    rc = [l["relative_change"] for l in layers if l["relative_change"] is not None]
    n = int(d.rsplit("-", 1)[1])
    print(f"| {n} | {acc:.4f} | {secs:.0f} | {rc[-1] if rc else float('nan'):.3f} | {min(l['cka_previous'] for l in layers):.3f} |")
    if best is None or acc > best[1] + 0.002:
        best = (n, acc)
print(f"accuracy stops improving (by more than 0.2 pt) after {best[0]} convs")
PY
