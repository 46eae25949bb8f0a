#!/usr/bin/env python3
"""Checks the house rules of the crates' source folders (run by .ci/run):

- no import cycle between top-level modules: every `crate::X` a file of module M names is an
  edge M -> X, and the graph must have no cycle (data flows one way, from the pipeline down);
- no source file over MAX_LINES lines, unit tests included (a large test module moves to a
  sibling file).

Exits 1 with what is wrong; prints the module graph with --graph.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRATES = ["gateway/src", "quota/src", "common/src"]
MAX_LINES = 450
CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def module_of(src: Path, file: Path) -> str:
    rel = file.relative_to(src)
    first = rel.parts[0]
    if first in ("lib.rs", "main.rs"):
        return "(root)"
    return first[:-3] if first.endswith(".rs") else first


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    problems: list[str] = []
    for crate in CRATES:
        src = ROOT / crate
        graph: dict[str, set[str]] = {}
        for file in sorted(src.rglob("*.rs")):
            text = file.read_text()
            lines = text.count("\n") + (0 if text.endswith("\n") else 1)
            if lines > MAX_LINES:
                problems.append(f"{file.relative_to(ROOT)}: {lines} lines (at most {MAX_LINES})")
            m = module_of(src, file)
            edges = graph.setdefault(m, set())
            for target in CRATE_PATH.findall(strip_comments(text)):
                if target != m:
                    edges.add(target)
        for comp in cycles(graph):
            problems.append(f"{crate}: import cycle between modules {' <-> '.join(comp)}")
        if "--graph" in sys.argv:
            print(f"# {crate}")
            for m in sorted(graph):
                print(f"  {m} -> {', '.join(sorted(graph[m])) or '-'}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
