#!/usr/bin/env bash
# Persistence cost, same run: MerkleKV in memory and with fsync = no / everysec /
# always, against Redis with appendonly at appendfsync everysec and always. For each
# workload (SET only, and 1:10 SET:GET) and pipeline (1, 16), REPS runs in alternating
# server order; prints medians of ops/s, p99 and ops per server CPU-second (utime +
# stime of the server process from /proc over the run). Installs nothing: needs
# redis-server on PATH; builds target/release/{merkle-kv,loadtest}. Data goes to a
# temporary directory on the filesystem of $TMPDIR (default /tmp), removed at the end.
#
# usage: loadtest/persist.sh [--reps N] [--duration SECS] [--results DIR]
set -euo pipefail

reps=3
duration=5
results=loadtest-results/persist
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

source "$(dirname "$0")/common.sh"
cd "$root"
for tool in redis-server python3; do
  command -v "$tool" >/dev/null || { echo "persist.sh: $tool not found (apt-get install -y redis-server)" >&2; exit 2; }
done
build_release
loadtest="$target/release/loadtest"
rm -rf "$results"
mkdir -p "$results"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

declare -A port proto pid
start_mkv() { # name, fsync or "memory"
  local name=$1 mode=$2 p
  p=$(free_port)
  cat >"$tmp/$name.toml" <<TOML
node_id = "$name"
[network]
bind_address = "127.0.0.1"
bind_port = $p
[mqtt]
enabled = false
[anti_entropy]
enabled = false
[storage]
persistence_enabled = $([[ $mode == memory ]] && echo false || echo true)
data_dir = "$tmp/$name"
fsync = "$([[ $mode == memory ]] && echo everysec || echo "$mode")"
TOML
  "$target/release/merkle-kv" --config "$tmp/$name.toml" >"$tmp/$name.log" 2>&1 &
  pid[$name]=$!; pids+=($!); port[$name]=$p; proto[$name]=native
}
start_redis() { # name, appendfsync
  local name=$1 p
  p=$(free_port)
  mkdir -p "$tmp/$name"
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync "$2" \
    --dir "$tmp/$name" >"$tmp/$name.log" 2>&1 &
  pid[$name]=$!; pids+=($!); port[$name]=$p; proto[$name]=resp
}
start_mkv mkv-memory memory
start_mkv mkv-no no
start_mkv mkv-everysec everysec
start_mkv mkv-always always
start_redis redis-everysec everysec
start_redis redis-always always
servers=(mkv-memory mkv-no mkv-everysec mkv-always redis-everysec redis-always)
for s in "${servers[@]}"; do
  wait_port "${port[$s]}" || { echo "persist.sh: $s is not listening after 10 s" >&2; exit 1; }
done

# Server CPU seconds so far: utime + stime of the process (every thread).
cpu() { awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

for s in "${servers[@]}"; do # the keys exist before any timed run
  "$loadtest" --addr "127.0.0.1:${port[$s]}" --protocol "${proto[$s]}" --connections 50 \
    --keys 100000 --value-size 32 --prefill --duration 0.1 --quiet >/dev/null
done
status=0
for workload in set 1:10; do
  ratio=$([[ $workload == set ]] && echo 1:0 || echo 1:10)
  for pipeline in 1 16; do
    for rep in $(seq "$reps"); do
      order=("${servers[@]}")
      (( rep % 2 == 0 )) && order=($(printf '%s\n' "${servers[@]}" | tac))
      for s in "${order[@]}"; do
        out="$results/$s-${workload/:/_}-p$pipeline-r$rep.json"
        echo "== $s, $workload, pipeline $pipeline, rep $rep/$reps, $duration s" >&2
        before=$(cpu "${pid[$s]}")
        "$loadtest" --addr "127.0.0.1:${port[$s]}" --protocol "${proto[$s]}" \
          --connections 50 --pipeline "$pipeline" --ratio "$ratio" --keys 100000 \
          --value-size 32 --duration "$duration" --quiet --json "$out" >&2 || status=1
        after=$(cpu "${pid[$s]}")
        python3 - "$out" "$before" "$after" <<'PY'
import json, sys
path, before, after = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
r = json.load(open(path))
r["server_cpu_secs"] = after - before
json.dump(r, open(path, "w"))
PY
      done
    done
  done
done
(cd "$tmp" && du -s --block-size=1 mkv-no mkv-everysec mkv-always redis-everysec redis-always) >"$results/disk-bytes.txt"

python3 - "$results" "$reps" <<'PY'
import json, sys, os, statistics
d, reps = sys.argv[1], int(sys.argv[2])
servers = ["mkv-memory", "mkv-no", "mkv-everysec", "mkv-always", "redis-everysec", "redis-always"]
def load(s, w, p):
    runs = [json.load(open(os.path.join(d, f"{s}-{w}-p{p}-r{r}.json"))) for r in range(1, reps + 1)]
    med = lambda f: statistics.median(f(x) for x in runs)
    return {"ops": med(lambda x: x["ops_per_sec"]), "p99": med(lambda x: x["p99_us"]),
            "per_cpu": med(lambda x: x["ops"] / max(x["server_cpu_secs"], 1e-9)),
            "errors": sum(x["errors"] for x in runs)}
print(f"Medians over {reps} runs; ops per CPU-s = operations / server CPU seconds (/proc).")
print()
print("| workload | pipeline | server | ops/s | p99 µs | ops per server CPU-s | errors |")
print("|---|---:|---|---:|---:|---:|---:|")
for w in ("set", "1_10"):
    for p in (1, 16):
        for s in servers:
            r = load(s, w, p)
            print(f"| {w.replace('_', ':')} | {p} | {s} | {r['ops']:.0f} | {r['p99']:.0f} | {r['per_cpu']:.0f} | {r['errors']} |")
print()
print("| workload | pipeline | everysec / memory | everysec / Redis-everysec | always / Redis-always | no / memory |")
print("|---|---:|---:|---:|---:|---:|")
for w in ("set", "1_10"):
    for p in (1, 16):
        g = {s: load(s, w, p)["ops"] for s in servers}
        print(f"| {w.replace('_', ':')} | {p} | {g['mkv-everysec']/g['mkv-memory']:.2f}x | "
              f"{g['mkv-everysec']/g['redis-everysec']:.2f}x | {g['mkv-always']/g['redis-always']:.2f}x | "
              f"{g['mkv-no']/g['mkv-memory']:.2f}x |")
PY
cat "$results/disk-bytes.txt"
echo "JSON results in $results/" >&2
exit $status
