#!/usr/bin/env bash
# A/B of two builds of the Xen dataplane on the polled null-backend benchmark, one command:
#
#   A=old/blockplane-worker B=new/blockplane-worker tests/bench/xen/ab.sh   # PAIRS=16 RUNTIME=1
#   GA=old/bp-blkfront GB=new/bp-blkfront tests/bench/xen/ab.sh             # guests instead
#
# On a 2-vCPU VM the polled guest-to-worker rate drifts by 1.5x and more within minutes (vCPU
# placement), so two separate runs of tests/bench/xen/run.sh cannot tell a 5% change from noise.
# Here side A and side B each get a controller (with their worker binary, --xen-poll-us) and a
# null device for guest 5, and the runs alternate in short pairs (A B, then B A, ...), so the
# drift hits both sides of a pair alike. The median of the per-pair B/A ratios is the answer.
#
# A, B: worker binaries (default: BUILD's); GA, GB: bp-blkfront binaries (default: BUILD's).
# QD (32), RUNTIME per run in s (1), PAIRS (16), GUEST_CPU (0), WORKER_CPU (1); ATTACH_FLAGS: more
# `bpctl attach` flags for both devices (e.g. "--null-completion deferred").
# Prints one line per pair and the median; writes $OUT/ab.json (default $BUILD/bench-results-ab).
# Needs an otherwise idle machine. Not a test.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
BUILD=${BUILD:-$root/build-bench}
bin=$BUILD/bin
RUNTIME=${RUNTIME:-1}
PAIRS=${PAIRS:-16}
QD=${QD:-32}
GUEST_CPU=${GUEST_CPU:-0}
WORKER_CPU=${WORKER_CPU:-1}
OUT=${OUT:-$BUILD/bench-results-ab}
A=${A:-$bin/blockplane-worker}
B=${B:-$bin/blockplane-worker}
GA=${GA:-$bin/bp-blkfront}
GB=${GB:-$bin/bp-blkfront}
mkdir -p "$OUT"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
nice ninja -C "$BUILD" -j1 blockplaned blockplane-worker bpctl bp-xenhost bp-blkfront >&2

# shellcheck source=tests/bench/xen/common.sh
. "$root/tests/bench/xen/common.sh"
start_xenhost

start_side() {  # SIDE WORKER-BINARY VDEV
  local side=$1 worker=$2 vdev=$3 pid
  "$bin/blockplaned" --socket="$work/$side.sock" --state-dir="$work/$side" \
    --backing-root="$work/disks" --xen-platform=emulated --xen-run-dir="$work/xen" \
    --stop-workers-on-exit --xen-poll-us=1000 --worker-binary="$worker" 2>"$work/$side.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/$side.sock" ] && break; sleep 0.1; done
  "$bin/bpctl" --socket "$work/$side.sock" attach "null-$side" --null-size 1G --xen-domid 5 \
    --xen-vdev "$vdev" --xen-max-queues 1 ${ATTACH_FLAGS:-} >/dev/null
  pid=$("$bin/bpctl" --socket "$work/$side.sock" get "null-$side" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["workerPid"])')
  taskset -a -p -c "$WORKER_CPU" "$pid" >/dev/null
}
start_side a "$A" xvdd
start_side b "$B" xvde

run() {  # VDEV GUEST-BINARY -> IOPS (fails on any I/O error)
  taskset -c "$GUEST_CPU" "$2" --run-dir "$work/xen" --domid 5 --vdev "$1" --workload randread \
    --bs 4k --iodepth "$QD" --runtime "$RUNTIME" --poll 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["errors"]["total"]==0, r; print(r["iops"])'
}

: >"$OUT/pairs.txt"
for p in $(seq "$PAIRS"); do
  if [ $((p % 2)) = 1 ]; then
    a=$(run xvdd "$GA")
    b=$(run xvde "$GB")
  else
    b=$(run xvde "$GB")
    a=$(run xvdd "$GA")
  fi
  echo "$a $b" >>"$OUT/pairs.txt"
  python3 -c "import sys; a, b = map(float, sys.argv[1:]); print(f'pair $p: A {a:.0f} B {b:.0f} IOPS, B/A {b / a:.3f}')" "$a" "$b"
done
python3 - "$OUT" "$A" "$B" "$GA" "$GB" "$QD" "$RUNTIME" <<'PY'
import json, statistics, sys
out, a, b, ga, gb, qd, runtime = sys.argv[1:]
pairs = [tuple(map(float, l.split())) for l in open(f"{out}/pairs.txt") if l.strip()]
ratios = [y / x for x, y in pairs]
res = {"A": {"worker": a, "guest": ga}, "B": {"worker": b, "guest": gb}, "qd": int(qd),
       "runtime_s": float(runtime), "pairs": pairs, "ratios_b_over_a": ratios,
       "median_ratio": statistics.median(ratios),
       "b_ahead_in": sum(r > 1 for r in ratios)}
json.dump(res, open(f"{out}/ab.json", "w"), indent=1)
print(f"median B/A {res['median_ratio']:.3f} over {len(ratios)} pairs; B ahead in "
      f"{res['b_ahead_in']} (min {min(ratios):.3f}, max {max(ratios):.3f})")
PY
