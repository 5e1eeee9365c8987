#!/usr/bin/env bash
# How MerkleKV, Redis and memcached scale with the number of keys, in one run:
#  1. RSS growth per key after writing 1,000,000 keys of 13 bytes with 32-byte values
#     (fresh server each; RSS from /proc/PID/status before and after the prefill);
#  2. SET-only throughput (pipeline 16, 50 connections) over 10,000 and 1,000,000 keys.
# Needs redis-server and memcached on PATH; builds the release binaries if missing.
#
# usage: loadtest/scaling.sh [--duration SECS]
set -euo pipefail
duration=8
[[ "${1:-}" == "--duration" ]] && duration="$2"
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
[[ -x "$target/release/merkle-kv" && -x "$target/release/loadtest" ]] || cargo build --release -p merkle-kv -p loadtest
lt="$target/release/loadtest"
out="$(mktemp -d)"
pid=""
trap '[[ -n "$pid" ]] && kill $pid 2>/dev/null; rm -rf "$out"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start() { # server port
  case "$1" in
    merklekv) MERKLE_KV_NETWORK_BIND_PORT=$2 MERKLE_KV_MQTT_ENABLED=false MERKLE_KV_ANTI_ENTROPY_ENABLED=false \
                MERKLE_KV_STORAGE_MEMORY_LIMIT_MB=0 "$target/release/merkle-kv" 2>/dev/null & ;;
    redis) redis-server --port "$2" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & ;;
    memcached) memcached -t 2 -p "$2" -l 127.0.0.1 -U 0 -m 4096 -u "$(id -un)" & ;;
  esac
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return; sleep 0.1; done
  echo "scaling.sh: $1 did not start" >&2; exit 1
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
echo
echo "| server | keys | SET ops/s | p99 µs | errors |"
echo "|---|---:|---:|---:|---:|"
for s in merklekv redis memcached; do
  for keys in 10000 1000000; do
    port=$(free_port); start $s "$port"
    "$lt" --addr "127.0.0.1:$port" --protocol "${proto[$s]}" --keys $keys --key-width 9 --value-size 32 \
      --prefill --ratio 1:0 --connections 50 --pipeline 16 --duration "$duration" --quiet --json "$out/r.json" >/dev/null
    python3 -c "import json; d=json.load(open('$out/r.json')); print(f\"| $s | $keys | {d['ops_per_sec']:.0f} | {d['p99_us']:.0f} | {d['errors']} |\")"
    stop
  done
done
