#!/usr/bin/env bash
# Recovery time, disk bytes per key and snapshot cost of a persisting node, with KEYS
# keys of 13 bytes and 32-byte values (docs/PERSISTENCE.md, BENCHMARKS.md):
#   1. load the keys; kill -9; restart: recovery from the log alone;
#   2. stop gracefully (a snapshot of every shard); restart: recovery from snapshots;
#   3. overwrite every key; kill -9; restart: recovery from snapshot + a log of KEYS records;
#   4. SET load for SECS with snapshot_log_mb = 16 (a snapshot about every 16 MiB of log
#      per shard, so one runs most of the time) against the same with no snapshot: the
#      throughput a running snapshot costs, and how long one takes.
# Prints the node's own log lines (recovered from disk … ms=…, snapshot written … ms=…)
# and du of the data directory. Builds target/release/{merkle-kv,loadtest}.
#
# usage: loadtest/recovery.sh [--keys N] [--duration SECS]
set -euo pipefail

keys=1000000
duration=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keys) keys="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

source "$(dirname "$0")/common.sh"
cd "$root"
build_release
loadtest="$target/release/loadtest"
tmp="$(mktemp -d)"
node=
cleanup() {
  [[ -n "$node" ]] && kill -9 "$node" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
port=$(free_port)
keyargs=(--keys "$keys" --key-prefix key: --key-width 9 --value-size 32)

start() { # snapshot_log_mb; waits until data commands are served (recovery done)
  cat >"$tmp/node.toml" <<TOML
node_id = "recovery"
[network]
bind_address = "127.0.0.1"
bind_port = $port
[mqtt]
enabled = false
[anti_entropy]
enabled = false
[storage]
persistence_enabled = true
data_dir = "$tmp/data"
snapshot_log_mb = $1
TOML
  RUST_LOG=info "$target/release/merkle-kv" --config "$tmp/node.toml" >>"$tmp/node.log" 2>&1 &
  node=$!
  wait_port "$port" || { echo "recovery.sh: the node did not start" >&2; exit 1; }
  for _ in $(seq 600); do
    reply=$(exec 3<>"/dev/tcp/127.0.0.1/$port"; printf 'DBSIZE\r\n' >&3; head -n1 <&3 | tr -d '\r')
    [[ "$reply" =~ ^[0-9]+$ ]] && { echo "  DBSIZE $reply" >&2; return 0; }
    sleep 0.1
  done
  echo "recovery.sh: still LOADING after 60 s" >&2; exit 1
}
kill9() { kill -9 "$node"; wait "$node" 2>/dev/null || true; node=; }
stop() { kill -TERM "$node"; wait "$node" 2>/dev/null || true; node=; }
load() { "$loadtest" --addr "127.0.0.1:$port" --connections 50 "${keyargs[@]}" "$@" --quiet; }
recovered() { grep 'recovered from disk' "$tmp/node.log" | tail -n1 | sed 's/^.*recovered from disk/recovered from disk/'; }
disk() { echo "  data dir: $(du -s --block-size=1 "$tmp/data" | cut -f1) bytes for $keys keys" \
  "($(du -s --block-size=1 "$tmp/data" | awk -v k="$keys" '{ printf "%.1f", $1 / k }') B/key)"; }

echo "== 1. $keys keys loaded, kill -9, recovery from the log alone"
start 100000
load --prefill --duration 0.1 >/dev/null
disk
kill9
start 100000
echo "  $(recovered)"
echo "== 2. graceful stop (snapshots), recovery from snapshots"
stop
grep 'snapshot written' "$tmp/node.log" | tail -n2 | sed 's/^.*snapshot written/  snapshot written/'
disk
start 100000
echo "  $(recovered)"
echo "== 3. every key overwritten, kill -9, recovery from snapshot + log"
load --prefill --duration 0.1 >/dev/null
disk
kill9
start 100000
echo "  $(recovered)"
stop

echo "== 4. SET load, pipeline 16, $duration s: no snapshot vs snapshot_log_mb = 16"
for mb in 100000 16 100000 16; do
  start "$mb"
  before=$(grep -c 'snapshot written' "$tmp/node.log" || true)
  ops=$(load --pipeline 16 --ratio 1:0 --duration "$duration" --json "$tmp/r.json" >/dev/null;
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.0f ops/s, p99 %.0f us" % (r["ops_per_sec"], r["p99_us"]))' "$tmp/r.json")
  after=$(grep -c 'snapshot written' "$tmp/node.log" || true)
  echo "  snapshot_log_mb = $mb: $ops, $((after - before)) snapshots written during the run"
  kill9
done
grep 'snapshot written' "$tmp/node.log" | tail -n4 | sed 's/^.*snapshot written/  snapshot written/'
