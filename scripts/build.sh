#!/usr/bin/env bash
# Configures and builds blockplane. Usage: scripts/build.sh [--sanitize] [TARGET...]
# Build folders: build/ (RelWithDebInfo) and build-asan/ (ASan+UBSan). Without targets, builds
# everything (binaries, tests, benchmarks). Prints the build folder on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build
args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  args=(-DCMAKE_BUILD_TYPE=Debug -DBLOCKPLANE_SANITIZE=ON)
  shift
fi
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake -S . -B "$dir" -G Ninja "${args[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)" "${targets[@]}" >&2
echo "$dir"
