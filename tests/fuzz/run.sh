#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in a separate build folder and runs each for a bounded
# time, starting from its checked-in seed corpus. For CI and for local runs:
#
#   tests/fuzz/run.sh                      # every target, 60 s each
#   FUZZ_SECONDS=600 tests/fuzz/run.sh blkif_request_fuzz
#
# Environment: BUILD_DIR (default <repo>/build-fuzz), FUZZ_SECONDS (60), JOBS (ninja -j, 1),
# FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=2"). New inputs go to
# $BUILD_DIR/fuzz-corpus/<target> (not the checked-in corpus); crashes to
# $BUILD_DIR/fuzz-artifacts/<target>/. Exit status is non-zero if a target finds a crash.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${BUILD_DIR:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-60}
jobs=${JOBS:-1}
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(blkif_request_fuzz)
fi

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  > "$build.cmake.log" 2>&1 || { cat "$build.cmake.log"; exit 1; }
nice -n 10 ninja -C "$build" -j"$jobs" "${targets[@]}"

for target in "${targets[@]}"; do
  seeds="$root/tests/fuzz/corpus/${target%_fuzz}"
  corpus="$build/fuzz-corpus/$target"
  artifacts="$build/fuzz-artifacts/$target/"
  mkdir -p "$corpus" "$artifacts"
  echo "== $target: ${seconds}s from $seeds"
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  "$build/bin/$target" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$artifacts" ${FUZZ_ARGS:-} "$corpus" "$seeds"
done
