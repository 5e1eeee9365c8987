#!/usr/bin/env bash
# How MerkleKV, Redis and memcached scale with the number of keys, in one run:
#  1. RSS growth per key after writing 1,000,000 keys of 13 bytes with 32-byte values
#     (fresh server each; RSS from /proc/PID/status before and after the prefill);
#  2. SET-only throughput (pipeline 16, 50 connections) over 10,000 and 1,000,000 keys.
#     With --reps N (default 1) each throughput run is done N times, alternating the
#     server order, and the medians are printed.
# Needs redis-server and memcached on PATH; builds the release binaries.
#
# usage: loadtest/scaling.sh [--reps N] [--duration SECS]
set -euo pipefail
duration=8 reps=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
source "$(dirname "$0")/common.sh"
build_release
lt="$target/release/loadtest"
out="$(mktemp -d)"
pid=""
trap '[[ -n "$pid" ]] && kill $pid 2>/dev/null; rm -rf "$out"' EXIT
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start() { # server port
  case "$1" in
    merklekv) MERKLE_KV_NETWORK_BIND_PORT=$2 MERKLE_KV_MQTT_ENABLED=false MERKLE_KV_ANTI_ENTROPY_ENABLED=false \
                MERKLE_KV_STORAGE_MEMORY_LIMIT_MB=0 "$target/release/merkle-kv" 2>/dev/null & ;;
    redis) redis-server --port "$2" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & ;;
    memcached) memcached -t 2 -p "$2" -l 127.0.0.1 -U 0 -m 4096 -u "$(id -un)" & ;;
  esac
  pid=$!
  wait_port "$2" || { echo "scaling.sh: $1 did not start" >&2; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
declare -A proto=([merklekv]=native [redis]=resp [memcached]=memcache)

echo "| server | RSS before (KiB) | RSS after 1M keys (KiB) | bytes per key |"
echo "|---|---:|---:|---:|"
for s in merklekv redis memcached; do
  port=$(free_port); start $s "$port"; sleep 0.3
  before=$(rss_kb $pid)
  "$lt" --addr "127.0.0.1:$port" --protocol "${proto[$s]}" --keys 1000000 --key-width 9 --value-size 32 \
    --prefill --requests 1 --ratio 0:1 --connections 8 --pipeline 64 --quiet >/dev/null
  sleep 0.5
  after=$(rss_kb $pid)
  echo "| $s | $before | $after | $(( (after - before) * 1024 / 1000000 )) |"
  stop
done
servers=(merklekv redis memcached)
for keys in 10000 1000000; do
  for rep in $(seq "$reps"); do
    # Alternate the order so drift during the reps hits every server alike.
    order=("${servers[@]}")
    (( rep % 2 == 0 )) && order=($(printf '%s\n' "${servers[@]}" | tac))
    for s in "${order[@]}"; do
      port=$(free_port); start $s "$port"
      "$lt" --addr "127.0.0.1:$port" --protocol "${proto[$s]}" --keys $keys --key-width 9 --value-size 32 \
        --prefill --ratio 1:0 --connections 50 --pipeline 16 --duration "$duration" --quiet \
        --json "$out/$s-$keys-$rep.json" >/dev/null || true
      stop
    done
  done
done
echo
python3 - "$out" "$reps" <<'PY'
import json, sys, os, statistics
d, reps = sys.argv[1], int(sys.argv[2])
print(f"SET throughput: medians over {reps} run(s); errors summed over the runs.")
print()
print("| server | keys | SET ops/s | p99 µs | errors |")
print("|---|---:|---:|---:|---:|")
for s in ("merklekv", "redis", "memcached"):
    for keys in (10000, 1000000):
        runs = [json.load(open(os.path.join(d, f"{s}-{keys}-{r}.json"))) for r in range(1, reps + 1)]
        med = lambda k: statistics.median(x[k] for x in runs)
        print(f"| {s} | {keys} | {med('ops_per_sec'):.0f} | {med('p99_us'):.0f} | {sum(x['errors'] for x in runs)} |")
PY
