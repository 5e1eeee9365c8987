#!/usr/bin/env python3
"""Replication lag of single writes: how long after node A acknowledges a SET the value
is readable on node B, for writes a fixed time apart (0 = back to back).

Starts, per broker, an MQTT broker (the embedded one as `merkle-kv broker`, or
Mosquitto with the settings docs/DEPLOYMENT.md asks for) and two fresh nodes
replicating through it on free loopback ports (anti-entropy off, so only replication
delivers). A writer thread SETs keys on A at the given spacing; the main thread polls B
with MGET for every key A has acknowledged and B does not show yet (every 100 us while
one is missing). Lag of a key = first seen on B - acknowledged by A. Prints p50, p99
and max per broker and spacing, as a Markdown table.

usage: loadtest/lag.py [--bin PATH] [--broker embedded,mosquitto]
                       [--spacing-ms 0,10,50] [--writes 300]
Python 3 standard library only. Without --bin: target/release/merkle-kv, else
target/debug/merkle-kv (build it first).
"""

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP_WRITES = 10  # before each measured run, not counted: first connections, caches
POLL_S = 0.0001  # pause between polls of B while a key is missing
MGET_KEYS_MAX = 64  # keys asked per poll
SETTLE_S = 20  # how long a node may take to start, connect and see its peer
LAG_MAX_S = 10  # a key not on B after this long fails the run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what):
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lag.py: {what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"lag.py: {what} is not listening on port {port}")


class Client:
    """A blocking native-protocol client: one command line, one reply."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(10)
        self.file = self.sock.makefile("rb")

    def line(self):
        raw = self.file.readline()
        if not raw.endswith(b"\r\n"):
            raise RuntimeError(f"reply line without CRLF: {raw!r}")
        return raw[:-2].decode()

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        first = self.line()
        head = first.split(" ")
        n = int(head[-1]) if head[0] in ("INFO", "STATS", "VALUES") else 0
        return [first] + [self.line() for _ in range(n)]

    def field(self, command, name):
        for line in self.cmd(command)[1:]:
            key, _, value = line.partition(":")
            if key == name:
                return value
        raise RuntimeError(f"{command} has no {name}")

    def close(self):
        self.sock.close()


class Cluster:
    """A broker and two nodes; every process is stopped by close()."""

    def __init__(self, binary, broker, tmp):
        self.procs = []
        self.tmp = tmp
        mqtt = free_port()
        self.start_broker(binary, broker, mqtt)
        prefix = f"lag-{os.getpid()}-{broker}"
        self.ports = [self.start_node(binary, name, mqtt, prefix) for name in ("a", "b")]
        deadline = time.monotonic() + SETTLE_S
        for port in self.ports:
            c = Client(port)
            while not (
                c.field("INFO", "replication") == "connected"
                and int(c.field("INFO", "peers_online")) >= 1
            ):
                if time.monotonic() > deadline:
                    sys.exit(f"lag.py: the node on {port} did not connect and see its peer")
                time.sleep(0.05)
            c.close()

    def spawn(self, args, log_name, what, port):
        log = open(os.path.join(self.tmp, log_name), "wb")
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(p)
        wait_port(port, p, what)

    def start_broker(self, binary, broker, port):
        if broker == "embedded":
            args = [binary, "broker", "--listen", f"127.0.0.1:{port}"]
        else:
            mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            if not os.path.exists(mosquitto):
                sys.exit("lag.py: mosquitto not found (apt-get install -y mosquitto)")
            conf = os.path.join(self.tmp, f"mosquitto-{port}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\nmax_inflight_messages 0\n"
                )
            args = [mosquitto, "-c", conf]
        self.spawn(args, f"broker-{port}.log", f"the {broker} broker", port)

    def start_node(self, binary, name, mqtt, prefix):
        port = free_port()
        config = os.path.join(self.tmp, f"{name}-{port}.toml")
        with open(config, "w") as f:
            f.write(
                f'node_id = "{name}-{port}"\n'
                'network.bind_address = "127.0.0.1"\n'
                f"network.bind_port = {port}\n"
                f'mqtt.broker_address = "tcp://127.0.0.1:{mqtt}"\n'
                f'mqtt.topic_prefix = "{prefix}"\n'
                "storage.pin_threads = false\n"
                "anti_entropy.enabled = false\n"
            )
        self.spawn([binary, "--config", config], f"{name}-{port}.log", f"node {name}", port)
        return port

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure(ports, run, spacing_s, writes):
    """Lags in seconds of `writes` keys SET on ports[0] `spacing_s` apart, read on ports[1]."""
    keys = [f"lag:{run}:{i}" for i in range(writes)]
    acked = [None] * writes  # monotonic time A acknowledged key i
    errors = []
    ready = threading.Condition()
    done = [0]  # keys acknowledged so far

    def writer():
        try:
            a = Client(ports[0])
            start = time.monotonic()
            for i, key in enumerate(keys):
                pause = start + i * spacing_s - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                reply = a.cmd(f"SET {key} {i}")[0]
                t = time.monotonic()
                if reply != "OK":
                    raise RuntimeError(f"SET {key}: {reply}")
                with ready:
                    acked[i] = t
                    done[0] = i + 1
                    ready.notify()
            a.close()
        except Exception as e:  # reported by the main thread
            errors.append(e)
            with ready:
                done[0] = -1
                ready.notify()

    thread = threading.Thread(target=writer)
    thread.start()
    b = Client(ports[1])
    seen = [None] * writes
    next_unseen = 0
    while next_unseen < writes:
        with ready:
            while done[0] <= next_unseen and done[0] >= 0:
                ready.wait()
            if done[0] < 0:
                break
            upto = min(done[0], next_unseen + MGET_KEYS_MAX)
        pending = [i for i in range(next_unseen, upto) if seen[i] is None]
        values = b.cmd("MGET " + " ".join(keys[i] for i in pending))[1:]
        now = time.monotonic()
        for i, v in zip(pending, values):
            if v == str(i):
                seen[i] = now
        while next_unseen < writes and seen[next_unseen] is not None:
            next_unseen += 1
        if next_unseen < upto:
            if now - acked[next_unseen] > LAG_MAX_S:
                sys.exit(f"lag.py: {keys[next_unseen]} not on B after {LAG_MAX_S} s")
            time.sleep(POLL_S)
    thread.join()
    b.close()
    if errors:
        sys.exit(f"lag.py: writer failed: {errors[0]}")
    return [s - a for s, a in zip(seen, acked)]


def percentile(sorted_values, p):
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", help="merkle-kv binary")
    ap.add_argument("--broker", default="embedded,mosquitto")
    ap.add_argument("--spacing-ms", default="0,10,50")
    ap.add_argument("--writes", type=int, default=300, help="measured writes per spacing")
    args = ap.parse_args()
    binary = args.bin
    if binary is None:
        candidates = [os.path.join(ROOT, "target", p, "merkle-kv") for p in ("release", "debug")]
        binary = next((c for c in candidates if os.path.exists(c)), None)
        if binary is None:
            sys.exit("lag.py: no target/release or target/debug merkle-kv: cargo build first")
    brokers = args.broker.split(",")
    if any(b not in ("embedded", "mosquitto") for b in brokers):
        sys.exit("lag.py: --broker takes embedded and/or mosquitto")
    spacings = [float(s) for s in args.spacing_ms.split(",")]
    print(f"binary: {binary}, {args.writes} writes per spacing", flush=True)
    print("| broker | spacing ms | writes | lag p50 ms | lag p99 ms | lag max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="merkle-kv-lag-") as tmp:
        for broker in brokers:
            cluster = Cluster(binary, broker, tmp)
            try:
                for run, spacing in enumerate(spacings):
                    measure(cluster.ports, f"warm{run}", spacing / 1000, WARMUP_WRITES)
                    lags = sorted(measure(cluster.ports, run, spacing / 1000, args.writes))
                    ms = [f"{percentile(lags, p) * 1000:.2f}" for p in (50, 99, 100)]
                    print(f"| {broker} | {spacing:g} | {len(lags)} | " + " | ".join(ms) + " |",
                          flush=True)
            finally:
                cluster.close()


if __name__ == "__main__":
    main()
