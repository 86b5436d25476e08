# Shared by tests/bench/xen/run.sh and ab.sh (sourced, not run): a work dir that goes away with
# every process started into `pids` (newest first), and bp-xenhost with guest 5 on it.
# Needs `bin` set; sets `work` and `pids`.
work=$(mktemp -d /tmp/bp-xenbench.XXXXXX)
pids=()
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/xen" "$work/disks"
start_xenhost() {
  "$bin/bp-xenhost" --run-dir "$work/xen" --domain 5:65536:8192 >"$work/xh.out" \
    2>"$work/xh.log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q READY "$work/xh.out" 2>/dev/null && break; sleep 0.1; done
}
