#!/usr/bin/env python3
"""tollgate benchmark: the same workload against the mock directly, nginx proxy_pass, tollgate
(memory store; Redis limits + routing + telemetry; a 3-replica cluster behind nginx), and,
when installed, LiteLLM proxy and Portkey gateway, all in one run on one machine.

Run it through `loadtest/bench.sh` (which builds the binaries first); `--help` lists the
options. Every process it starts is killed on exit, also on ctrl-c or SIGTERM.

What is measured, per target:
  * latency: open loop at `--rate` for `--duration` s (tollgate-load measures from the intended
    send time); "added" = target minus the mock measured directly at the same rate;
  * CPU per 1k requests of the gateway tier over that same run (utime + stime of the tier's
    processes from /proc/<pid>/stat, before and after);
  * throughput: closed loop, `--concurrency` workers; "core %" = the tier's CPU time / wall time
    during that run, so a tier that is not the bottleneck shows up as < 100 %;
  * streaming: open loop at `--stream-rate`, added time to first token (p50/p99);
  * peak RSS: VmHWM of the tier's processes at the end (sum over processes);
  * closed loop with wrk (when installed): `wrk -t1` with `wrk_post.lua`, c=1 for latency and
    c=`--concurrency` for throughput and CPU per request, each the median of 3 runs of
    `--wrk-duration` s (the client on the client CPU, the tier on the gateway CPU);
and for tollgate alone: RSS with 256 concurrent slow streams, and the p99 of a steady load with
and without 100k-token prompts sent alongside.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# One key for every target: tollgate knows its hash, LiteLLM takes it as its master key.
KEY = "sk-tollgate-bench-" + hashlib.sha256(b"tollgate-bench").hexdigest()[:32]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class Skip(Exception):
    """A target that cannot run on this machine (not installed): a note, not a failure."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the benchmark starts, each in its own process group, killed on exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.live: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def start(self, name, argv, cpus=None, env=None, ready=None, ready_url=None, timeout=60.0, cwd=None):
        """Starts `argv` (pinned to `cpus` with taskset when given). `ready` is a regex waited
        for on stdout (group 1, if any, is returned as the address); `ready_url` is polled
        until it answers. Returns (Popen, address or None)."""
        if cpus is not None:
            argv = ["taskset", "-c", cpus] + list(argv)
        out = open(self.workdir / f"{name}.out", "w+b")
        err = open(self.workdir / f"{name}.log", "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(
            argv, stdout=out if ready is None else subprocess.PIPE, stderr=err, env=full_env,
            cwd=cwd, start_new_session=True,
        )
        with self.lock:
            self.live.append(p)
        addr = None
        deadline = time.time() + timeout
        if ready is not None:
            # Read stdout lines until the readiness line; then keep draining it into the file.
            rx = re.compile(ready)
            while True:
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: not ready after {timeout}s; see {err.name}")
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name} exited (rc={p.wait()}); see {err.name}")
                out.write(line)
                out.flush()
                m = rx.search(line.decode(errors="replace"))
                if m:
                    addr = m.group(1) if m.groups() else None
                    break

            def drain(src=p.stdout, dst=out):
                for chunk in iter(lambda: src.read1(65536), b""):
                    dst.write(chunk)

            threading.Thread(target=drain, daemon=True).start()
        if ready_url is not None:
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited (rc={p.returncode}); see {err.name}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=2) as r:
                        if r.status < 500:
                            break
                except Exception:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: {ready_url} not answering after {timeout}s; see {err.name}")
                time.sleep(0.2)
        return p, addr

    def stop(self, p: subprocess.Popen, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        with self.lock:
            if p in self.live:
                self.live.remove(p)

    def stop_all(self):
        with self.lock:
            live = list(self.live)
        for p in reversed(live):
            self.stop(p, grace=3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


# ---------------------------------------------------------------------------------------------
# /proc accounting


def descendants(roots: list[int]) -> list[int]:
    """`roots` and every live process below them."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes and their live descendants (and reaped children)."""
    total = 0
    for pid in descendants(pids):
        try:
            f = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = f[f.rindex(")") + 2:].split()
        # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU time all CPUs spent busy (not idle / iowait) since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def status_kb(pids: list[int], key: str) -> int:
    total = 0
    for pid in descendants(pids):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# ---------------------------------------------------------------------------------------------
# load


@dataclass
class Run:
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    requests: int = 0
    bad: int = 0
    status: dict = field(default_factory=dict)
    cpu_s: float = 0.0
    # Share of the machine's CPU used by processes outside this benchmark during the run
    # (other builds, ...): a disturbance indicator, 0 on a quiet machine.
    other_pct: float = 0.0
    raw: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.bin = Path(args.bin_dir)
        ncpu = os.cpu_count() or 1
        pin = args.pin == "split" and ncpu >= 2 and shutil.which("taskset")
        # Gateway tier on CPU 0; load generator, mock and helper proxies on the last CPU.
        self.gw_cpus = "0" if pin else None
        self.client_cpus = str(ncpu - 1) if pin else None
        self.failures: list[str] = []
        self.otlp_hits = 0
        # The reference the paired closed-loop runs go beside: the mock's URL and a second
        # nginx (url, its process), started by `run` once there is a mock.
        self.direct_url: str | None = None
        self.ref: tuple[str, list] | None = None

    # -- pieces ---------------------------------------------------------------------------

    def mock(self, name="mock", extra=()):
        p, addr = self.procs.start(
            name, [str(self.bin / "tollgate-mock"), "--listen", "127.0.0.1:0", "--name", name, *extra],
            cpus=self.client_cpus, ready=r"listening on (\S+)")
        return p, f"http://{addr}"

    def redis(self):
        port = free_port()
        d = self.workdir / f"redis-{port}"
        d.mkdir()
        p, _ = self.procs.start(
            f"redis-{port}",
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            cpus=self.gw_cpus)
        wait_port(port)
        return p, f"redis://127.0.0.1:{port}"

    def otlp_sink(self):
        """A local OTLP/HTTP sink that answers 200 to anything and counts what it received."""
        bench = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                bench.otlp_hits += 1
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    def tollgate_config(self, name, mock_url, redis_url=None, otlp=None, big_mock_url=None, cache=True):
        key_hash = hashlib.sha256(KEY.encode()).hexdigest()
        t = [
            "[server]", 'listen = "127.0.0.1:0"', "shutdown_grace_ms = 1000",
            "[limits]", "default_max_tokens = 16",
            "[[consumers]]", 'id = "bench"', 'team = "perf"', "tpm = 1000000000000",
            f'key_sha256 = ["{key_hash}"]',
        ]
        if redis_url:
            t[3:3] = ["[store]", 'kind = "redis"', f'url = "{redis_url}"']
            # Routing: two PTU-like Azure backends sharing priority 1, an OpenAI-style PAYG
            # overflow at priority 2; all three are the same mock.
            t += ["[[backends]]", 'name = "ptu-a"', f'url = "{mock_url}"', 'api = "azure"',
                  'models = ["gpt-4o"]', 'deployments = { "gpt-4o" = "gpt4o-ptu" }',
                  "priority = 1", "weight = 1",
                  "[[backends]]", 'name = "ptu-b"', f'url = "{mock_url}"', 'api = "azure"',
                  'models = ["gpt-4o"]', "priority = 1", "weight = 1",
                  "[[backends]]", 'name = "payg"', f'url = "{mock_url}"', 'api = "openai"',
                  'models = ["gpt-4o"]', "priority = 2",
                  "price = { input_per_1m = 2.5, output_per_1m = 10.0 }",
                  # Every feature on the path: a team budget (reserved beside the consumer's
                  # TPM, in the team's own slot) and an exact answer cache that misses every
                  # time (each request carries its own seed: `--unique`, wrk_post.lua).
                  "[[teams]]", 'id = "perf"', "budget = 1000000000.0", 'budget_period = "month"']
            if cache:
                t += ["[[cache]]", 'name = "bench"', 'mode = "exact"', "ttl_s = 60", "max_entries = 10000"]
        else:
            t += ["[[backends]]", 'name = "mock"', f'url = "{mock_url}"', 'api = "openai"',
                  'models = ["gpt-4o"]']
        if big_mock_url:
            t += ["[[backends]]", 'name = "big"', f'url = "{big_mock_url}"', 'api = "openai"',
                  'models = ["big"]']
        if otlp:
            t += ["[telemetry]", f'otlp_endpoint = "{otlp}"', 'service_name = "tollgate-bench"']
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(t) + "\n")
        return path

    def tollgate(self, name, config, cpus="gw"):
        cpus = self.gw_cpus if cpus == "gw" else cpus
        p, addr = self.procs.start(
            name, [str(self.bin / "tollgate"), "serve", "--config", str(config)],
            cpus=cpus, ready=r"listening on (\S+)")
        return p, f"http://{addr}"

    def nginx(self, name, upstreams, cpus="gw", extra_headers=None, workers=1):
        prefix = self.workdir / name
        (prefix / "logs").mkdir(parents=True)
        port = free_port()
        servers = "\n".join(f"    server {u.split('://', 1)[1]};" for u in upstreams)
        headers = "\n".join(f"      proxy_set_header {k} \"{v}\";" for k, v in (extra_headers or {}).items())
        conf = f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  client_max_body_size 20m;
  client_body_buffer_size 1m;
  keepalive_requests 1000000;
  upstream up {{
{servers}
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
{headers}
    }}
  }}
}}
"""
        (prefix / "nginx.conf").write_text(conf)
        cpus = self.gw_cpus if cpus == "gw" else cpus
        p, _ = self.procs.start(name, ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                       "-g", "daemon off;"], cpus=cpus)
        wait_port(port)
        return p, f"http://127.0.0.1:{port}"

    # -- load -----------------------------------------------------------------------------

    def load(self, url, *, rate=None, concurrency=None, duration, stream=False, prompt_tokens=100,
             max_tokens=16, model="gpt-4o", tier=(), timeout=30.0, background=False):
        argv = [str(self.bin / "tollgate-load"), "--url", url, "--key", KEY, "--duration", str(duration),
                "--prompt-tokens", str(prompt_tokens), "--max-tokens", str(max_tokens),
                "--model", model, "--timeout", str(timeout), "--json", "--unique"]
        argv += ["--rate", str(rate)] if rate else ["--concurrency", str(concurrency)]
        if stream:
            argv.append("--stream")
        if self.client_cpus is not None:
            argv = ["taskset", "-c", self.client_cpus] + argv
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        pids = [p.pid for p in tier]
        ours = pids + [p.pid for p in self.procs.live]
        cpu0, own0, busy0, kids0, t0 = cpu_seconds(pids), cpu_seconds(ours), busy_seconds(), os.times(), time.time()
        res = subprocess.run(argv, capture_output=True, text=True)
        cpu1, own1, busy1, kids1, t1 = cpu_seconds(pids), cpu_seconds(ours), busy_seconds(), os.times(), time.time()
        if res.returncode != 0:
            raise RuntimeError(f"tollgate-load failed: {res.stderr.strip()[-500:]}")
        run = self.parse(json.loads(res.stdout), cpu1 - cpu0)
        load_gen = (kids1.children_user + kids1.children_system) - (kids0.children_user + kids0.children_system)
        load_gen += (kids1.user + kids1.system) - (kids0.user + kids0.system)  # this harness itself
        other = (busy1 - busy0) - (own1 - own0) - load_gen
        run.other_pct = max(0.0, 100 * other / ((t1 - t0) * (os.cpu_count() or 1)))
        return run

    @staticmethod
    def parse(r: dict, cpu_s=0.0) -> Run:
        ok = sum(v for k, v in r["status"].items() if k.startswith("2"))
        run = Run(rps=r["rps"], p50=r["latency_us"]["p50"], p99=r["latency_us"]["p99"],
                  requests=r["requests"], bad=r["requests"] - ok + r.get("body_errors", 0) + r.get("dropped", 0),
                  status=r["status"], cpu_s=cpu_s, raw=r)
        if r.get("ttft_us"):
            run.ttft_p50, run.ttft_p99 = r["ttft_us"]["p50"], r["ttft_us"]["p99"]
        return run

    def wrk(self, url, connections, duration, tier=()):
        """One closed-loop wrk run (1 thread, `connections` connections) of the standard POST;
        returns p50/p99 in µs, rps, and the tier's CPU µs per request."""
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(WRK_LUA),
                f"{url}/v1/chat/completions"]
        if self.client_cpus is not None:
            argv = ["taskset", "-c", self.client_cpus] + argv
        pids = [p.pid for p in tier]
        cpu0 = cpu_seconds(pids)
        res = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TG_KEY": KEY},
                             timeout=duration + 60)
        cpu1 = cpu_seconds(pids)
        if res.returncode != 0:
            raise RuntimeError(f"wrk failed: {res.stderr.strip()[-300:]}")
        return parse_wrk(res.stdout, cpu1 - cpu0)

    def wrk_rows(self, url, tier, paired=False):
        """c=1 (latency) and c=32 (throughput), each the median of 3 runs. `paired` (and a
        reference nginx running): each run right after one against the reference nginx and, at
        c=1, one against the mock directly, so that the added latency and the ratios to nginx
        also come from runs seconds apart; kept per pair in `out["pairs"]`."""
        a = self.args
        out = {}
        paired = paired and self.ref is not None and self.direct_url is not None
        pairs = {}
        for c in (1, a.concurrency):
            runs = []
            for _ in range(3):
                if paired:
                    ref_url, ref_tier = self.ref
                    pair = {"direct": self.wrk(self.direct_url, c, a.wrk_duration)} if c == 1 else {}
                    pair["nginx"] = self.wrk(ref_url, c, a.wrk_duration, ref_tier)
                    pair["target"] = self.wrk(url, c, a.wrk_duration, tier)
                    pairs.setdefault(c, []).append(pair)
                    runs.append(pair["target"])
                else:
                    runs.append(self.wrk(url, c, a.wrk_duration, tier))
            key = "p50" if c == 1 else "rps"
            runs.sort(key=lambda r: r[key])
            med = runs[1]
            med["runs"] = [r[key] for r in runs]
            bad = sum(r["non2xx"] + r["errors"] for r in runs)
            if bad:
                self.failures.append(f"wrk c={c} against {url}: {bad} failed requests")
            out[c] = med
        if paired:
            out["pairs"] = pairs
        return out

    def measure(self, label, url, tier, note="", third_party=False, paired=False):
        """The standard workload against one target; returns a row dict. Failed requests fail
        the run, except for third-party gateways, where they become a note in the table."""
        a = self.args
        row = {"target": label, "note": note}
        self.row_notes = []
        self.fatal = not third_party
        # Let connection pools and caches warm up (not measured).
        self.load(url, concurrency=4, duration=a.warmup)
        if not a.smoke:
            thr = self.load(url, concurrency=a.concurrency, duration=a.duration, tier=tier)
            row["thr"] = thr
            self.check(label, "throughput", thr)
        rate = a.rate
        if not a.smoke and row["thr"].rps < 1.5 * rate:
            # This target cannot sustain the common rate: an open loop at it would only measure
            # the queue. Measure at half its closed-loop throughput instead, and say so.
            rate = max(1.0, round(row["thr"].rps / 2))
            row["note"] = (row["note"] + "; " if row["note"] else "") + (
                f"saturates below {1.5 * a.rate:g} rps: latency at {rate:g} rps, streams at {max(1.0, round(rate / 2)):g} rps")
        row["rate"] = rate
        lat = self.load(url, rate=rate, duration=a.duration, tier=tier)
        row["lat"] = lat
        self.check(label, "latency", lat)
        # Streams cost more than plain requests: a target measured below the common rate gets
        # half its latency rate for streams, so TTFT is not a queueing figure either.
        srate = a.stream_rate if rate == a.rate else max(1.0, round(rate / 2))
        row["srate"] = srate
        st = self.load(url, rate=srate, duration=a.duration, stream=True, tier=tier)
        row["stream"] = st
        self.check(label, "stream", st)
        if not a.smoke and not third_party and shutil.which("wrk"):
            row["wrk"] = self.wrk_rows(url, tier, paired)
        row["hwm_kb"] = status_kb([p.pid for p in tier], "VmHWM")
        if self.row_notes:
            row["note"] = "; ".join(([row["note"]] if row["note"] else []) + self.row_notes)
        log(f"{label}: {lat.p50:.0f}/{lat.p99:.0f} us p50/p99 at {rate:g} rps"
            + (f", {row['thr'].rps:.0f} rps closed loop" if "thr" in row else "")
            + f", ttft p50 {st.ttft_p50} us, HWM {row['hwm_kb'] / 1024:.1f} MB")
        return row

    def check(self, label, what, run: Run):
        if run.bad or not run.requests:
            msg = f"{label} {what}: {run.bad} of {run.requests} requests failed: {run.status}"
            log("WARNING " + msg)
            if getattr(self, "fatal", True):
                self.failures.append(msg)
            else:
                self.row_notes.append(f"{what}: {run.bad}/{run.requests} failed {run.status}")

    # -- the whole run --------------------------------------------------------------------

    def run(self):
        a = self.args
        rows = []
        notes = []
        mock_p, mock_url = self.mock()
        rows.append(self.measure("mock direct", mock_url, []))
        direct = rows[0]

        def target(label, fn):
            if a.only and not any(o in label for o in a.only):
                return
            try:
                rows.append(fn(label))
            except Skip as e:
                log(f"{label}: skipped: {e}")
                notes.append(f"{label}: skipped: {e}")
            except Exception as e:  # one target failing must not lose the others' numbers
                log(f"{label}: skipped: {e}")
                notes.append(f"{label}: not measured: {e}")
                self.failures.append(f"{label}: {e}")

        have_nginx = shutil.which("nginx") is not None
        have_redis = shutil.which("redis-server") is not None

        def nginx_row(label):
            p, url = self.nginx("nginx", [mock_url])
            try:
                return self.measure(label, url, [p], "1 worker")
            finally:
                self.procs.stop(p)

        def tg_memory(label):
            p, url = self.tollgate("tg-memory", self.tollgate_config("tg-memory", mock_url))
            try:
                return self.measure(label, url, [p], paired=True)
            finally:
                self.procs.stop(p)

        def tg_redis(label, cache=True):
            rp, rurl = self.redis()
            sink, otlp = self.otlp_sink()
            self.otlp_hits = 0
            p, url = self.tollgate("tg-redis", self.tollgate_config("tg-redis", mock_url, rurl, otlp, cache=cache))
            try:
                row = self.measure(label, url, [p, rp], paired=True)
                time.sleep(1.5)
                row["note"] = (f"CPU/RSS incl. redis-server; OTLP sink got {self.otlp_hits} posts; "
                               + (f"cache {cache_results(url)}" if cache else "no cache"))
                if self.otlp_hits == 0:
                    notes.append("telemetry: `[telemetry] otlp_endpoint` was set to a local sink, which "
                                 "received nothing: this build does not export OTLP yet, so the Redis row "
                                 "measures limits + routing without telemetry export.")
                return row
            finally:
                self.procs.stop(p)
                self.procs.stop(rp)
                sink.shutdown()

        def cluster(label):
            rp, rurl = self.redis()
            sink, otlp = self.otlp_sink()
            cfg = self.tollgate_config("tg-cluster", mock_url, rurl, otlp)
            gws = [self.tollgate(f"tg-cluster-{i}", cfg) for i in range(3)]
            lb, url = self.nginx("nginx-lb", [u for _, u in gws])
            try:
                return self.measure(label, url, [p for p, _ in gws] + [rp, lb],
                                    "3 replicas + redis + nginx LB, all on the gateway CPU", paired=True)
            finally:
                self.procs.stop(lb)
                for p, _ in gws:
                    self.procs.stop(p)
                self.procs.stop(rp)
                sink.shutdown()

        def litellm(label):
            exe = Path(a.cache) / "litellm-venv/bin/litellm"
            if not exe.exists():
                raise Skip(f"not installed ({exe} missing; `bench.sh --install` installs it)")
            port = free_port()
            cfg = self.workdir / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n"
                f"      api_base: {mock_url}/v1\n      api_key: mock\n"
                "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
                f"general_settings:\n  master_key: {KEY}\n")
            p, _ = self.procs.start(
                "litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1", "--telemetry", "False"],
                cpus=self.gw_cpus, env={"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"},
                ready_url=f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
            try:
                return self.measure(label, f"http://127.0.0.1:{port}", [p], "1 uvicorn worker, master key, no DB",
                                    third_party=True)
            finally:
                self.procs.stop(p)

        def portkey(label):
            js = Path(a.cache) / "portkey/node_modules/@portkey-ai/gateway/build/start-server.js"
            if not js.exists():
                raise Skip(f"not installed ({js} missing; `bench.sh --install` installs it)")
            if not have_nginx:
                raise Skip("needs nginx to add Portkey's routing headers")
            port = free_port()
            p, _ = self.procs.start(
                "portkey", ["node", str(js), f"--port={port}", "--headless"], cpus=self.gw_cpus,
                env={"NODE_ENV": "production", "TRUSTED_CUSTOM_HOSTS": "127.0.0.1,localhost"},
                ready_url=f"http://127.0.0.1:{port}/", timeout=60)
            # Portkey takes the provider and target from request headers, which tollgate-load
            # does not send: a header-adding nginx on the client CPU sits in front of it.
            hp, url = self.nginx("nginx-portkey-headers", [f"http://127.0.0.1:{port}"], cpus=self.client_cpus,
                                 extra_headers={"x-portkey-provider": "openai",
                                                "x-portkey-custom-host": f"{mock_url}/v1"})
            try:
                return self.measure(label, url, [p], "via a header-adding nginx hop (see nginx row for its cost)",
                                    third_party=True)
            finally:
                self.procs.stop(hp)
                self.procs.stop(p)

        if a.smoke:
            log("smoke mode: nginx, the cluster, LiteLLM and Portkey are skipped")
            notes.append("smoke mode: skipped nginx, tollgate cluster, LiteLLM, Portkey, the 256-stream "
                         "and the big-prompt scenarios")
            target("tollgate memory", tg_memory)
            if have_redis:
                target("tollgate redis", tg_redis)
            else:
                log("smoke: redis-server missing, tollgate redis skipped")
        else:
            if have_nginx and shutil.which("wrk"):
                # The reference of the paired closed-loop runs: idle except while a pair runs.
                ref_p, ref_url = self.nginx("nginx-ref", [mock_url])
                self.direct_url, self.ref = mock_url, (ref_url, [ref_p])
            if have_nginx:
                target("nginx proxy_pass", nginx_row)
            else:
                notes.append("nginx: not installed (apt-get install nginx), no reference row")
            target("tollgate memory", tg_memory)
            if have_redis:
                target("tollgate redis, all on", tg_redis)
                # The same without the cache: what the every-miss cache costs, in the same run.
                target("tollgate redis, all but the cache", lambda label: tg_redis(label, cache=False))
                if have_nginx:
                    target("tollgate x3 + nginx", cluster)
            else:
                notes.append("redis-server missing: Redis rows skipped")
            target("LiteLLM proxy", litellm)
            target("Portkey gateway", portkey)

        extras = {}
        if not a.smoke and (not a.only or "extras" in a.only):
            try:
                extras["streams"] = self.streams_rss()
            except Exception as e:
                notes.append(f"256-stream RSS: not measured: {e}")
            if have_redis:
                try:
                    extras["big"] = self.big_prompt()
                except Exception as e:
                    notes.append(f"big-prompt test: not measured: {e}")
        self.procs.stop(mock_p)
        return rows, direct, extras, notes

    def streams_rss(self):
        """Peak RSS of one tollgate (memory store) holding `--streams` concurrent slow streams."""
        a = self.args
        self.fatal = True
        n = a.streams
        slow_p, slow_url = self.mock("mock-slow", ["--tokens-per-sec", "20"])
        p, url = self.tollgate("tg-streams", self.tollgate_config("tg-streams", slow_url))
        try:
            # The tokenizer loads after the `listening on` line: settle with a few requests first.
            self.load(url, concurrency=1, duration=0.3)
            time.sleep(0.3)
            idle_kb = status_kb([p.pid], "VmRSS")
            # 200 tokens at 20/s: every stream stays open ~10 s, so all n are open together.
            lp = self.load(url, concurrency=n, duration=3, stream=True, max_tokens=200, background=True)
            peak = 0
            while lp.poll() is None:
                peak = max(peak, status_kb([p.pid], "VmRSS"))
                time.sleep(0.1)
            out, err = lp.communicate()
            r = self.parse(json.loads(out))
            hwm = status_kb([p.pid], "VmHWM")
            log(f"{n} streams: RSS idle {idle_kb / 1024:.1f} MB, peak {peak / 1024:.1f} MB, HWM {hwm / 1024:.1f} MB; {r.status}")
            if r.bad:
                self.failures.append(f"{n}-stream run: {r.bad} failed {r.status}")
            return {"n": n, "idle_kb": idle_kb, "peak_kb": peak, "hwm_kb": hwm, "requests": r.requests,
                    "status": r.status}
        finally:
            self.procs.stop(p)
            self.procs.stop(slow_p)

    def big_prompt(self):
        """p99 of a steady load with and without 100k-token prompts sent alongside, against the
        mock directly (the control) and against tollgate with Redis, `--big-runs` pairs each,
        the control and tollgate interleaved (a drift of the machine moves both). The big
        prompts go to model "big", served by a second mock, so the steady load's mock never
        tokenizes them. Each pair's rise is its with-minus-without p99; the report gives the
        medians."""
        a = self.args
        self.fatal = True
        mock_p, mock_url = self.mock("mock-steady")
        big_p, big_url = self.mock("mock-big")
        rp, rurl = self.redis()
        p, url = self.tollgate("tg-big", self.tollgate_config("tg-big", mock_url, rurl, None, big_url))
        targets = [("direct", mock_url, big_url), ("tollgate", url, url)]
        runs = {label: [] for label, _, _ in targets}
        try:
            for _ in range(a.big_runs):
                for label, steady_url, big in targets:
                    self.load(steady_url, concurrency=4, duration=a.warmup)
                    base = self.load(steady_url, rate=a.rate, duration=a.duration)
                    bp = self.load(big, rate=a.big_rate, duration=a.duration, prompt_tokens=a.big_tokens,
                                   max_tokens=1, model="big", background=True)
                    time.sleep(0.05)
                    withbig = self.load(steady_url, rate=a.rate, duration=a.duration)
                    bo, be = bp.communicate()
                    if bp.returncode != 0:
                        raise RuntimeError(f"big-prompt load failed: {be.decode()[-300:]}")
                    b = self.parse(json.loads(bo))
                    runs[label].append({"base": base, "with": withbig, "big": b})
                    log(f"big prompt, {label}: steady p99 {base.p99:.0f} -> {withbig.p99:.0f} us; "
                        f"{b.requests} big prompts, p50 {b.p50 / 1000:.1f} ms, {b.status}")
                    for what, r in [("steady", base), ("steady+big", withbig), ("big", b)]:
                        self.check(f"big-prompt {label}", what, r)
        finally:
            self.procs.stop(p)
            self.procs.stop(rp)
            self.procs.stop(big_p)
            self.procs.stop(mock_p)
        return {label: big_summary(r) for label, r in runs.items()}


def big_summary(runs):
    """The medians of a target's big-prompt pairs, and each pair's figures."""
    return {
        "base_p99": statistics.median(r["base"].p99 for r in runs),
        "with_p99": statistics.median(r["with"].p99 for r in runs),
        "rise_p99": statistics.median(r["with"].p99 - r["base"].p99 for r in runs),
        "big_p50": statistics.median(r["big"].p50 for r in runs),
        "big_sent": sum(r["big"].requests for r in runs),
        "status": [r["big"].status for r in runs],
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------
# report


WRK_LUA = Path(__file__).resolve().parent / "wrk_post.lua"


def cache_results(url: str) -> str:
    """The gateway's `tollgate_cache_requests_total` by result, e.g. "miss 61234, hit 0"."""
    import urllib.request
    counts = {}
    try:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    except OSError as e:
        return f"metrics unreadable ({e})"
    for line in text.splitlines():
        m = re.match(r'tollgate_cache_requests_total\{.*result="(\w+)".*\} (\d+)', line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none counted"


def parse_wrk(text: str, cpu_s: float) -> dict:
    """Reads wrk's --latency summary: the 50 % and 99 % lines, Requests/sec, errors."""
    def us(v: str) -> float:
        for unit, f in (("us", 1), ("ms", 1e3), ("s", 1e6)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * f
        return float(v)

    r = {"p50": None, "p99": None, "rps": 0.0, "requests": 0, "non2xx": 0, "errors": 0}
    for line in text.splitlines():
        t = line.split()
        if len(t) == 2 and t[0] in ("50%", "99%"):
            r["p50" if t[0] == "50%" else "p99"] = us(t[1])
        elif line.startswith("Requests/sec:"):
            r["rps"] = float(t[1])
        elif "requests in" in line:
            r["requests"] = int(t[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            r["non2xx"] = int(t[-1])
        elif line.strip().startswith("Socket errors:"):
            r["errors"] = sum(int(x.strip(",")) for x in t[2::2])
    r["cpu_us_per_req"] = 1e6 * cpu_s / max(1, r["requests"])
    return r


def render_wrk(rows, direct, args) -> list[str]:
    """The closed-loop table: wrk -t1, c=1 for latency, c=--concurrency for throughput."""
    if "wrk" not in direct:
        return []
    nginx = next((r for r in rows if r["target"].startswith("nginx") and "wrk" in r), None)
    c = args.concurrency
    d1 = direct["wrk"][1]
    out = [f"### Closed loop (wrk -t1, `loadtest/bench/wrk_post.lua`; c=1 and c={c}, median of 3 × "
           f"{args.wrk_duration:g} s)", "",
           f"| target | c=1 p50 µs | c=1 p99 µs | added p50 µs | added p99 µs | c={c} rps | × nginx | "
           f"CPU µs / req at c={c} | × nginx by CPU | runs (c=1 p50 / c={c} rps) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wrk" not in r:
            continue
        w1, wc = r["wrk"][1], r["wrk"][c]
        is_direct = r is direct
        added50 = "—" if is_direct else f"{w1['p50'] - d1['p50']:+.0f}"
        added99 = "—" if is_direct else f"{w1['p99'] - d1['p99']:+.0f}"
        ratio = f"{wc['rps'] / nginx['wrk'][c]['rps']:.2f}" if nginx else "—"
        cpu = "—" if is_direct else f"{wc['cpu_us_per_req']:.1f}"
        by_cpu = (f"{wc['cpu_us_per_req'] / nginx['wrk'][c]['cpu_us_per_req']:.2f}"
                  if nginx and not is_direct and nginx['wrk'][c]['cpu_us_per_req'] > 0 else "—")
        runs = (" / ".join(f"{x:.0f}" for x in w1["runs"]) + " ; "
                + " / ".join(f"{x:,.0f}" for x in wc["runs"]))
        out.append(f"| {r['target']} | {w1['p50']:.0f} | {w1['p99']:.0f} | {added50} | {added99} | "
                   f"{wc['rps']:,.0f} | {ratio} | {cpu} | {by_cpu} | {runs} |")
    return out + [""] + render_paired(rows, args)


def render_paired(rows, args) -> list[str]:
    """The paired closed-loop runs: each figure from a target's run and the reference runs taken
    right before it, the median over the pairs (the machine's speed drifts between rows)."""
    c = args.concurrency
    paired = [r for r in rows if "pairs" in r.get("wrk", {})]
    if not paired:
        return []
    out = [f"### Paired closed loop (each run right after one against nginx and, at c=1, one against "
           f"the mock; medians of the {len(paired[0]['wrk']['pairs'][1])} pairs)", "",
           f"| target | added p50 µs at c=1 | nginx's added p50 µs | added p99 µs at c=1 | "
           f"× nginx rps at c={c} | × nginx CPU at c={c} | per pair (added p50 ; × nginx rps ; × nginx CPU) |",
           "|---|---|---|---|---|---|---|"]
    for r in paired:
        p1, pc = r["wrk"]["pairs"][1], r["wrk"]["pairs"][c]
        added50 = [p["target"]["p50"] - p["direct"]["p50"] for p in p1]
        nginx50 = [p["nginx"]["p50"] - p["direct"]["p50"] for p in p1]
        added99 = [p["target"]["p99"] - p["direct"]["p99"] for p in p1]
        rps = [p["target"]["rps"] / p["nginx"]["rps"] for p in pc]
        cpu = [p["target"]["cpu_us_per_req"] / p["nginx"]["cpu_us_per_req"]
               for p in pc if p["nginx"]["cpu_us_per_req"] > 0]
        med = statistics.median
        each = (" / ".join(f"{x:+.0f}" for x in added50) + " ; " + " / ".join(f"{x:.2f}" for x in rps)
                + " ; " + " / ".join(f"{x:.2f}" for x in cpu))
        cpu_med = f"{med(cpu):.2f}" if cpu else "—"
        out.append(f"| {r['target']} | {med(added50):+.0f} | {med(nginx50):+.0f} | {med(added99):+.0f} | "
                   f"{med(rps):.2f} | {cpu_med} | {each} |")
    return out + [""]


def fmt_us(v):
    return "—" if v is None else f"{v:.0f}"


def render(rows, direct, extras, notes, args, machine) -> str:
    d_lat, d_st = direct["lat"], direct["stream"]
    nginx = next((r for r in rows if r["target"].startswith("nginx")), None)
    lines = []
    hdr = ["target", "rate", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs", "rps (closed loop)",
           "× nginx", "core % at max", "CPU µs / req at max", "× nginx by CPU", "CPU ms / 1k req", "peak RSS MB", "added TTFT p50 µs",
           "added TTFT p99 µs", "other load %", "notes"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join("---" for _ in hdr) + "|")
    for r in rows:
        lat, st, thr = r["lat"], r["stream"], r.get("thr")
        is_direct = r is direct
        added50 = "—" if is_direct else f"{lat.p50 - d_lat.p50:+.0f}"
        added99 = "—" if is_direct else f"{lat.p99 - d_lat.p99:+.0f}"
        rps = f"{thr.rps:,.0f}" if thr else "—"
        ratio = f"{thr.rps / nginx['thr'].rps:.2f}" if thr and nginx and "thr" in nginx else "—"
        core = f"{100 * thr.cpu_s / thr.raw['duration_s']:.0f}" if thr and not is_direct else "—"
        cpu = "—" if is_direct else f"{1000 * 1000 * lat.cpu_s / max(1, lat.requests):.1f}"
        # CPU per request when saturated, and the throughput ratio it implies if the gateway's
        # own core were the bottleneck (the closed-loop ratio is capped by the client core).
        def per_req(x):
            return 1e6 * x["thr"].cpu_s / max(1, x["thr"].requests)

        us_max = f"{per_req(r):.0f}" if thr and not is_direct else "—"
        by_cpu = (f"{per_req(nginx) / per_req(r):.2f}" if thr and not is_direct and nginx and "thr" in nginx
                  and per_req(r) > 0 else "—")
        rss = "—" if is_direct else f"{r['hwm_kb'] / 1024:.1f}"
        if st.ttft_p50 is not None and d_st.ttft_p50 is not None and not is_direct:
            t50, t99 = f"{st.ttft_p50 - d_st.ttft_p50:+.0f}", f"{st.ttft_p99 - d_st.ttft_p99:+.0f}"
        elif is_direct and st.ttft_p50 is not None:
            t50, t99 = f"({st.ttft_p50:.0f})", f"({st.ttft_p99:.0f})"
        else:
            t50 = t99 = "—"
        other = max([lat.other_pct] + ([thr.other_pct] if thr else []))
        lines.append("| " + " | ".join([r["target"], f"{r['rate']:g}", fmt_us(lat.p50), fmt_us(lat.p99),
                                         added50, added99, rps, ratio, core, us_max, by_cpu, cpu, rss, t50, t99,
                                         f"{other:.0f}", r.get("note", "")]) + " |")
    out = ["## Results", "", *lines, "", *render_wrk(rows, direct, args)]
    if "streams" in extras:
        s = extras["streams"]
        out += [f"tollgate (memory store) with {s['n']} concurrent streams: RSS idle (after one request) {s['idle_kb'] / 1024:.1f} MB, "
                f"peak while streaming {s['peak_kb'] / 1024:.1f} MB (VmHWM {s['hwm_kb'] / 1024:.1f} MB); "
                f"statuses {s['status']}.", ""]
    if "big" in extras:
        out += [f"Steady load at {args.rate:g} rps, p99 without / with {args.big_tokens // 1000}k-token prompts "
                f"at {args.big_rate:g}/s alongside (big prompts to a second mock); medians of "
                f"{args.big_runs} pairs, the control and tollgate interleaved:", "",
                "| target | steady p99 µs | with big prompts p99 µs | rise µs (median of pairs) | big prompt p50 ms "
                "| big prompts sent | rises per pair µs |",
                "|---|---|---|---|---|---|---|"]
        for label, v in extras["big"].items():
            pairs = " / ".join(f"{r['with'].p99 - r['base'].p99:+.0f}" for r in v["runs"])
            out.append(f"| {label} | {v['base_p99']:.0f} | {v['with_p99']:.0f} | {v['rise_p99']:+.0f} | "
                       f"{v['big_p50'] / 1000:.1f} | {v['big_sent']} | {pairs} |")
        out.append("")
    out += ["Workload: chat completions, 100 prompt tokens, max_tokens 16; latency and CPU from an open loop "
            f"at the `rate` column for {args.duration:g} s; throughput from a closed loop of {args.concurrency} "
            f"workers; streaming at {args.stream_rate:g} rps (direct TTFT in parentheses). "
            "\"other load %\": the largest share of the machine's CPU used by processes outside the "
            "benchmark during the row's throughput or latency run (0 on a quiet machine; rows with more "
            f"than a few % were disturbed). Pinning: {machine['pinning']}.", ""]
    for n in notes:
        out.append(f"- {n}")
    return "\n".join(out) + "\n"


def machine_info(bench: Bench) -> dict:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    load = Path("/proc/loadavg").read_text().split()[:3]
    pin = (f"gateway tier (and redis) on CPU {bench.gw_cpus}; load generator, mock and helper proxies on "
           f"CPU {bench.client_cpus}") if bench.gw_cpus is not None else "none"
    return {"nproc": os.cpu_count(), "model": model, "mem_gb": mem_kb / 1024 / 1024, "loadavg": load,
            "pinning": pin}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="~10 s check: mock, tollgate memory and redis, short runs")
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"))
    ap.add_argument("--cache", default=os.environ.get("TOLLGATE_BENCH_CACHE", str(REPO / "target/bench-cache")),
                    help="where LiteLLM (litellm-venv/) and Portkey (portkey/) are installed")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop rate for latency and CPU")
    ap.add_argument("--stream-rate", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop workers for throughput")
    ap.add_argument("--wrk-duration", type=float, default=5.0,
                    help="seconds per wrk run (closed-loop rows; 3 runs each at c=1 and c=--concurrency)")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--big-tokens", type=int, default=100_000)
    ap.add_argument("--big-rate", type=float, default=1.0, help="100k-token prompts per second")
    ap.add_argument("--big-runs", type=int, default=3,
                    help="pairs (without / with big prompts) per target in the big-prompt scenario")
    ap.add_argument("--pin", choices=["split", "none"], default="split",
                    help="split: gateway tier on CPU 0, client + mock on the last CPU")
    ap.add_argument("--only", action="append", help="only targets whose label contains this (repeatable; "
                                                      "'extras' for the stream-RSS and big-prompt runs)")
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--json-out", help="write the raw results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.warmup = min(args.duration, 1.0), 0.3
        args.rate, args.stream_rate = min(args.rate, 200.0), min(args.stream_rate, 100.0)

    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench."))
    bench = Bench(args, workdir)

    def cleanup():
        bench.procs.stop_all()
        if not args.keep and not bench.failures:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs and configs kept in {workdir}")

    atexit.register(cleanup)

    def on_signal(sig, _frame):
        log(f"signal {sig}: stopping")
        sys.exit(128 + sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    m = machine_info(bench)
    log(f"{m['nproc']} CPUs ({m['model']}), {m['mem_gb']:.1f} GB, loadavg {' '.join(m['loadavg'])}; "
        f"pinning: {m['pinning']}; work dir {workdir}")
    rows, direct, extras, notes = bench.run()
    m_end = Path("/proc/loadavg").read_text().split()[:3]
    header = (f"Machine: {m['nproc']} × {m['model']}, {m['mem_gb']:.1f} GB RAM; load average "
              f"{' '.join(m['loadavg'])} at start, {' '.join(m_end)} at end; {time.strftime('%Y-%m-%d %H:%M %Z')}.\n\n")
    report = header + render(rows, direct, extras, notes, args, m)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json_out:
        def conv(o):
            return o.__dict__ if isinstance(o, Run) else str(o)
        Path(args.json_out).write_text(json.dumps({"rows": rows, "extras": extras, "notes": notes, "machine": m},
                                                  default=conv, indent=1))
    if bench.failures:
        log("FAILED: " + "; ".join(bench.failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
