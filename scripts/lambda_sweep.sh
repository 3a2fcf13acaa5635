#!/usr/bin/env bash
# The energy weight lambda, chosen on the validation split (never the test set): short WAE runs,
# one per lambda, with the shipped model's backbone; prints validation accuracy, reconstruction
# loss and I_H energy per lambda and the best. Resumable like every run.
#
#   scripts/lambda_sweep.sh                          (results in runs/lambda/)
#   DEVICE=cuda JOBS=3 WAE_EDGE_BIN=path/to/cuda/wae-edge scripts/lambda_sweep.sh
#   BACKBONE=64,64,64/128,128/256,256 AE=1 CLS=10 JOINT=1 OUT=runs/lambda-deep scripts/lambda_sweep.sh
set -euo pipefail
lambdas=${LAMBDAS:-0.01 0.1 1}
backbone=${BACKBONE:-64,64/128,128/256}
jobs=${JOBS:-1}
device=${DEVICE:-auto}
bin=${WAE_EDGE_BIN:-target/release/wae-edge}
ae=${AE:-2}; cls=${CLS:-3}; joint=${JOINT:-1}
dir=${OUT:-runs/lambda}
[ -n "${WAE_EDGE_BIN:-}" ] || cargo build --release -q
mkdir -p "$dir"
for l in $lambdas; do
  out=$dir/lambda-$l
  resume=""; [ -f "$out/state.json" ] && resume="--resume"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  [ -f "$out/model.safetensors" ] || $bin train --device "$device" --out "$out" $resume \
    --backbone "$backbone" --lambda "$l" --ae-epochs "$ae" --cls-epochs "$cls" --joint-epochs "$joint" \
    >"$out.log" 2>&1 &
done
wait
python3 - "$dir" $lambdas <<'PY'
import csv, sys
print("| lambda | val accuracy | val reconstruction | val I_H energy |")
print("|---|---|---|---|")
best = None
for l in sys.argv[2:]:
    rows = list(csv.DictReader(open(f"{sys.argv[1]}/lambda-{l}/metrics.csv")))
    last = rows[-1]
    acc = float(last["val_acc"])
    print(f"| {l} | {acc:.4f} | {float(last['val_rec']):.4f} | {float(last['val_energy']):.4f} |")
    if best is None or acc > best[1]:
        best = (l, acc)
print(f"best lambda on the validation split: {best[0]}")
PY
