#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test. Usage: scripts/test.sh [--sanitize]
# With --sanitize the build and the tests use ASan+UBSan (folder build-asan/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
dir=$(scripts/build.sh "$@" | tail -n 1)
if [ "${1:-}" = "--sanitize" ]; then
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
cd "$dir"
ctest --output-on-failure --timeout 600 -j "$(nproc)"
