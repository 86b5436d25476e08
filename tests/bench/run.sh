#!/usr/bin/env bash
# One-command dataplane benchmark run (issue 3). Builds dataplane_bench if needed, then, on one
# pinned core and interleaving the contenders so machine noise hits both alike:
#   1. raw io_uring NOPs in batches of 32  vs  BlockDevice + NullBackend 4 KiB reads at QD32
#   2. fio --ioengine=io_uring --direct=1 4k randread QD32  vs  BlockDevice + UringBackend (and
#      UringBackend alone) on the same 1 GiB file in /tmp; then the same buffered (--direct=0).
# Writes $OUT/results.jsonl (every run), $OUT/results.json (medians, ratios, commands) and
# $OUT/results.md (a markdown table for docs/performance.md).
#
# Environment: BUILD (default build-dataplane), OUT (default $BUILD/bench-results), RUNTIME
# seconds per run (5), REPS (3), CPU to pin to (1), BENCH_FILE (/tmp/blockplane-bench-1g.img).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build-dataplane}
OUT=${OUT:-$BUILD/bench-results}
RUNTIME=${RUNTIME:-5}
REPS=${REPS:-3}
CPU=${CPU:-1}
FILE=${BENCH_FILE:-/tmp/blockplane-bench-1g.img}
BENCH=$BUILD/bin/dataplane_bench

if [[ ! -f $BUILD/build.ninja ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja >/dev/null
fi
nice -n 10 ninja -C "$BUILD" -j1 dataplane_bench >/dev/null
command -v fio >/dev/null || { echo "fio is required" >&2; exit 1; }

mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/commands.txt"

# A written (not sparse) 1 GiB file: reads of unwritten extents never reach the disk.
if [[ ! -f $FILE || $(stat -c %s "$FILE") -ne 1073741824 ]]; then
  echo "creating $FILE" >&2
  dd if=/dev/urandom of="$FILE" bs=1M count=1024 oflag=direct conv=fsync status=none
fi

PIN=(taskset -c "$CPU")

record() {  # record <label> <json-line>
  printf '{"label":"%s","result":%s}\n' "$1" "$2" >>"$OUT/results.jsonl"
}

run_ours() {  # run_ours <label> <args...>
  local label=$1
  shift
  echo "${PIN[*]} $BENCH $*" >>"$OUT/commands.txt"
  record "$label" "$("${PIN[@]}" "$BENCH" "$@")"
  echo "  $label done" >&2
}

run_fio() {  # run_fio <label> <direct 0|1>
  local label=$1 direct=$2
  local cmd=(fio --name=randread --filename="$FILE" --ioengine=io_uring --direct="$direct"
             --rw=randread --bs=4k --iodepth=32 --numjobs=1 --size=1g --time_based
             --runtime="$RUNTIME" --norandommap --randrepeat=0 --invalidate=0 --group_reporting
             --output-format=json)
  echo "${PIN[*]} ${cmd[*]}" >>"$OUT/commands.txt"
  local iops
  iops=$("${PIN[@]}" "${cmd[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])')
  record "$label" "{\"bench\":\"fio\",\"ops_per_sec\":$iops}"
  echo "  $label done" >&2
}

for rep in $(seq 1 "$REPS"); do
  echo "rep $rep/$REPS" >&2
  run_ours nop32 nop --batch 32 --seconds "$RUNTIME"
  run_ours block_null block-null --qd 32 --seconds "$RUNTIME"
  run_fio fio_direct 1
  run_ours ours_direct randread --file "$FILE" --qd 32 --seconds "$RUNTIME"
  run_ours backend_direct randread --file "$FILE" --qd 32 --seconds "$RUNTIME" --no-block-layer
done
cat "$FILE" >/dev/null  # warm the page cache for the buffered runs
for rep in $(seq 1 "$REPS"); do
  echo "buffered rep $rep/$REPS" >&2
  run_fio fio_buffered 0
  run_ours ours_buffered randread --file "$FILE" --qd 32 --seconds "$RUNTIME" --buffered
done

python3 - "$OUT" "$RUNTIME" "$REPS" "$CPU" <<'PY'
import json, statistics, sys, platform, subprocess
out, runtime, reps, cpu = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = {}
for line in open(f"{out}/results.jsonl"):
    rec = json.loads(line)
    runs.setdefault(rec["label"], []).append(rec["result"])
med = {k: statistics.median(r["ops_per_sec"] for r in v) for k, v in runs.items()}
cpu_ns = {k: statistics.median(r["cpu_ns_per_op"] for r in v)
          for k, v in runs.items() if "cpu_ns_per_op" in v[0]}
ratios = {
    "block_null / nop32 (target >= 0.6)": med["block_null"] / med["nop32"],
    "ours_direct / fio_direct (target >= 0.95)": med["ours_direct"] / med["fio_direct"],
    "backend_direct / fio_direct": med["backend_direct"] / med["fio_direct"],
    "ours_buffered / fio_buffered": med["ours_buffered"] / med["fio_buffered"],
}
def paired(a, b, key="ops_per_sec", invert=False):
    xs = [(y[key] / x[key]) if invert else (x[key] / y[key]) for x, y in zip(runs[a], runs[b])]
    return {"per_rep": [round(x, 3) for x in xs], "median": statistics.median(xs)}
paired_ratios = {
    "block_null / nop32 (throughput)": paired("block_null", "nop32"),
    "nop32 / block_null (CPU ns per op)": paired("block_null", "nop32", "cpu_ns_per_op", True),
    "ours_direct / fio_direct": paired("ours_direct", "fio_direct"),
    "ours_buffered / fio_buffered": paired("ours_buffered", "fio_buffered"),
}
summary = {"runtime_s": float(runtime), "paired_ratios": paired_ratios, "reps": int(reps), "cpu": int(cpu),
           "kernel": platform.release(), "median_ops_per_sec": med,
           "median_cpu_ns_per_op": cpu_ns, "ratios": ratios, "runs": runs,
           "commands": open(f"{out}/commands.txt").read().splitlines()}
json.dump(summary, open(f"{out}/results.json", "w"), indent=2)
desc = {
    "nop32": "raw io_uring NOP, batches of 32 (liburing)",
    "block_null": "BlockDevice + NullBackend, 4 KiB read, QD32",
    "fio_direct": "fio io_uring 4k randread QD32, direct=1",
    "ours_direct": "BlockDevice + UringBackend 4k randread QD32, O_DIRECT",
    "backend_direct": "UringBackend alone 4k randread QD32, O_DIRECT",
    "fio_buffered": "fio io_uring 4k randread QD32, direct=0 (cached)",
    "ours_buffered": "BlockDevice + UringBackend 4k randread QD32, buffered (cached)",
}
lines = ["| run | median ops/s | CPU ns/op (process) | all runs (ops/s) |", "|---|---:|---:|---|"]
for k in desc:
    if k not in runs: continue
    allr = ", ".join(f"{r['ops_per_sec']:.0f}" for r in runs[k])
    c = f"{cpu_ns[k]:.0f}" if k in cpu_ns else "-"
    lines.append(f"| {desc[k]} | {med[k]:.0f} | {c} | {allr} |")
lines += ["", "| ratio | value |", "|---|---:|"]
lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
lines += ["", "| paired ratio (same repetition) | per repetition | median |", "|---|---|---:|"]
lines += [f"| {k} | {', '.join(f'{x:.2f}' for x in v['per_rep'])} | {v['median']:.2f} |"
          for k, v in paired_ratios.items()]
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "results: $OUT/results.json $OUT/results.md" >&2
