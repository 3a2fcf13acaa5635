#!/usr/bin/env bash
# models/fashion-wae-small: the 32,32/64,64/128 WAE with a 20-epoch
# classifier stage and a joint stage at a tenth of the peak learning rate. About 2.5 hours on 2
# quiet cores; resumable: run it again after an interruption and it continues from the last
# completed epoch (the flags must stay exactly these).
#   scripts/train_wae.sh            # then: wae-edge eval --model runs/fashion-wae-b/model.safetensors
set -euo pipefail
bin=${WAE_EDGE_BIN:-target/release/wae-edge}
out=runs/fashion-wae-b
[ -f "$out/model.safetensors" ] && { echo "$out is finished"; exit 0; }
resume=""; [ -f "$out/state.json" ] && resume="--resume"
exec nice -n 10 "$bin" train --backbone 32,32/64,64/128 --ae-epochs 1 --cls-epochs 20 \
  --joint-epochs 2 --out "$out" $resume
