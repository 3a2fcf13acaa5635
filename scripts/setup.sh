#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for wae-edge: the Fashion-MNIST dataset (training,
# eval, tests), libclang (the `camera` feature's V4L2 bindings), GStreamer's development files
# and plugins (the `gstreamer` feature: video files, RTSP, `--output`; the tests make clips
# with gst-launch-1.0, serve RTSP from Python and read videos back with gst-discoverer-1.0),
# and for the aarch64 check (scripts/arm_check.sh) the cross compiler, its C library and
# qemu-user; for the preview and MQTT tests, headless Chromium, the mosquitto broker and
# openssl (a test CA for mqtts://). Safe to run again.
set -euo pipefail
need=()
packages=(
  dataset-fashion-mnist libclang-dev
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  gstreamer1.0-tools gstreamer1.0-plugins-base-apps gir1.2-gst-rtsp-server-1.0 python3-gi
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user python3
  chromium mosquitto mosquitto-clients openssl
)
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust >= 1.94 with rustup" >&2; exit 1; }
# The aarch64 standard library, for scripts/arm_check.sh.
if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu >/dev/null
fi
