#!/usr/bin/env bash
# The model card's four networks (WAE, plain, naive-half, Haar), trained side by side on one CUDA
# GPU with the same backbone and classifier budget. A batch-128 step of these small networks
# leaves a big GPU mostly idle, so the runs share it as separate processes. Each run checkpoints
# every epoch and resumes when the script is run again (with the same settings), on the GPU or on
# the CPU (`DEVICE=cpu`, many hours).
#
#   scripts/train_gpu.sh [OUT_DIR]          (default runs/gpu; logs in OUT_DIR/NAME.log)
#   CLS=34 KINDS="wae plain" scripts/train_gpu.sh runs/longer
# The defaults are the model card's runs: backbone 64,64/128,128/256, lambda 1 (the validation
# sweep's choice), WAE 2 + 20 + 3 epochs, controls 23.
#
# Needs a binary built with `--features cuda` (WAE_EDGE_BIN, default target/release/wae-edge) and
# the dataset (WAE_EDGE_FASHION_MNIST, default Debian's). STOP_AFTER=SECONDS stops every run after
# that long (for machines lent by the hour); each keeps its last completed epoch's checkpoint.
set -uo pipefail
out=${1:-runs/gpu}
bin=${WAE_EDGE_BIN:-target/release/wae-edge}
backbone=${BACKBONE:-64,64/128,128/256}
lambda=${LAMBDA:-1}
ae=${AE:-2}; cls=${CLS:-20}; joint=${JOINT:-3}
device=${DEVICE:-cuda}
mkdir -p "$out"
pids=()
for kind in ${KINDS:-wae plain naive-half haar}; do
  dir=$out/fashion-$kind
  [ -f "$dir/model.safetensors" ] && continue
  resume=""; [ -f "$dir/state.json" ] && resume="--resume"
  if [ "$kind" = wae ]; then
    epochs=(--ae-epochs "$ae" --cls-epochs "$cls" --joint-epochs "$joint" --lambda "$lambda")
  else
    # The WAE's classifier budget: its classifier and joint epochs.
    epochs=(--cls-epochs $((cls + joint)))
  fi
  # A couple of CPU threads per run prepare batches; the GPU does the arithmetic.
  RAYON_NUM_THREADS=${THREADS:-2} ${STOP_AFTER:+timeout -s INT "$STOP_AFTER"} \
    "$bin" train --device "$device" --kind "$kind" --backbone "$backbone" "${epochs[@]}" \
    --out "$dir" $resume >"$out/$kind.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
grep -h "wrote\|error" "$out"/*.log || true
exit $status
