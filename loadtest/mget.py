#!/usr/bin/env python3
"""End-to-end time of one huge MGET over loopback (hardening issue, item 6).

Starts `merkle-kv` (release build by default) standalone on a free port, stores KEYS keys
of VALUE_BYTES bytes with MSET, then times RUNS MGETs of all of them: from the first byte
sent to the last reply byte read. Prints each run, the median, and the per-key cost.

    cargo build --release && python3 loadtest/mget.py [--keys 200000] [--runs 7]
"""
import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(sock, n, buf=b""):
    """Read until `n` CRLF-terminated lines have arrived; return them and the rest."""
    lines = []
    while len(lines) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
        parts = buf.split(b"\r\n")
        buf = parts.pop()
        lines.extend(parts)
    return lines, buf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/merkle-kv")
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--value-bytes", type=int, default=32)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()

    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    conf.write(
        f'node_id = "mget-bench"\n[network]\nbind_address = "127.0.0.1"\nbind_port = {port}\n'
        f"max_line_bytes = {64 << 20}\n[mqtt]\nenabled = false\n"
        "[anti_entropy]\nenabled = false\n"
    )
    conf.close()
    node = subprocess.Popen([a.bin, "--config", conf.name], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keys = [f"key:{i:08}" for i in range(a.keys)]
        value = "v" * a.value_bytes
        for start in range(0, a.keys, 10_000):
            pairs = " ".join(f"{k} {value}" for k in keys[start : start + 10_000])
            sock.sendall(f"MSET {pairs}\r\n".encode())
            lines, _ = read_lines(sock, 1)
            assert lines == [b"OK"], lines
        request = ("MGET " + " ".join(keys) + "\r\n").encode()
        expected = f"VALUES {a.keys}\r\n".encode() + (value + "\r\n").encode() * a.keys
        reply = bytearray(len(expected))
        view = memoryview(reply)
        times = []
        for _ in range(a.runs):
            # Read into one preallocated buffer and check it once, after the clock stops:
            # the client's own cost stays out of the figure.
            got = 0
            t0 = time.perf_counter()
            sock.sendall(request)
            while got < len(expected):
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise EOFError("connection closed")
                got += n
            times.append(time.perf_counter() - t0)
            assert reply == expected, bytes(reply[:40])
        median = statistics.median(times)
        print(f"MGET of {a.keys} keys, {a.value_bytes} B values, request {len(request)} bytes")
        print("runs (ms): " + " ".join(f"{t * 1000:.1f}" for t in times))
        print(f"median {median * 1000:.1f} ms, {median / a.keys * 1e9:.0f} ns per key end to end")
    finally:
        node.terminate()
        node.wait()
        os.unlink(conf.name)


if __name__ == "__main__":
    main()
