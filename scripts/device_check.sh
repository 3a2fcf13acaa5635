#!/usr/bin/env bash
# The GPU path's device check: runs on an NVIDIA GPU machine that has PyTorch (with its CUDA
# libraries) but no Rust toolchain and no network, from files carried there, in about 5 minutes.
#
#   here:   scripts/cuda_portable_build.sh          # -> device-pack/: wae-edge.xz, cuda-tests.xz, commit
#   there:  scripts/device_check.sh [PACK] [OUT]    # PACK default device-pack, OUT default $OUT or gpu-out
#
# 1. the CUDA tests (tests/cuda.rs: graph and eager against the CPU engine at several batch
#    sizes, a replay reads each new frame, the shipped samples' top-1, the direct conv kernel);
# 2. `bench --device cuda` for WAE-VGG16 and VGG16 (random weights from `new --preset`),
#    fashion-wae and fashion-plain at batch 1 and 8: graph and eager in alternating rounds of
#    one run, GPU time between events, logits against the CPU engine;
#    the same for the VGG pair with the cuDNN build (feature cudnn);
# 3. the PyTorch peer (scripts/peer_torch.py) on the same files: eager and CUDA graph;
# 4. scripts/gpu_results.py: OUT/gpu-results.json (the schema of docs/gpu-results.json), OUT/gpu-results.md (the table
#    for docs/performance.md) and the done-when checks, printed.
# Every step has its own time limit; a failed step is reported and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
pack=${1:-device-pack}
out=${2:-${OUT:-gpu-out}}
seconds=${BENCH_SECONDS:-4}
mkdir -p "$out"
bin=/tmp/wae-device
mkdir -p "$bin"
status=0
step() { echo "== $*"; }

step "unpack"
xz -dc "$pack/wae-edge.xz" >"$bin/wae-edge" && chmod +x "$bin/wae-edge" || exit 1
xz -dc "$pack/cuda-tests.xz" >"$bin/cuda-tests" && chmod +x "$bin/cuda-tests" || exit 1
commit=$(cat "$pack/commit" 2>/dev/null || echo unknown)
# CUDA 13 libraries from PyTorch's wheels (cuBLAS, cuRAND, NVRTC); the driver brings libcuda.
nv=$(python3 -c 'import nvidia,os;print(list(nvidia.__path__)[0])' 2>/dev/null)
for d in "$nv"/cu13/lib "$nv"/*/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
export WAE_EDGE_BIN=$bin/wae-edge

step "CUDA tests"
timeout 240 "$bin/cuda-tests" --test-threads 1 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: CUDA tests"; status=1; }

step "models"
for p in wae-vgg16 vgg16; do
  timeout 60 "$bin/wae-edge" new --preset "$p" -o "$bin/$p.safetensors" --seed 0 >/dev/null || status=1
done
models=("wae-vgg16=$bin/wae-vgg16.safetensors" "vgg16=$bin/vgg16.safetensors"
        "fashion-wae=models/fashion-wae/model.safetensors" "fashion-plain=models/fashion-plain/model.safetensors")

step "wae-edge bench --device cuda (graph and eager, $seconds s each run)"
for m in "${models[@]}"; do
  name=${m%%=*}; path=${m#*=}
  for b in 1 8; do
    f="$out/bench-$name-$b.json"
    if timeout 120 "$bin/wae-edge" bench --device cuda --model "$path" --batch "$b" \
        --seconds "$seconds" --warmup 20 --json >"$f" 2>"$out/bench-$name-$b.err"; then
      python3 - "$f" "$name" "$b" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for role in ("model", "eager"):
    if role in r:
        m = r[role]
        print(f"  {sys.argv[2]:<14} batch {sys.argv[3]} {m.get('execution', '?'):<6} p50 {m['p50_ms']:.3f} ms"
              f"  gpu {m.get('gpu_p50_ms') or 0:.3f} ms  rel diff {m.get('max_rel_diff') or 0:.2e}")
EOF
    else
      echo "FAIL: bench $name batch $b"; tail -3 "$out/bench-$name-$b.err"; status=1
    fi
  done
done

if [ -f "$pack/wae-edge-cudnn.xz" ]; then
  step "the cuDNN build, VGG models"
  xz -dc "$pack/wae-edge-cudnn.xz" >"$bin/wae-edge-cudnn" && chmod +x "$bin/wae-edge-cudnn"
  for m in "${models[@]:0:2}"; do
    name=${m%%=*}; path=${m#*=}
    for b in 1 8; do
      timeout 120 "$bin/wae-edge-cudnn" bench --device cuda --model "$path" --batch "$b" \
        --seconds "$seconds" --warmup 20 --json >"$out/cudnn-$name-$b.json" 2>"$out/cudnn-$name-$b.err" ||
        { echo "FAIL: cuDNN bench $name batch $b"; tail -3 "$out/cudnn-$name-$b.err"; status=1; }
    done
  done
fi

step "PyTorch peer"
args=(); for m in "${models[@]}"; do args+=(--model "$m"); done
PYTHONUNBUFFERED=1 timeout 300 python3 scripts/peer_torch.py "${args[@]}" --batch 1 8 \
  --seconds 2 --json "$out/torch.json" 2>&1 | tee "$out/torch.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: PyTorch peer"; status=1; }

step "results"
python3 scripts/gpu_results.py "$out" "$commit" || status=1
echo "device check finished (status $status); results in $out"
exit $status
