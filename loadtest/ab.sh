#!/usr/bin/env bash
# A/B-compare MerkleKV node settings under the same load, alternating variants so
# drift on a shared machine hits both alike. Each variant is a space-separated list
# of environment overrides for the node (see docs/CONFIGURATION.md); MKV_BIN=PATH in a
# variant runs another merkle-kv binary (to compare builds: before/after a change).
#
# usage: loadtest/ab.sh [--reps N] [--duration SECS] [--pipelines "1 16"] VARIANT...
# e.g.:  loadtest/ab.sh 'MERKLE_KV_STORAGE_SHARDS=1' 'MERKLE_KV_STORAGE_SHARDS=2'
#        loadtest/ab.sh 'MERKLE_KV_STORAGE_PIN_THREADS=true' 'MERKLE_KV_STORAGE_PIN_THREADS=false'
#        loadtest/ab.sh 'MKV_BIN=/tmp/before/merkle-kv' 'MKV_BIN=target/release/merkle-kv'
set -euo pipefail
reps=3 duration=8 pipelines="1 16"
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --pipelines) pipelines="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[[ $# -ge 1 ]] || { sed -n '2,9p' "$0"; exit 2; }
source "$(dirname "$0")/common.sh"
build_release
port=$(free_port)
out="$(mktemp -d)"
trap 'kill $node 2>/dev/null || true; rm -rf "$out"' EXIT
echo "| variant | pipeline | run | ops/s | p50 µs | p99 µs | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for rep in $(seq "$reps"); do
  for variant in "$@"; do
    bin=$(sed -n 's/.*MKV_BIN=\([^ ]*\).*/\1/p' <<<"$variant")
    env $variant MERKLE_KV_NETWORK_BIND_PORT="$port" MERKLE_KV_MQTT_ENABLED=false \
      MERKLE_KV_ANTI_ENTROPY_ENABLED=false "${bin:-$target/release/merkle-kv}" 2>/dev/null &
    node=$!
    wait_port "$port" || { echo "ab.sh: node did not start ($variant)" >&2; exit 1; }
    for p in $pipelines; do
      "$target/release/loadtest" --addr "127.0.0.1:$port" --connections 50 --pipeline "$p" \
        --duration "$duration" --ratio 1:10 --keys 100000 --value-size 32 --prefill --quiet \
        --json "$out/r.json" >/dev/null
      python3 -c "import json,sys; d=json.load(open('$out/r.json')); print(f\"| {sys.argv[1]} | $p | $rep | {d['ops_per_sec']:.0f} | {d['p50_us']:.0f} | {d['p99_us']:.0f} | {d['errors']} |\")" "$variant"
    done
    kill $node; wait $node 2>/dev/null || true
  done
done
