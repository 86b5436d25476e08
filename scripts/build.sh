#!/usr/bin/env bash
# Configures and builds blockplane. Usage: scripts/build.sh [--sanitize]
# Build folders: build/ (RelWithDebInfo) and build-asan/ (ASan+UBSan).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build
args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  args=(-DCMAKE_BUILD_TYPE=Debug -DBLOCKPLANE_SANITIZE=ON)
fi
cmake -S . -B "$dir" -G Ninja "${args[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)"
echo "$dir"
