"""The MCP scenario of loadtest/bench.sh (--mcp): the added latency of a `tools/call` through
tollgate, against the same upstream called directly.

Starts one upstream MCP server (the official SDK's MCPServer, tests/python/mcp_upstream.py) and
one tollgate (memory store) in front of it, opens one session each way, then sends `--calls`
sequential `tools/call echo` requests each way, interleaved (so both see the same machine
load), and prints p50/p90/p99 of each and of the difference as a markdown table.

Run with the tests' venv: target/pyenv/bin/python loadtest/bench/mcp.py --bin-dir target/release
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


class Session:
    """One MCP session over raw HTTP (no SDK on the measured path)."""

    def __init__(self, url: str, headers: dict):
        self.url = url
        self.http = httpx2.Client(headers={"accept": "application/json, text/event-stream", **headers})
        r = self.http.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"}}})
        r.raise_for_status()
        self.http.headers["mcp-session-id"] = r.headers["mcp-session-id"]
        self.http.headers["mcp-protocol-version"] = "2025-06-18"
        self.http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.n = 0

    def call(self, tool: str) -> float:
        self.n += 1
        body = {"jsonrpc": "2.0", "id": self.n, "method": "tools/call",
                "params": {"name": tool, "arguments": {"text": "x"}}}
        t = time.perf_counter()
        r = self.http.post(self.url, json=body)
        text = r.text
        took = time.perf_counter() - t
        if r.status_code != 200 or ":x" not in text:
            sys.exit(f"bad answer {r.status_code}: {text[:200]}")
        return took


def pct(xs: list, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default="target/release")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    a = ap.parse_args()
    up_port, gw_port = free_port(), free_port()
    procs = []
    try:
        up = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/python/mcp_upstream.py"),
                               "--name", "fast", "--port", str(up_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(up)
        wait_port(up_port, up, "upstream")
        tmp = tempfile.mkdtemp()
        cfg = os.path.join(tmp, "tollgate.toml")
        with open(cfg, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{gw_port}"
[[consumers]]
id = "bench"
key_env = "BENCH_KEY"
mcp_tools = ["fast.*"]
tool_calls_per_min = 100000000
[[mcp_servers]]
name = "fast"
url = "http://127.0.0.1:{up_port}/mcp"
""")
        env = dict(os.environ, BENCH_KEY="bench-key", TOLLGATE_LOG="warn")
        gw = subprocess.Popen([os.path.join(a.bin_dir, "tollgate"), "serve", "--config", cfg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(gw)
        wait_port(gw_port, gw, "tollgate")
        direct = Session(f"http://127.0.0.1:{up_port}/mcp", {})
        via = Session(f"http://127.0.0.1:{gw_port}/mcp/fast", {"api-key": "bench-key"})
        for _ in range(a.warmup):
            direct.call("echo")
            via.call("echo")
        d, g = [], []
        for _ in range(a.calls):
            d.append(direct.call("echo"))
            g.append(via.call("echo"))
        rows = []
        for p in (50, 90, 99):
            dp, gp = pct(d, p) * 1e6, pct(g, p) * 1e6
            rows.append((f"p{p}", dp, gp, gp - dp))
        print(f"MCP tools/call, {a.calls} sequential calls each way ({a.bin_dir}):\n")
        print("| percentile | direct (µs) | via tollgate (µs) | added (µs) |")
        print("|---|---:|---:|---:|")
        for name, dp, gp, add in rows:
            print(f"| {name} | {dp:.0f} | {gp:.0f} | {add:.0f} |")
        print(json.dumps({"p50_added_us": rows[0][3], "p99_added_us": rows[2][3]}))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


main()
