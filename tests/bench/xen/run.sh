#!/usr/bin/env bash
# Xen blkif benchmark (issue 4), one command:
#
#   tests/bench/xen/run.sh            # RUNTIME=5 REPS=3
#
# The userspace blkfront (bp-blkfront) is the guest, through the emulated Xen host's grants and
# event channels, the worker's blkif backend and block layer, against
#   - a file (cache none = O_DIRECT, UringBackend), compared with fio's io_uring engine on the
#     same file (target: >= 0.9x fio), and
#   - a null backend (spec.backend.null: every request completes through an io_uring NOP),
#     compared with the raw io_uring NOP rate in batches of 32 (dataplane_bench nop --batch 32;
#     target: QD32 >= 0.5x), run right before and right after each null run at QD32: each
#     run's ratio is to the mean of the two; and the same null device with deferred completion
#     (spec.backend.null.completion: no kernel call per request, like QEMU's null-co), polled
#     only, which leaves the stack alone in the measurement,
#   - the same two null devices on one CPU (xen_path_bench: guest, backend and block layer in one
#     process on WORKER_CPU, no hand-off between CPUs, so no dependence on where the host puts
#     the two vCPUs), QD32 polled, bracketed by NOP runs like the others,
# 4 KiB random reads at QD1 and QD32, each in two modes:
#   - notify: the guest sleeps on its event channel, the worker sleeps in io_uring until kicked;
#   - poll:   the guest spins on its ring (bp-blkfront --poll, never asks for a kick) and the
#             worker polls the ring (the device's --xen-poll-us), so no events flow while busy.
# One controller serves every device; the poll devices set their own window (spec.xen.poll_us,
# bpctl --xen-poll-us): xvda (file) and xvdb (null) notify, xvdc (file), xvdd (null) and xvde
# (null deferred) poll, all for guest 5. The two file devices share the file read-only (the
# controller refuses two writers of one file; the workload only reads).
#
# Pinning (2 cores): the guest (bp-blkfront) on GUEST_CPU, each worker (all threads) on
# WORKER_CPU; fio and dataplane_bench, which are the whole stack in one process, on WORKER_CPU.
# Contenders are interleaved within each repetition so that machine noise hits all of them.
# Writes results.jsonl (every run, with the worker's CPU time per request), results.json
# (medians, paired ratios, the exact commands, the machine state) and results.md (tables to
# paste into docs/performance.md) into $OUT (default $BUILD/bench-results-xen). Not a test.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
BUILD=${BUILD:-$root/build-bench}
RUNTIME=${RUNTIME:-5}
REPS=${REPS:-3}
OUT=${OUT:-$BUILD/bench-results-xen}
FILE=${FILE:-/tmp/blockplane-bench-1g.img}
GUEST_CPU=${GUEST_CPU:-0}
WORKER_CPU=${WORKER_CPU:-1}
POLL_US=${POLL_US:-1000}
mkdir -p "$OUT"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
nice ninja -C "$BUILD" -j1 blockplaned blockplane-worker bpctl bp-xenhost bp-blkfront \
  dataplane_bench xen_path_bench >&2
bin=$BUILD/bin

if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" -ne $((1 << 30)) ]; then
  echo "writing $FILE (1 GiB, not sparse)" >&2
  dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none
fi

# shellcheck source=tests/bench/xen/common.sh
. "$root/tests/bench/xen/common.sh"
ln "$FILE" "$work/disks/bench.img" 2>/dev/null || cp --reflink=auto "$FILE" "$work/disks/bench.img"
start_xenhost

: >"$OUT/commands.txt"
start_controller() {  # NAME [flags]
  local name=$1
  shift
  "$bin/blockplaned" --socket="$work/$name.sock" --state-dir="$work/$name" \
    --backing-root="$work/disks" --xen-platform=emulated --xen-run-dir="$work/xen" \
    --stop-workers-on-exit "$@" 2>"$work/$name.log" &
  pids+=($!)
  echo "blockplaned --xen-platform=emulated $*  # controller \"$name\"" >>"$OUT/commands.txt"
  for _ in $(seq 100); do [ -S "$work/$name.sock" ] && break; sleep 0.1; done
}
attach() {  # CONTROLLER ID VDEV [backend flags]; pins the worker's threads to WORKER_CPU
  local ctl=$1 id=$2 vdev=$3
  shift 3
  local cmd=(bpctl attach "$id" "$@" --xen-domid 5 --xen-vdev "$vdev" --xen-max-queues 1)
  echo "${cmd[*]}  # controller \"$ctl\"" >>"$OUT/commands.txt"
  "$bin/bpctl" --socket "$work/$ctl.sock" "${cmd[@]:1}" >/dev/null
  local pid
  pid=$("$bin/bpctl" --socket "$work/$ctl.sock" get "$id" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["workerPid"])')
  taskset -a -p -c "$WORKER_CPU" "$pid" >/dev/null
  echo "$pid" >"$work/$id.pid"
}
start_controller main
attach main file-notify xvda --path "$work/disks/bench.img" --cache none --read-only
attach main null-notify xvdb --null-size 1G
attach main file-poll xvdc --path "$work/disks/bench.img" --cache none --read-only \
  --xen-poll-us "$POLL_US"
attach main null-poll xvdd --null-size 1G --xen-poll-us "$POLL_US"
attach main nulld-poll xvde --null-size 1G --null-completion deferred --xen-poll-us "$POLL_US"
echo "taskset -a -p -c $WORKER_CPU <worker pid>  # every worker, after attach" >>"$OUT/commands.txt"

cpu_ticks() {  # PID -> utime + stime of the whole process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}
record() {  # REP QD CONTENDER JSON-FIELDS
  echo "{\"rep\":$1,\"qd\":$2,\"contender\":\"$3\",$4}" >>"$OUT/results.jsonl"
}

NOP_CMD=(taskset -c "$WORKER_CPU" "$bin/dataplane_bench" nop --batch 32 --seconds "$RUNTIME")
echo "${NOP_CMD[*]}" >>"$OUT/commands.txt"
ONE_CPU_CMD=(taskset -c "$WORKER_CPU" "$bin/xen_path_bench" --qd 32 --seconds "$RUNTIME")
echo "${ONE_CPU_CMD[*]} --completion nop|deferred" >>"$OUT/commands.txt"
fio_cmd() {  # QD
  echo taskset -c "$WORKER_CPU" fio --name=randread --filename="$work/disks/bench.img" \
    --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth="$1" --numjobs=1 --size=1g \
    --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --invalidate=0 \
    --output-format=json
}
blkfront_cmd() {  # VDEV QD [--poll]
  echo taskset -c "$GUEST_CPU" "$bin/bp-blkfront" --run-dir "$work/xen" --domid 5 --vdev "$1" \
    --workload randread --bs 4k --iodepth "$2" --runtime "$RUNTIME" "${@:3}"
}
for qd in 1 32; do
  fio_cmd "$qd" >>"$OUT/commands.txt"
  blkfront_cmd xvda "$qd" >>"$OUT/commands.txt"
  blkfront_cmd xvdc "$qd" --poll >>"$OUT/commands.txt"
  blkfront_cmd xvdb "$qd" >>"$OUT/commands.txt"
  blkfront_cmd xvdd "$qd" --poll >>"$OUT/commands.txt"
  blkfront_cmd xvde "$qd" --poll >>"$OUT/commands.txt"
done

run_blkfront() {  # REP QD CONTENDER DEVICE-ID VDEV [--poll]
  local rep=$1 qd=$2 contender=$3 id=$4 vdev=$5
  shift 5
  local pid before after json
  pid=$(cat "$work/$id.pid")
  before=$(cpu_ticks "$pid")
  json=$($(blkfront_cmd "$vdev" "$qd" "$@") 2>/dev/null)
  after=$(cpu_ticks "$pid")
  record "$rep" "$qd" "$contender" "$(python3 - "$json" "$before" "$after" <<'PY'
import json, os, sys
r = json.loads(sys.argv[1])
ticks = int(sys.argv[3]) - int(sys.argv[2])
hz = os.sysconf("SC_CLK_TCK")
ops = max(r["ops"], 1)
print(f'"iops":{r["iops"]},"p50_us":{r["latency_us"]["p50"]},"p99_us":{r["latency_us"]["p99"]},'
      f'"worker_cpu_ns_per_op":{ticks * 1e9 / hz / ops:.0f},'
      f'"guest_notifications":{r["ring"]["notifications_sent"]},"errors":{r["errors"]["total"]}')
PY
)"
}

: >"$OUT/results.jsonl"
run_nop() {  # REP AT: the NOP baseline, recorded with where it ran (before/between/after)
  local n
  n=$("${NOP_CMD[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ops_per_sec"])')
  record "$1" 32 "io_uring NOP batch 32" "\"iops\":$n,\"at\":\"$2\""
}
for rep in $(seq "$REPS"); do
  for qd in 1 32; do
    f=$($(fio_cmd "$qd") | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])')
    record "$rep" "$qd" "fio io_uring O_DIRECT" "\"iops\":$f"
    run_blkfront "$rep" "$qd" "file notify" file-notify xvda
    run_blkfront "$rep" "$qd" "file poll" file-poll xvdc --poll
    # The NOP baseline brackets each null run at QD32 (the CPU's speed on this VM drifts by 20%
    # and more within a minute): a run's ratio is to the mean of the NOP runs just before and
    # just after it.
    [ "$qd" = 32 ] && run_nop "$rep" before
    run_blkfront "$rep" "$qd" "null notify" null-notify xvdb
    [ "$qd" = 32 ] && run_nop "$rep" between
    run_blkfront "$rep" "$qd" "null poll" null-poll xvdd --poll
    [ "$qd" = 32 ] && run_nop "$rep" after
    run_blkfront "$rep" "$qd" "null deferred poll" nulld-poll xvde --poll
    [ "$qd" = 32 ] && run_nop "$rep" last
    if [ "$qd" = 32 ]; then
      for mode in nop deferred; do
        n=$("${ONE_CPU_CMD[@]}" --completion "$mode" 2>/dev/null |
          python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["errors"]==0, r; print(r["ops_per_sec"])')
        record "$rep" 32 "one CPU null $mode" "\"iops\":$n"
      done
      run_nop "$rep" one-cpu-after
    fi
    echo "rep $rep qd $qd done" >&2
  done
done

python3 - "$OUT" "$root" "$RUNTIME" "$REPS" <<'PY'
import json, os, statistics, subprocess, sys
out, root, runtime, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
def runs(qd, c, key="iops"):
    return [r[key] for r in sorted(rows, key=lambda r: r["rep"]) if r["qd"] == qd and r["contender"] == c]
nop = runs(32, "io_uring NOP batch 32")
def nop_at(at):
    return [r["iops"] for r in sorted(rows, key=lambda r: r["rep"])
            if r["contender"] == "io_uring NOP batch 32" and r.get("at") == at]
# Per repetition, the baseline of a null run: the mean of the NOP runs that bracket it.
nop_bracket = {
    "null notify": [(a + b) / 2 for a, b in zip(nop_at("before"), nop_at("between"))],
    "null poll": [(a + b) / 2 for a, b in zip(nop_at("between"), nop_at("after"))],
    "null deferred poll": [(a + b) / 2 for a, b in zip(nop_at("after"), nop_at("last"))],
    "one CPU null nop": [(a + b) / 2 for a, b in zip(nop_at("last"), nop_at("one-cpu-after"))],
    "one CPU null deferred": [(a + b) / 2 for a, b in zip(nop_at("last"), nop_at("one-cpu-after"))],
}
one_cpu = {}
for c in ("one CPU null nop", "one CPU null deferred"):
    v = runs(32, c)
    ratios = [a / b for a, b in zip(v, nop_bracket[c])]
    one_cpu[c] = {"median_iops": statistics.median(v), "runs": v, "paired_ratios": ratios,
                  "median_paired_ratio": statistics.median(ratios),
                  "median_ns_per_op": statistics.median(1e9 / x for x in v)}
contenders = ["fio io_uring O_DIRECT", "file notify", "file poll", "null notify", "null poll",
              "null deferred poll"]
res = {"nop_batch32": {"median_ops_per_sec": statistics.median(nop), "runs": nop,
                       "bracketing_null_notify": nop_bracket["null notify"],
                       "bracketing_null_poll": nop_bracket["null poll"],
                       "bracketing_null_deferred_poll": nop_bracket["null deferred poll"]}}
for qd in (1, 32):
    q = {}
    for c in contenders:
        v = runs(qd, c)
        e = {"median_iops": statistics.median(v), "runs": v}
        if c != contenders[0]:
            e["median_p50_us"] = statistics.median(runs(qd, c, "p50_us"))
            e["median_p99_us"] = statistics.median(runs(qd, c, "p99_us"))
            e["median_worker_cpu_ns_per_op"] = statistics.median(runs(qd, c, "worker_cpu_ns_per_op"))
            e["errors"] = sum(runs(qd, c, "errors"))
        base = (runs(qd, "fio io_uring O_DIRECT") if c.startswith("file")
                else nop_bracket[c] if c.startswith("null") and qd == 32 else None)
        if base:
            e["paired_ratios"] = [a / b for a, b in zip(v, base)]
            e["median_paired_ratio"] = statistics.median(e["paired_ratios"])
            e["ratio_to"] = "fio, same QD" if c.startswith("file") else "io_uring NOP batch 32"
        q[c] = e
    res[f"qd{qd}"] = q
res["one_cpu_qd32"] = one_cpu
def sh(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, cwd=root).stdout.strip()
    except OSError:
        return ""
res["machine"] = {"uptime": sh("uptime"), "nproc": os.cpu_count(), "kernel": sh("uname", "-r"),
                  "commit": sh("git", "rev-parse", "--short", "HEAD"),
                  "dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no"))}
res["runtime_s"], res["reps"] = int(runtime), reps
res["commands"] = open(f"{out}/commands.txt").read().splitlines()
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
with open(f"{out}/results.md", "w") as md:
    m = res["machine"]
    md.write(f"Machine: {m['nproc']} CPUs, kernel {m['kernel']}, commit {m['commit']}"
             f"{' (with uncommitted changes)' if m['dirty'] else ''}; at the end: {m['uptime']}. "
             f"{reps} repetitions of {runtime} s; medians, and the median of the per-repetition "
             f"ratios (a null run's to the mean of the NOP runs just before and after it). "
             f"io_uring NOP, batches of 32: {res['nop_batch32']['median_ops_per_sec']:.0f}/s.\n\n")
    md.write("| QD | backend | fio io_uring O_DIRECT | notify: IOPS (ratio) | poll: IOPS (ratio) "
             "| notify p50 / p99 us | poll p50 / p99 us | worker CPU ns/req notify / poll |\n"
             "|---:|---|---:|---:|---:|---:|---:|---:|\n")
    for qd in (1, 32):
        q = res[f"qd{qd}"]
        for kind, against in (("file", "fio"), ("null", "NOP")):
            n, p = q[f"{kind} notify"], q[f"{kind} poll"]
            fio = f"{q['fio io_uring O_DIRECT']['median_iops']:.0f}" if kind == "file" else "-"
            # The NOP target is about QD32; a QD1 ratio to a batch-32 rate means nothing.
            ratio = lambda e: ("" if kind == "null" and qd == 1
                               else f" ({e['median_paired_ratio']:.3f}x {against})" if kind == "null"
                               else f" ({e['median_paired_ratio']:.2f}x {against})")
            md.write(f"| {qd} | {kind} | {fio} "
                     f"| {n['median_iops']:.0f}{ratio(n)} "
                     f"| {p['median_iops']:.0f}{ratio(p)} "
                     f"| {n['median_p50_us']:.1f} / {n['median_p99_us']:.1f} "
                     f"| {p['median_p50_us']:.1f} / {p['median_p99_us']:.1f} "
                     f"| {n['median_worker_cpu_ns_per_op']:.0f} / {p['median_worker_cpu_ns_per_op']:.0f} |\n")
        d = q["null deferred poll"]
        dratio = f" ({d['median_paired_ratio']:.3f}x NOP)" if qd == 32 else ""
        md.write(f"| {qd} | null, deferred completion | - | - | {d['median_iops']:.0f}{dratio} | - "
                 f"| {d['median_p50_us']:.1f} / {d['median_p99_us']:.1f} "
                 f"| - / {d['median_worker_cpu_ns_per_op']:.0f} |\n")
    md.write("\nOne CPU (xen_path_bench: guest and worker in one process, QD32, polled): ")
    md.write("; ".join(f"null {c.split()[-1]}: {e['median_iops']:.0f} IOPS, "
                       f"{e['median_ns_per_op']:.0f} ns per request for both sides, "
                       f"{e['median_paired_ratio']:.3f}x NOP"
                       for c, e in one_cpu.items()) + ".\n")
    md.write("\nTargets: file QD32 >= 0.9x fio; null QD32 >= 0.5x the NOP rate. \"null\" completes "
             "every request through an io_uring NOP; \"deferred completion\" makes no kernel call "
             "per request (QEMU's null-co).\n\nCommands:\n\n```\n")
    md.write("\n".join(res["commands"]) + "\n```\n")
print(open(f"{out}/results.md").read())
PY
echo "results: $OUT/results.json $OUT/results.md" >&2
