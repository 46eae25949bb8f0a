#!/usr/bin/env python3
"""Instructions per request of the gateway, counted by valgrind's callgrind: a figure that does
not move with the machine's load (the same binary and inputs give the same count), so two
builds can be compared on a busy machine where wall-clock benchmarks cannot.

  python3 loadtest/bench/instructions.py --bin-dir target/release [--requests 2000] [--stream]
                                        [--all-on]

Starts the mock backend and the gateway (memory store, one consumer, no limits; `--all-on`:
the benchmark's Redis row, every feature on, with a redis-server of its own and every request
a cache miss) from `--bin-dir`, the gateway under callgrind; sends `--warmup` requests, zeroes the counters
(`callgrind_control -z`), sends `--requests` requests one at a time on one keep-alive
connection, dumps the counters and prints the gateway's instructions per request (every
thread: the request path, the usage worker, the runtime). The mock, redis-server and the client
run outside callgrind and are not counted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "tg-instructions-bench-key"


def sha256(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()


def start(cmd: list[str], **kw) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        raise SystemExit(f"{cmd[0]} did not start: {line!r}")
    return p, line.removeprefix("listening on ")


def send(addr: str, n: int, stream: bool, key: str = KEY, seed: int | None = None) -> None:
    """`n` requests one after the other; with `seed`, each body carries its own seed (counting
    up from it), so an answer cache misses every time."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {
        "model": "gpt-4o",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Tell me about token buckets in one line."}],
    }
    if stream:
        body["stream"] = True
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for i in range(n):
        if seed is not None:
            body["seed"] = seed + i
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"request failed: {r.status}")


def total_instructions(out: Path) -> int:
    total = 0
    for f in out.parent.glob(out.name + "*"):
        for line in f.read_text().splitlines():
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                total += int(m.group(1))
                break
    return total


def all_on_config(d: Path, mock_addr: str):
    """The benchmark's Redis-row configuration (`bench.py`'s own), with a redis-server on a free
    port in `d` and a local OTLP sink; returns the config, the key and how to stop both."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench

    class Args:
        bin_dir, pin = "target/release", "none"

    b = bench.Bench(Args(), d)
    _, redis_url = b.redis()
    sink, otlp = b.otlp_sink()
    cfg = b.tollgate_config("all-on", f"http://{mock_addr}", redis_url, otlp)
    return cfg, bench.KEY, [b.procs.stop_all, sink.shutdown]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default="target/release")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--all-on", action="store_true",
                    help="the benchmark's Redis row (Redis store, TPM, leases, three routes, team budget, "
                         "exact cache missing every time; OTLP to a local sink)")
    ap.add_argument("--keep", metavar="FILE", help="keep the callgrind profile (for callgrind_annotate)")
    a = ap.parse_args()
    bins = Path(a.bin_dir)
    with tempfile.TemporaryDirectory(prefix="tg-instr") as d:
        d = Path(d)
        mock, mock_addr = start([str(bins / "tollgate-mock"), "--listen", "127.0.0.1:0"])
        extra: list = []
        key, seed = KEY, None
        try:
            cfg = d / "tollgate.toml"
            if a.all_on:
                cfg, key, extra = all_on_config(d, mock_addr)
                seed = time.time_ns() // 1000
            else:
                cfg.write_text(
                    f"""[server]
listen = "127.0.0.1:0"
[[consumers]]
id = "bench"
key_sha256 = ["{sha256(KEY)}"]
[[backends]]
name = "mock"
url = "http://{mock_addr}"
api = "openai"
models = ["gpt-4o"]
price = {{ input_per_1m = 2.5, output_per_1m = 10.0 }}
"""
                )
            out = d / "callgrind.out"
            gw, addr = start(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    "--dump-instr=no",
                    str(bins / "tollgate"),
                    "serve",
                    "--config",
                    str(cfg),
                ],
                env={**os.environ, "TOLLGATE_LOG": "warn"},
                stderr=subprocess.DEVNULL,
            )
            try:
                send(addr, a.warmup, a.stream, key, seed)
                time.sleep(1)
                subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True, capture_output=True)
                send(addr, a.requests, a.stream, key, None if seed is None else seed + a.warmup)
                # Let the usage worker account the last requests before the dump.
                time.sleep(2)
                for f in d.glob("callgrind.out*"):
                    f.unlink()
                subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True, capture_output=True)
                time.sleep(1)
                ir = total_instructions(out)
                if a.keep:
                    import shutil

                    dumped = sorted(d.glob("callgrind.out*"), key=lambda f: f.stat().st_size)
                    shutil.copy(dumped[-1], a.keep)
            finally:
                gw.send_signal(signal.SIGTERM)
                gw.wait(timeout=120)
        finally:
            mock.kill()
            for stop in extra:
                stop()
    print(json.dumps({"bin_dir": str(bins), "requests": a.requests, "stream": a.stream, "all_on": a.all_on,
                      "instructions": ir, "per_request": round(ir / a.requests)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
