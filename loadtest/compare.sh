#!/usr/bin/env bash
# Runs the same workloads against memcached, Redis and MerkleKV nodes on
# loopback, REPS times in alternating server order, and prints a markdown table
# of medians (ops/s, p50, p99 and MerkleKV's ratios). Installs nothing: needs
# redis-server and memcached on PATH; builds target/release/{merkle-kv,loadtest}.
#
# usage: loadtest/compare.sh [--reps N] [--duration SECS] [--results DIR]
set -euo pipefail

reps=3
duration=10
results=loadtest-results
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

source "$(dirname "$0")/common.sh"
cd "$root"
for tool in redis-server memcached python3; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found (apt-get install -y redis-server memcached)" >&2; exit 2; }
done
build_release
loadtest="$target/release/loadtest"
mkdir -p "$results"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT


mc_port=$(free_port)
memcached -t 2 -p "$mc_port" -l 127.0.0.1 -U 0 -m 1024 -u "$(id -un)" &
pids+=($!)
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$tmp/redis.log" &
pids+=($!)
mkv_port=$(free_port)
cat >"$tmp/node.toml" <<TOML
node_id = "bench"

[network]
bind_address = "127.0.0.1"
bind_port = $mkv_port

[mqtt]
enabled = false

[anti_entropy]
enabled = false
TOML
"$target/release/merkle-kv" --config "$tmp/node.toml" >"$tmp/merkle-kv.log" 2>&1 &
pids+=($!)
# The same node with one shard: on a 2-core machine that also runs the load generator,
# leaving a core to the client is worth measuring (see BENCHMARKS.md).
mkv1_port=$(free_port)
MERKLE_KV_NETWORK_BIND_PORT=$mkv1_port MERKLE_KV_STORAGE_SHARDS=1 \
  "$target/release/merkle-kv" --config "$tmp/node.toml" >"$tmp/merkle-kv-1shard.log" 2>&1 &
pids+=($!)
for p in "$mc_port" "$redis_port" "$mkv_port" "$mkv1_port"; do
  wait_port "$p" || { echo "compare.sh: nothing listening on port $p after 10 s" >&2; exit 1; }
done

servers=(memcached redis merklekv merklekv-1shard)
declare -A port=([memcached]=$mc_port [redis]=$redis_port [merklekv]=$mkv_port [merklekv-1shard]=$mkv1_port)
declare -A proto=([memcached]=memcache [redis]=resp [merklekv]=native [merklekv-1shard]=native)
status=0
for pipeline in 1 16; do
  for rep in $(seq "$reps"); do
    # Alternate the order so drift during the reps hits every server alike.
    order=("${servers[@]}")
    (( rep % 2 == 0 )) && order=($(printf '%s\n' "${servers[@]}" | tac))
    for s in "${order[@]}"; do
      echo "== $s, pipeline $pipeline, rep $rep/$reps, $duration s" >&2
      "$loadtest" --addr "127.0.0.1:${port[$s]}" --protocol "${proto[$s]}" \
        --connections 50 --pipeline "$pipeline" --ratio 1:10 --keys 100000 --value-size 32 \
        --prefill --duration "$duration" --quiet --json "$results/$s-p$pipeline-r$rep.json" >&2 || status=1
    done
  done
done

python3 - "$results" "$reps" <<'PY'
import json, sys, os, statistics
d, reps = sys.argv[1], int(sys.argv[2])
def load(s, p):
    """Medians over the reps of this run, or None if a rep is missing."""
    runs = []
    for r in range(1, reps + 1):
        path = os.path.join(d, f"{s}-p{p}-r{r}.json")
        if not os.path.exists(path):
            return None
        runs.append(json.load(open(path)))
    med = lambda k: statistics.median(x[k] for x in runs)
    return {"ops_per_sec": med("ops_per_sec"), "p50_us": med("p50_us"), "p99_us": med("p99_us"),
            "errors": sum(x["errors"] for x in runs)}
print(f"Medians over {reps} runs; errors summed over the runs.")
print()
print("| pipeline | server | ops/s | p50 µs | p99 µs | errors |")
print("|---:|---|---:|---:|---:|---:|")
for p in (1, 16):
    for s in ("memcached", "redis", "merklekv", "merklekv-1shard"):
        r = load(s, p)
        if r:
            print(f"| {p} | {s} | {r['ops_per_sec']:.0f} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['errors']} |")
print()
print("| pipeline | node | ops/s vs Redis | ops/s vs memcached | p99 vs Redis |")
print("|---:|---|---:|---:|---:|")
for p in (1, 16):
    r, c = load("redis", p), load("memcached", p)
    for node in ("merklekv", "merklekv-1shard"):
        m = load(node, p)
        if m and r and c:
            print(f"| {p} | {node} | {m['ops_per_sec']/r['ops_per_sec']:.2f}x | {m['ops_per_sec']/c['ops_per_sec']:.2f}x | {m['p99_us']/r['p99_us']:.2f}x |")
PY
echo "JSON results in $results/" >&2
exit $status
