#!/usr/bin/env bash
# Xen blkif benchmark (issue 4): the userspace blkfront (bp-blkfront) as the guest, through the
# emulated Xen host's grants and event channels, the worker's blkif backend, block layer and
# io_uring backend, against fio's io_uring engine on the same file in the same run.
#
#   tests/bench/xen/run.sh            # RUNTIME=5 REPS=3
#
# Writes results.jsonl (every run), results.json (medians and ratios) and results.md into $OUT
# (default $BUILD/bench-results-xen). Contenders are interleaved within each repetition so that
# machine noise hits both. Not a test: nothing here runs in CI.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
BUILD=${BUILD:-$root/build}
RUNTIME=${RUNTIME:-5}
REPS=${REPS:-3}
OUT=${OUT:-$BUILD/bench-results-xen}
FILE=${FILE:-/tmp/blockplane-bench-1g.img}
mkdir -p "$OUT"
cmake -S "$root" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" --target blockplaned blockplane-worker bpctl bp-xenhost bp-blkfront >&2
bin=$BUILD/bin

if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" -ne $((1 << 30)) ]; then
  echo "writing $FILE (1 GiB, not sparse)" >&2
  dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none
fi

work=$(mktemp -d /tmp/bp-xenbench.XXXXXX)
pids=()
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/xen" "$work/disks"
ln "$FILE" "$work/disks/bench.img" 2>/dev/null || cp --reflink=auto "$FILE" "$work/disks/bench.img"
"$bin/bp-xenhost" --run-dir "$work/xen" --domain 5:65536:8192 > "$work/xh.out" 2> "$work/xh.log" &
pids+=($!)
for _ in $(seq 100); do grep -q READY "$work/xh.out" 2>/dev/null && break; sleep 0.1; done
"$bin/blockplaned" --socket="$work/s" --state-dir="$work/state" --backing-root="$work/disks" \
  --xen-platform=emulated --xen-run-dir="$work/xen" --stop-workers-on-exit 2> "$work/ctl.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/s" ] && break; sleep 0.1; done
"$bin/bpctl" --socket "$work/s" attach bench --path "$work/disks/bench.img" --xen-domid 5 \
  --xen-vdev xvda --cache none >/dev/null

fio_iops() {  # QD
  fio --name=randread --filename="$work/disks/bench.img" --ioengine=io_uring --direct=1 \
    --rw=randread --bs=4k --iodepth="$1" --numjobs=1 --size=1g --time_based \
    --runtime="$RUNTIME" --norandommap --randrepeat=0 --invalidate=0 --output-format=json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])'
}
blkfront_json() {  # QD [extra flags]
  local qd=$1
  shift
  "$bin/bp-blkfront" --run-dir "$work/xen" --domid 5 --vdev xvda --workload randread --bs 4k \
    --iodepth "$qd" --runtime "$RUNTIME" "$@" 2>/dev/null
}

: > "$OUT/results.jsonl"
for rep in $(seq "$REPS"); do
  for qd in 1 32; do
    f=$(fio_iops "$qd")
    echo "{\"rep\":$rep,\"qd\":$qd,\"contender\":\"fio io_uring O_DIRECT\",\"iops\":$f}" >> "$OUT/results.jsonl"
    b=$(blkfront_json "$qd" | python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])')
    echo "{\"rep\":$rep,\"qd\":$qd,\"contender\":\"blkfront notify\",\"iops\":$b}" >> "$OUT/results.jsonl"
    p=$(blkfront_json "$qd" --poll | python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])')
    echo "{\"rep\":$rep,\"qd\":$qd,\"contender\":\"blkfront poll\",\"iops\":$p}" >> "$OUT/results.jsonl"
    echo "rep $rep qd $qd: fio $f blkfront $b (poll $p)" >&2
  done
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
res = {}
for qd in (1, 32):
    med = {}
    for c in ("fio io_uring O_DIRECT", "blkfront notify", "blkfront poll"):
        med[c] = statistics.median(r["iops"] for r in rows if r["qd"] == qd and r["contender"] == c)
    pairs = {c: statistics.median(
        [r["iops"] for r in rows if r["qd"] == qd and r["contender"] == c][i] /
        [r["iops"] for r in rows if r["qd"] == qd and r["contender"] == "fio io_uring O_DIRECT"][i]
        for i in range(len([r for r in rows if r["qd"] == qd and r["contender"] == c])))
        for c in ("blkfront notify", "blkfront poll")}
    res[f"qd{qd}"] = {"median_iops": med, "median_paired_ratio_vs_fio": pairs}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
with open(f"{out}/results.md", "w") as md:
    md.write("| QD | fio io_uring O_DIRECT (IOPS) | blkfront, notifications (IOPS, ratio) | blkfront, polling (IOPS, ratio) |\n|---:|---:|---:|---:|\n")
    for qd in (1, 32):
        r = res[f"qd{qd}"]
        m, p = r["median_iops"], r["median_paired_ratio_vs_fio"]
        md.write(f"| {qd} | {m['fio io_uring O_DIRECT']:.0f} | {m['blkfront notify']:.0f} ({p['blkfront notify']:.2f}x) | {m['blkfront poll']:.0f} ({p['blkfront poll']:.2f}x) |\n")
print(open(f"{out}/results.md").read())
PY
