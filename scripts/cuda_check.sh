#!/usr/bin/env bash
# Checks that the `cuda` feature builds, with Debian's CUDA 11.8 toolkit (non-free), and that the
# CUDA binary behaves on a machine without a GPU: the CPU path classifies, and `--device cuda`
# fails with one clear line. Not part of CI: the toolkit is a 1.6 GB download, 5.5 GB installed,
# and the first build compiles candle's kernels with nvcc (about 7 minutes on 2 cores).
#
#   scripts/cuda_check.sh            # CUDA_COMPUTE_CAP=87 (Jetson Orin)
#   CUDA_COMPUTE_CAP=80 scripts/cuda_check.sh
#
# Compute capabilities: 87 Orin, 72 Xavier, 80 A100 (also JIT-runs on H100). candle 0.11 asks
# nvcc for sm_90a at 90, which CUDA 11.8 does not know (see docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cap=${CUDA_COMPUTE_CAP:-87}
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

if ! command -v nvcc >/dev/null; then
  if [ ! -f /etc/apt/sources.list.d/nonfree.sources ]; then
    # Same mirror and keyring as Debian's main entry, with contrib and non-free.
    $sudo tee /etc/apt/sources.list.d/nonfree.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -2

echo "== cargo build --release --features cuda (CUDA_COMPUTE_CAP=$cap)"
CUDA_COMPUTE_CAP=$cap cargo build --release --features cuda --target-dir target/cuda
bin=target/cuda/release/wae-edge
echo "== linked CUDA libraries"
ldd "$bin" | grep -Ei 'cuda|cublas|curand' || true

echo "== the CPU path of the CUDA build"
"$bin" classify --device cpu models/fashion-wae/samples/00_t-shirt-top.png

echo "== --device cuda"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  "$bin" bench --device cuda --model models/fashion-wae/model.safetensors --seconds 3
else
  set +e
  err=$("$bin" classify --device cuda models/fashion-wae/samples 2>&1 >/dev/null)
  rc=$?
  set -e
  echo "$err"
  lines=$(printf '%s\n' "$err" | grep -c '^error:' || true)
  if [ "$rc" = 0 ] || [ "$lines" != 1 ] || printf '%s' "$err" | grep -q panicked; then
    echo "FAIL: without a GPU, --device cuda must fail with one error line (rc $rc)" >&2
    exit 1
  fi
  echo "ok: no GPU here, and --device cuda says so in one line (exit $rc)"
fi
