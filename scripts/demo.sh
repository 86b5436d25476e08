#!/usr/bin/env bash
# The main job, end to end on one machine: installs dependencies, builds, starts blockplaned in a
# temp dir, attaches a device backed by a sparse file, and walks it through its lifecycle with
# bpctl (show, resize, drain, resume, stats, detach). Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
bin="$(pwd)/$(scripts/build.sh blockplaned blockplane-worker bpctl | tail -n 1)/bin"

work=$(mktemp -d /tmp/blockplane-demo.XXXXXX)
ctl_pid=""
cleanup() {
  [ -n "$ctl_pid" ] && kill "$ctl_pid" 2>/dev/null && wait "$ctl_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

mkdir -p "$work/disks"
truncate -s 1G "$work/disks/vm1-root.img"
sock="$work/blockplane.sock"
export BLOCKPLANE_SOCKET="$sock"

step "start blockplaned (API on $sock, registry in $work/state)"
"$bin/blockplaned" --socket="$sock" --state-dir="$work/state" --backing-root="$work/disks" \
  --stop-workers-on-exit 2> "$work/blockplaned.log" &
ctl_pid=$!
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
if [ ! -S "$sock" ]; then
  echo "blockplaned did not start; its log:" >&2
  cat "$work/blockplaned.log" >&2
  exit 1
fi

step "attach a Xen PV disk for domain 5 backed by a 1 GiB sparse file"
run "$bin/bpctl" attach vm1-root --path "$work/disks/vm1-root.img" --xen-domid 5 --xen-vdev xvda
run "$bin/bpctl" list

step "grow it to 2 GiB while it is serving"
run "$bin/bpctl" resize vm1-root --size 2G
ls -ls "$work/disks/vm1-root.img"

step "drain (quiesce + flush), then resume"
run "$bin/bpctl" drain vm1-root --deadline 10s
run "$bin/bpctl" resume vm1-root

step "the worker is supervised: kill -9 it and watch the controller restart it"
pid=$("$bin/bpctl" --json get vm1-root | sed -n 's/.*"workerPid": \([0-9]*\).*/\1/p')
run kill -9 "$pid"
for _ in $(seq 100); do
  new=$("$bin/bpctl" --json get vm1-root | sed -n 's/.*"workerPid": \([0-9]*\).*/\1/p')
  [ -n "$new" ] && [ "$new" != "$pid" ] && [ "$new" != 0 ] && break
  sleep 0.05
done
run "$bin/bpctl" get vm1-root

step "per-operation accounting from the worker"
run "$bin/bpctl" stats vm1-root

step "detach"
run "$bin/bpctl" detach vm1-root
run "$bin/bpctl" list

step "controller log"
cat "$work/blockplaned.log"
