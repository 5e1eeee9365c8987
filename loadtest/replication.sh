#!/usr/bin/env bash
# Replication benchmark: two MerkleKV nodes on loopback replicating through one local
# MQTT broker (Mosquitto by default, or the embedded broker). Measures, in one run:
#   1. replicated write throughput, batched (the default batch_max_events) vs one
#      publish per write (batch_max_events = 1), as fast as the writer is acknowledged;
#   2. replication lag p50/p99/max (write acknowledged on A -> visible on B) at half
#      of the batched throughput, open loop;
#   3. the cost of replication on the write path: SET-only load on a node with
#      replication on vs off.
# Needs mosquitto (apt-get install -y mosquitto) unless --broker embedded.
#
# usage: loadtest/replication.sh [--duration SECS] [--broker mosquitto|embedded] [--results DIR]
set -euo pipefail

duration=10
broker=mosquitto
results=loadtest-results/replication
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --broker) broker="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
case "$broker" in
  mosquitto)
    mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    [[ -x "$mosquitto_bin" ]] || { echo "replication.sh: mosquitto not found (apt-get install -y mosquitto)" >&2; exit 2; }
    # The settings docs/DEPLOYMENT.md asks for: the defaults drop QoS 1 under load.
    cat >"$tmp/mosquitto.conf" <<CONF
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 0
CONF
    "$mosquitto_bin" -c "$tmp/mosquitto.conf" 2>"$tmp/broker.log" &
    ;;
  embedded) "$bin/merkle-kv" broker --listen "127.0.0.1:$mqtt_port" 2>"$tmp/broker.log" & ;;
  *) echo "--broker must be mosquitto or embedded" >&2; exit 2 ;;
esac
broker_pid=$!
pids+=($broker_pid)
wait_port "$mqtt_port" || { echo "broker did not start" >&2; cat "$tmp/broker.log" >&2; exit 1; }
echo "broker: $broker on port $mqtt_port"

node_pids=()
# start_node NAME PORT EXTRA_TOML: a node replicating through the broker.
start_node() {
  cat >"$tmp/$1.toml" <<TOML
node_id = "$1"
network.bind_address = "127.0.0.1"
network.bind_port = $2
mqtt.broker_address = "tcp://127.0.0.1:$mqtt_port"
mqtt.topic_prefix = "bench-$$-$run"
storage.pin_threads = false
anti_entropy.enabled = false
$3
TOML
  "$bin/merkle-kv" --config "$tmp/$1.toml" 2>"$tmp/$1.log" &
  node_pids+=($!)
  pids+=($!)
  wait_port "$2" || { echo "node $1 did not start" >&2; cat "$tmp/$1.log" >&2; exit 1; }
}
stop_nodes() {
  for pid in "${node_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  node_pids=()
}
run=0
# cluster NAME EXTRA_TOML [loadtest-cluster flags...]: fresh pair, one measurement.
cluster() {
  local name="$1" extra="$2"; shift 2
  run=$((run + 1))
  local a b
  a=$(free_port); start_node "a$run" "$a" "$extra"
  b=$(free_port); start_node "b$run" "$b" "$extra"
  # Both subscribed (each sees the other online) before the first write.
  for _ in $(seq 100); do
    [[ "$(info_field "$a" peers_online)" == 1 && "$(info_field "$b" peers_online)" == 1 ]] && break
    sleep 0.1
  done
  "$bin/loadtest-cluster" --write "127.0.0.1:$a" --read "127.0.0.1:$b" \
    --duration "$duration" --json "$results/$name.json" "$@" | sed "s/^/  [$name] /"
  local counters
  counters="$(repl_counters "$a")"
  echo "  [$name] writer: $counters"
  if grep -Eq 'repl_dropped_(overflow|offline):[1-9]' <<<"$counters"; then
    echo "replication.sh: the writer dropped changes: this run's numbers are not valid" >&2
    exit 1
  fi
  stop_nodes
}
# info_field PORT NAME: one INFO field of the node on PORT.
info_field() {
  exec 4<>"/dev/tcp/127.0.0.1/$1"
  printf 'INFO\r\nQUIT\r\n' >&4
  tr -d '\r' <&4 | sed -n "s/^$2://p"
  exec 4<&-
}
# The write node's replication counters (dropped must be 0 for a fair number).
repl_counters() {
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'STATS\r\nQUIT\r\n' >&3
  tr -d '\r' <&3 | grep -E '^repl_(published_payloads|published_events|dropped_overflow|dropped_offline)' | tr '\n' ' '
  exec 3<&-
}
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# Backpressure never gives up in these two runs, so nothing is dropped: the writer is
# slowed to what replication carries, and the replicated rate is the sustained one.
echo "== replicated throughput, batched (defaults) vs unbatched (batch_max_events = 1)"
hold="mqtt.backpressure_max_ms = 600000"
cluster batched "$hold" --connections 8 --pipeline 64
cluster unbatched "$hold
mqtt.batch_max_events = 1" --connections 8 --pipeline 64
half=$(python3 -c "print(int(float('$(field "$results/batched.json" replicated_per_sec)') / 2))")
echo "== lag at half the batched throughput ($half writes/s, open loop)"
cluster lag-half "" --connections 8 --pipeline 16 --rate "$half"

echo "== write-path cost: SET-only, replication on vs off (50 connections, pipeline 16)"
for mode in on off; do
  run=$((run + 1))
  p=$(free_port)
  if [[ $mode == on ]]; then start_node "w$run" "$p" ""; else start_node "w$run" "$p" "mqtt.enabled = false"; fi
  "$bin/loadtest" --addr "127.0.0.1:$p" --ratio 1:0 --pipeline 16 --connections 50 \
    --keys 100000 --duration "$duration" --quiet --json "$results/write-$mode.json" >/dev/null
  stop_nodes
done

python3 - "$results" <<'PY'
import json, sys, os
d = sys.argv[1]
j = lambda n: json.load(open(os.path.join(d, n + ".json")))
b, u, l = j("batched"), j("unbatched"), j("lag-half")
on, off = j("write-on"), j("write-off")
print()
print("| measurement | value |")
print("|---|---|")
print(f"| replicated writes/s, batched | {b['replicated_per_sec']:,.0f} (writer acked {b['writes_per_sec']:,.0f}/s, converged {b['convergence_ms']:.0f} ms after) |")
print(f"| replicated writes/s, batch size 1 | {u['replicated_per_sec']:,.0f} (writer acked {u['writes_per_sec']:,.0f}/s, converged {u['convergence_ms']:.0f} ms after) |")
print(f"| batched / unbatched | {b['replicated_per_sec'] / u['replicated_per_sec']:.1f}x |")
print(f"| lag at {l['writes_per_sec']:,.0f} writes/s: p50 / p99 / max | {l['lag_p50_us']} / {l['lag_p99_us']} / {l['lag_max_us']} us ({l['lag_samples']} samples) |")
print(f"| SET ops/s, replication on / off | {on['ops_per_sec']:,.0f} / {off['ops_per_sec']:,.0f} ({on['ops_per_sec'] / off['ops_per_sec']:.2f}x) |")
errors = sum(x["errors"] for x in (b, u, l, on, off))
print(f"| errors | {errors} |")
PY
