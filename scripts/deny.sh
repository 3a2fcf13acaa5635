#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (policy in deny.toml): licences, banned or duplicate
# crates, and registries, all offline. The advisory check needs the RustSec database, a git
# clone from GitHub; it runs when that is reachable and is reported as skipped otherwise (the
# development machine only reaches crates.io). Not in CI: building cargo-deny takes about 8
# minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
cargo deny --offline check licenses bans sources
if timeout 120 cargo deny check advisories; then
  echo "advisories: ok"
elif timeout 10 git ls-remote https://github.com/rustsec/advisory-db >/dev/null 2>&1; then
  echo "advisories: FAILED" >&2
  exit 1
else
  echo "advisories: skipped (the RustSec database on GitHub is not reachable from here)"
fi
