#!/usr/bin/env bash
# Builds a CUDA wae-edge that runs on a machine with a newer driver and CUDA 13 libraries but no
# CUDA 11 ones (the lent H100s: driver 580, PyTorch's CUDA 13 wheels), from this checkout, in a
# scratch directory. The stock `--features cuda` build links CUDA 11.8's libraries by soname;
# this one loads cuBLAS/cuRAND/NVRTC 13 at run time and links cudart statically. It patches two
# vendored crates in the scratch copy only: nothing here is ever committed to the project.
# Recipe and reasons: ../shared/research/cuda-build.md; results: docs/performance.md.
#
#   scripts/cuda_portable_build.sh [SCRATCH]     (default /work/cuda13; ~9 min cold, ~2 warm)
#   -> device-pack/ in this checkout (git-ignored; name it in the device tool's `carry`):
#      wae-edge.xz, wae-edge-cudnn.xz (feature cudnn) and cuda-tests.xz (tests/cuda.rs),
#      stripped and xz'd, and `commit`, the
#      commit they were built from. scripts/device_check.sh unpacks and runs them there. By hand:
#      xz -dc device-pack/wae-edge.xz > /tmp/wae-edge && chmod +x /tmp/wae-edge
#      export LD_LIBRARY_PATH=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))')
#      /tmp/wae-edge bench --device cuda ...   (the first run JIT-compiles PTX for ~20 s)
# Only committed files are built: commit first.
set -euo pipefail
scratch=${1:-/work/cuda13}
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v nvcc >/dev/null || { echo "nvcc not found: run scripts/cuda_check.sh first (installs CUDA 11.8)" >&2; exit 1; }
mkdir -p "$scratch/vendor" "$scratch/tools"
rm -rf "$scratch/src" && mkdir "$scratch/src"
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$scratch/src")
# The commit the copy is of (what device_check.sh records); "-dirty" if tracked files differ.
commit=$(cd "$repo" && git rev-parse HEAD)$(cd "$repo" && git diff --quiet HEAD || echo -dirty)
cd "$scratch"
cargo fetch --manifest-path src/Cargo.toml -q
reg=$(dirname "$(find ~/.cargo/registry/src -maxdepth 2 -name 'candle-core-0.11.1' | head -1)")
for c in candle-core-0.11.1 candle-kernels-0.11.1; do
  [ -d "vendor/$c" ] || cp -r "$reg/$c" vendor/
  rm -f "vendor/$c/.cargo-ok" "vendor/$c/.cargo_vcs_info.json"
done
# cudarc loads libraries by name at run time instead of linking CUDA 11 sonames.
sed -i 's/"dynamic-linking"/"dynamic-loading"/' vendor/candle-core-0.11.1/Cargo.toml
# cudart linked statically (the GPU machine has no libcudart.so.11).
grep -q cudart_static vendor/candle-kernels-0.11.1/build.rs ||
  sed -i 's|    println!("cargo:rustc-link-lib=dylib=cudart");|    println!("cargo:rustc-link-search=native=/usr/lib/x86_64-linux-gnu");\n    println!("cargo:rustc-link-lib=static=cudart_static");|' \
    vendor/candle-kernels-0.11.1/build.rs
cat >>src/Cargo.toml <<'EOF'

[patch.crates-io]
candle-core = { path = "../vendor/candle-core-0.11.1" }
candle-kernels = { path = "../vendor/candle-kernels-0.11.1" }
EOF
# candle's kernel builder asks for sm_90a, which nvcc 11.8 lacks; plain sm_90 is what it has.
cat >tools/nvcc-sm90 <<'EOF'
#!/bin/sh
for a in "$@"; do
  a=$(printf '%s' "$a" | sed -e 's/compute_90a/compute_90/g' -e 's/sm_90a/sm_90/g')
  set -- "$@" "$a"; shift
done
exec nvcc "$@"
EOF
chmod +x tools/nvcc-sm90
(cd src && NVCC="$scratch/tools/nvcc-sm90" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
  CARGO_TARGET_DIR="$scratch/target" cargo build --release --no-default-features \
  --features cuda,train --bin wae-edge)
tests=$(cd src && NVCC="$scratch/tools/nvcc-sm90" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
  CARGO_TARGET_DIR="$scratch/target" cargo test --release --no-default-features \
  --features cuda,train --test cuda --no-run --message-format=json |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
pack="$repo/device-pack"
mkdir -p "$pack"
strip -o "$scratch/wae-edge" "$scratch/target/release/wae-edge"
# The same with candle's convs on cuDNN (loaded at run time from PyTorch's wheels there); the
# same target directory, so candle's kernels are not built twice.
(cd src && NVCC="$scratch/tools/nvcc-sm90" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
  CARGO_TARGET_DIR="$scratch/target" cargo build --release --no-default-features \
  --features cudnn,train --bin wae-edge)
strip -o "$scratch/wae-edge-cudnn" "$scratch/target/release/wae-edge"
strip -o "$scratch/cuda-tests" "$tests"
xz -T2 -6 -c "$scratch/wae-edge" >"$pack/wae-edge.xz"
xz -T2 -6 -c "$scratch/cuda-tests" >"$pack/cuda-tests.xz"
xz -T2 -6 -c "$scratch/wae-edge-cudnn" >"$pack/wae-edge-cudnn.xz"
echo "$commit" >"$pack/commit"
readelf -d "$scratch/wae-edge" | grep NEEDED
ls -la "$pack"
