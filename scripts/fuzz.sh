#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 60) with libFuzzer through cargo-fuzz (nightly).
# The corpus grows in fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target> and fail the
# script: turn each into a regression test before fixing it. Not part of the default test run.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(model_file image_decode profile idx frames)
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t for ${secs}s"
  (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10)
done
echo "all targets ran ${secs}s without a crash"
