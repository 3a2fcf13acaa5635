#!/usr/bin/env bash
# Trains the paper's controls with the WAE's backbone and budget (8 classifier epochs = the WAE's
# 6 classifier + 2 joint): naive half resolution ("VGG16 (112)"), the fixed Haar split
# ("Wavelet+CNN"), and the full-resolution baseline. Resumable: run again to continue.
#   scripts/train_controls.sh [BACKBONE]
set -euo pipefail
backbone=${1:-32,32/64,64/128}
bin=${WAE_EDGE_BIN:-target/release/wae-edge}
for kind in naive-half haar plain; do
  out=runs/fashion-$kind
  [ -f "$out/model.safetensors" ] && continue
  resume=""; [ -f "$out/state.json" ] && resume="--resume"
  $bin train --kind "$kind" --backbone "$backbone" --cls-epochs 8 --out "$out" $resume
done
