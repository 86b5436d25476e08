#!/usr/bin/env bash
# Starts blockplaned in a temp folder (own socket, state dir and backing root), then runs
# reflection_client.py against it: list services, fetch descriptors, attach two devices, list them
# one page at a time, detach. Usage:
#   run_reflection_test.sh BLOCKPLANED WORKER_BINARY reflection_client.py
set -euo pipefail
blockplaned=$1
worker=$2
client=$3

# Short: worker socket paths under the state dir must fit in a sockaddr_un (107 bytes).
dir=$(mktemp -d /tmp/bpr.XXXXXX)
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$dir/roots" "$dir/s" "$dir/vhost"
size=$((64 << 20))
truncate -s "$size" "$dir/roots/a.img" "$dir/roots/b.img"

"$blockplaned" --socket="$dir/bp.sock" --state-dir="$dir/s" --backing-root="$dir/roots" \
  --worker-binary="$worker" --stop-workers-on-exit --log-level=warning 2>"$dir/blockplaned.log" &
daemon_pid=$!

# Wait for the socket while the daemon is alive (bounded: 30 s).
for _ in $(seq 300); do
  [ -S "$dir/bp.sock" ] && break
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "blockplaned exited before serving:" >&2
    cat "$dir/blockplaned.log" >&2
    exit 1
  fi
  sleep 0.1
done

status=0
/usr/bin/python3 "$client" --socket "$dir/bp.sock" --attach-path "$dir/roots/a.img" \
  --attach-path "$dir/roots/b.img" --vhost-socket-dir "$dir/vhost" --expect-size "$size" ||
  status=$?
if [ "$status" -ne 0 ]; then
  echo "--- blockplaned log:" >&2
  cat "$dir/blockplaned.log" >&2
fi
exit "$status"
