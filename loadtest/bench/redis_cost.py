#!/usr/bin/env python3
"""What one proxied request costs Redis: commands and CPU, on one Redis and on a 3-master Redis
Cluster (3 replicas), with leases off (one reservation per request) and on (the default).

For each store it starts the servers (redis-server on free ports, the cluster formed with
`redis-cli --cluster create --cluster-replicas 1`), a mock backend and one gateway, sends
`--rate` requests/s for `--duration` s with tollgate-load from 8 consumers, and reads
`INFO commandstats` (calls of every command) and `INFO cpu` (used_cpu_sys + used_cpu_user) on
every node before and after. Prints commands per request (by command) and Redis CPU µs per
request, summed over all nodes (replicas included: replication costs them CPU too).

Build first: `cargo build --workspace --bins`. Usage: `python3 loadtest/bench/redis_cost.py
[--rate 400] [--duration 10]`. Throughput is not measured: on a 2-core machine it would only
measure contention.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "debug"
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True
    ).stdout


def start_redis(dir_: Path, port: int, *extra: str) -> None:
    d = dir_ / str(port)
    d.mkdir()
    PROCS.append(
        subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(d), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    )
    for _ in range(100):
        try:
            if cli(port, "PING").strip() == "PONG":
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"redis-server on {port} did not start")


def start_cluster(dir_: Path) -> list[int]:
    ports = [free_port() for _ in range(6)]
    for p in ports:
        start_redis(dir_, p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000", "--cluster-port", str(free_port()))
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"],
                   capture_output=True, check=True)
    for _ in range(200):
        if all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in ports):
            return ports
        time.sleep(0.1)
    raise SystemExit("the cluster did not form")


def spawn_listening(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    PROCS.append(p)
    line = p.stdout.readline()
    if not line.startswith("listening on "):
        raise SystemExit(f"{cmd[0]} did not start: {line!r}")
    return p, "http://" + line.split()[-1]


def snapshot(ports: list[int]) -> tuple[dict[str, int], float]:
    calls: dict[str, int] = {}
    cpu = 0.0
    for p in ports:
        for line in cli(p, "INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line[len("cmdstat_"):].split(":", 1)
                n = int(rest.split("calls=")[1].split(",")[0])
                calls[name] = calls.get(name, 0) + n
        for line in cli(p, "INFO", "cpu").splitlines():
            if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                cpu += float(line.split(":")[1])
    return calls, cpu


def run(label: str, store_toml: str, ports: list[int], mock: str, lease: bool, args) -> dict:
    consumers = [f"bench-{i}" for i in range(8)]
    toml = (
        '[server]\nlisten = "127.0.0.1:0"\n'
        f"[store]\n{store_toml}\ntimeout_ms = 200\n"
        f"[limits]\nlease = {'true' if lease else 'false'}\n"
    )
    for c in consumers:
        h = hashlib.sha256(f"key-{c}".encode()).hexdigest()
        toml += f'[[consumers]]\nid = "{c}"\nkey_sha256 = ["{h}"]\nquota = 1000000000000\n'
    toml += f'[[backends]]\nname = "m"\nurl = "{mock}"\nmodels = ["gpt-4o"]\n'
    cfg = Path(tempfile.mkdtemp()) / "tollgate.toml"
    cfg.write_text(toml)
    gw_proc, gw = spawn_listening([str(BIN / "tollgate"), "serve", "--config", str(cfg)])
    time.sleep(1.0)
    # The servers' own background work (cron, cluster bus, replication pings) over the same
    # time with no load, subtracted below.
    idle0 = snapshot(ports)
    time.sleep(args.duration)
    idle1 = snapshot(ports)
    before = snapshot(ports)
    loads = [
        subprocess.Popen(
            [str(BIN / "tollgate-load"), "--url", gw,
             "--key", f"key-{c}", "--rate", str(args.rate / len(consumers)),
             "--duration", str(args.duration), "--max-tokens", "20", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for c in consumers
    ]
    requests = 0
    for p in loads:
        out, _ = p.communicate()
        requests += json.loads(out)["status"].get("200", 0)
    time.sleep(1.0)  # settle batches flushed
    after = snapshot(ports)
    gw_proc.terminate()
    gw_proc.wait()
    per_cmd = {k: (after[0].get(k, 0) - before[0].get(k, 0)) / max(requests, 1)
               for k in after[0]}
    per_cmd = {k: round(v, 3) for k, v in per_cmd.items() if v >= 0.001
               and k not in ("info", "ping")}
    busy, idle = after[1] - before[1], idle1[1] - idle0[1]
    return {
        "store": label,
        "lease": lease,
        "requests": requests,
        # Script calls the gateway sends (reserve, settle, heartbeats) and settle confirmations.
        "evalsha_per_request": per_cmd.get("evalsha", 0.0),
        "wait_per_request": per_cmd.get("wait", 0.0),
        # Every command executed on any node: script-internal ones, and replicas applying
        # the replication stream, included.
        "commands_per_request": round(sum(per_cmd.values()), 3),
        "by_command": per_cmd,
        "redis_cpu_us_per_request": round((busy - idle) * 1e6 / max(requests, 1), 1),
        "idle_cpu_us_per_s": round(idle * 1e6 / args.duration, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=400)
    ap.add_argument("--duration", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    tmp = Path(tempfile.mkdtemp())
    try:
        _, mock = spawn_listening([str(BIN / "tollgate-mock"), "--listen", "127.0.0.1:0"])
        single = free_port()
        start_redis(tmp, single)
        cluster = start_cluster(tmp)
        urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in cluster)
        results = []
        for lease in (False, True):
            results.append(run("redis", f'kind = "redis"\nurl = "redis://127.0.0.1:{single}"',
                               [single], mock, lease, args))
            results.append(run("redis_cluster", f'kind = "redis_cluster"\nurls = [{urls}]',
                               cluster, mock, lease, args))
        for r in results:
            print(json.dumps(r))
    finally:
        for p in PROCS:
            p.kill()


if __name__ == "__main__":
    main()
