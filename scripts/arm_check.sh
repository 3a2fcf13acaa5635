#!/usr/bin/env bash
# The aarch64 check: Jetson and Raspberry Pi CPUs run the native engine's NEON paths, which an
# x86 machine never executes. Cross-builds wae-edge for aarch64-unknown-linux-gnu (everything
# but the `camera` feature), runs the library tests under qemu-user with two CPU models
# (Cortex-A76: Raspberry Pi 5, Orin-class; Cortex-A57: Jetson Nano), and checks that the
# aarch64 binary classifies the shipped samples as the x86 build does, with logits within
# TOLERANCE. Correctness only: timings under qemu mean nothing.
#   scripts/arm_check.sh        (scripts/setup.sh installs the cross compiler and qemu)
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
tolerance=${TOLERANCE:-2e-5}
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "arm_check: $tool not found; run scripts/setup.sh" >&2; exit 1; }
done
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
features=(--no-default-features --features train)
echo "arm_check: building for $target" >&2
cargo build --release --target "$target" "${features[@]}" --bin wae-edge
cargo test --release --target "$target" "${features[@]}" --lib --no-run

for cpu in cortex-a76 cortex-a57; do
  echo "arm_check: library tests on $cpu (qemu)" >&2
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot -cpu $cpu" \
    cargo test --release --target "$target" "${features[@]}" --lib -- --test-threads 2
done

echo "arm_check: classify and logits, aarch64 against x86" >&2
[ -x target/release/wae-edge ] || cargo build --release --bin wae-edge
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
arm=(qemu-aarch64 -L "$sysroot" -cpu cortex-a76 "target/$target/release/wae-edge")
x86=(target/release/wae-edge)
samples=models/fashion-wae/samples
"${x86[@]}" classify --json --top-k 10 --device cpu "$samples" 2>/dev/null >"$work/x86.json"
"${arm[@]}" classify --json --top-k 10 --device cpu "$samples" 2>/dev/null >"$work/arm.json"
# 64 seeded inputs of the shipped model's shape (1x28x28), through `logits` on both.
python3 - "$work/x.f32" <<'EOF'
import random, struct, sys
random.seed(7)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<%df" % (64 * 28 * 28), *(random.gauss(0, 1) for _ in range(64 * 28 * 28))))
EOF
"${x86[@]}" logits --input "$work/x.f32" -o "$work/x86.f32"
"${arm[@]}" logits --input "$work/x.f32" -o "$work/arm.f32"
python3 - "$work" "$tolerance" <<'EOF'
import json, struct, sys
work, tol = sys.argv[1], float(sys.argv[2])
def lines(name):
    return [json.loads(l) for l in open(f"{work}/{name}.json")]
x86, arm = lines("x86"), lines("arm")
assert len(x86) == len(arm) == 10, (len(x86), len(arm))
for a, b in zip(x86, arm):
    la = [t["label"] for t in a["top"]]
    lb = [t["label"] for t in b["top"]]
    assert la[0] == lb[0], f"{a['input']}: top-1 {la[0]} on x86, {lb[0]} on aarch64"
def floats(name):
    raw = open(f"{work}/{name}.f32", "rb").read()
    return struct.unpack("<%df" % (len(raw) // 4), raw)
lx, la = floats("x86"), floats("arm")
assert len(lx) == len(la) == 640, (len(lx), len(la))
diff = max(abs(p - q) for p, q in zip(lx, la))
print(f"arm_check: 10 samples with the same top-1; logits of 64 inputs within {diff:.2e} (tolerance {tol:g})")
assert diff <= tol, f"logits differ by {diff:.2e} > {tol:g}"
EOF
