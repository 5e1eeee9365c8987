#!/usr/bin/env bash
# Anti-entropy benchmark: two MerkleKV nodes holding the same 1,000,000 keys (made
# equal through replication, as in real life, so versions match), then d keys changed
# on node B with replication cut (the broker is stopped), for d = 0, 1, 100, 10,000.
# Node A runs `SYNC B`; the table gives wall time, round trips and bytes on the wire
# both ways, against the minimum (the d changed entries' own bytes: 13-byte key +
# 32-byte value) and against shipping everything.
#
# usage: loadtest/antientropy.sh [--keys N] [--results DIR]
set -euo pipefail

keys=1000000
results=loadtest-results/antientropy
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keys) keys="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

source "$(dirname "$0")/common.sh"
cd "$root"
build_release
bin="$target/release"
mkdir -p "$results"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

mqtt_port=$(free_port)
"$bin/merkle-kv" broker --listen "127.0.0.1:$mqtt_port" 2>"$tmp/broker.log" &
broker_pid=$!
pids+=($broker_pid)
wait_port "$mqtt_port" || { echo "broker did not start" >&2; exit 1; }

start_node() { # NAME PORT
  cat >"$tmp/$1.toml" <<TOML
node_id = "$1"
network.bind_address = "127.0.0.1"
network.bind_port = $2
mqtt.broker_address = "tcp://127.0.0.1:$mqtt_port"
mqtt.topic_prefix = "ae-bench-$$"
mqtt.backpressure_max_ms = 600000
storage.pin_threads = false
storage.memory_limit_mb = 4096
anti_entropy.enabled = false
TOML
  "$bin/merkle-kv" --config "$tmp/$1.toml" 2>"$tmp/$1.log" &
  pids+=($!)
  wait_port "$2" || { echo "node $1 did not start" >&2; cat "$tmp/$1.log" >&2; exit 1; }
}
cmd() { # PORT COMMAND: one reply line
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf '%s\r\nQUIT\r\n' "$2" >&3
  head -n 1 <&3 | tr -d '\r'
  exec 3<&-
}
a=$(free_port); start_node a "$a"
b=$(free_port); start_node b "$b"
sleep 1

echo "== loading $keys keys on A (32-byte values), replicated to B"
"$bin/loadtest" --addr "127.0.0.1:$a" --keys "$keys" --key-width 9 --value-size 32 \
  --prefill --ratio 1:0 --requests 1 --quiet --connections 10 --pipeline 64 >/dev/null
for _ in $(seq 600); do
  [[ "$(cmd "$a" HASH)" == "$(cmd "$b" HASH)" ]] && break
  sleep 0.1
done
[[ "$(cmd "$a" HASH)" == "$(cmd "$b" HASH)" ]] || { echo "replication did not make A and B equal" >&2; exit 1; }
echo "A and B equal: $(cmd "$a" DBSIZE) keys each"

echo "== replication cut (broker stopped); d keys changed on B; A runs SYNC B"
kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true
echo "| d | ms | round trips | bytes A→B | bytes B→A | total | minimum | total / minimum | everything |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
round=0
for d in 0 1 100 10000; do
  round=$((round + 1))
  if (( d > 0 )); then
    python3 - "$d" "$round" "$keys" >"$tmp/changes" <<'PY'
import sys
d, r, keys = map(int, sys.argv[1:])
for j in range(d):
    print(f"SET key:{(j * 7919 + r) % keys:09d} {r:032d}\r")
PY
    exec 3<>"/dev/tcp/127.0.0.1/$b"
    { cat "$tmp/changes"; printf 'QUIT\r\n'; } >&3
    cat <&3 >/dev/null
    exec 3<&-
  fi
  line="$(cmd "$a" "SYNC 127.0.0.1:$b")"
  echo "$line" >>"$results/sync-lines.txt"
  [[ "$line" == OK* ]] || { echo "SYNC failed: $line" >&2; exit 1; }
  [[ "$(cmd "$a" HASH)" == "$(cmd "$b" HASH)" ]] || { echo "roots differ after SYNC (d=$d)" >&2; exit 1; }
  python3 - "$line" "$d" "$keys" <<'PY'
import sys
f = dict(kv.split("=") for kv in sys.argv[1].split()[1:])
d, keys = int(sys.argv[2]), int(sys.argv[3])
sent, recv = int(f["bytes_sent"]), int(f["bytes_received"])
minimum = d * 45
ratio = f"{(sent + recv) / minimum:.1f}x" if minimum else "-"
print(f"| {d} | {f['ms']} | {f['round_trips']} | {sent:,} | {recv:,} | {sent + recv:,} | {minimum:,} | {ratio} | {keys * 45:,} |")
assert int(f["keys_repaired"]) == d, f"repaired {f['keys_repaired']} of {d}"
PY
done
