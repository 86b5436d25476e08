#!/usr/bin/env bash
# The main job, end to end on one machine, without a hypervisor: installs dependencies, builds,
# starts an emulated Xen host (real xs_wire xenstored, grant tables and guest memory in shared
# memory), starts blockplaned on it, attaches a Xen PV disk for guest domain 5 backed by a sparse
# file, and runs a userspace blkfront in the guest's place: a verified random read/write workload
# through the ring, the grants and the worker's io_uring dataplane. Then it shows the device, its
# accounting and /metrics, resizes it, drains it, survives a worker kill -9 in the middle of the
# guest's I/O, and detaches.
# Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
bin="$(pwd)/$(scripts/build.sh blockplaned blockplane-worker bpctl bp-xenhost bp-blkfront |
  tail -n 1)/bin"

work=$(mktemp -d /tmp/blockplane-demo.XXXXXX)
pids=()
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "demo: failed (exit $status); component logs follow" >&2
    for log in "$work"/*.log; do echo "---- $log" >&2; cat "$log" >&2; done
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null && wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
wait_for() {  # wait_for DESCRIPTION COMMAND...: up to 30 s
  local what=$1
  shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $what" >&2
  cat "$work"/*.log >&2
  exit 1
}

mkdir -p "$work/disks" "$work/xen"
truncate -s 1G "$work/disks/vm5-root.img"
sock="$work/blockplane.sock"
export BLOCKPLANE_SOCKET="$sock"
export XENSTORED_PATH="$work/xen/xenstored"

step "start the emulated Xen host with guest domain 5 (64 MiB of guest memory)"
"$bin/bp-xenhost" --run-dir "$work/xen" --domain 5:16384:4096 > "$work/xenhost.out" \
  2> "$work/xenhost.log" &
pids+=($!)
wait_for "bp-xenhost" grep -q READY "$work/xenhost.out"

step "start blockplaned on it (API on $sock)"
"$bin/blockplaned" --socket="$sock" --state-dir="$work/state" --backing-root="$work/disks" \
  --xen-platform=emulated --xen-run-dir="$work/xen" --metrics-host=127.0.0.1 \
  --stop-workers-on-exit 2> "$work/blockplaned.log" &
pids+=($!)
wait_for "blockplaned" test -S "$sock"

step "attach a Xen PV disk for domain 5, backed by a 1 GiB sparse file"
run "$bin/bpctl" attach vm5-root --path "$work/disks/vm5-root.img" --xen-domid 5 --xen-vdev xvda
echo "The toolstack entries blockplaned wrote, as the real xenstore-ls sees them:"
run xenstore-ls /local/domain/0/backend/vbd

step "the guest's blkfront connects and runs a verified random read/write workload (QD32)"
run "$bin/bp-blkfront" --run-dir "$work/xen" --domid 5 --vdev xvda --queues 2 \
  --workload randrw --rwmix-read 50 --bs 4k --iodepth 32 --ops 20000 --flush-every 1000 \
  --verify --assume-zeroed

step "what the worker accounted (bpctl stats) and exports to Prometheus"
run "$bin/bpctl" stats vm5-root
endpoint=$("$bin/bpctl" --json get vm5-root | sed -n 's/.*"metricsEndpoint": "\([^"]*\)".*/\1/p')
if [ -n "$endpoint" ]; then
  echo "\$ curl http://$endpoint/metrics | grep bytes_total"
  python3 -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" \
    "http://$endpoint/metrics" | grep '^blockplane_device_bytes_total' || true
fi

step "grow the disk to 2 GiB; the frontend reads the new size from xenstore"
run "$bin/bpctl" resize vm5-root --size 2G
run xenstore-read /local/domain/0/backend/vbd/5/51712/sectors

step "drain (quiesce + flush), then resume"
run "$bin/bpctl" drain vm5-root --deadline 10s
run "$bin/bpctl" resume vm5-root

step "the worker is supervised: kill -9 it in the middle of the guest's verified I/O"
echo "The controller starts the next worker; it re-attaches to the guest's rings and answers, from"
echo "the request journal, every request the dead one had taken: the guest sees no error."
"$bin/bp-blkfront" --run-dir "$work/xen" --domid 5 --vdev xvda --queues 2 --workload randrw \
  --rwmix-read 50 --bs 4k --iodepth 32 --runtime 6 --verify > "$work/crash-run.json" \
  2> "$work/crash-run.log" &
front=$!
wait_for "the guest's I/O" sh -c "\"$bin/bpctl\" --json get vm5-root | grep -q DEVICE_STATE_CONNECTED"
sleep 2
pid=$("$bin/bpctl" --json get vm5-root | sed -n 's/.*"workerPid": \([0-9]*\).*/\1/p')
run kill -9 "$pid"
wait "$front"
cat "$work/crash-run.json"
run "$bin/bpctl" get vm5-root

step "detach: the guest is told to close, the xenstore entries go away"
run "$bin/bpctl" detach vm5-root
run "$bin/bpctl" list
xenstore-ls /local/domain/0/backend 2>/dev/null || echo "(no backend entries left)"

step "controller log"
cat "$work/blockplaned.log"
