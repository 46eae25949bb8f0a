#!/usr/bin/env bash
# tollgate benchmark: the same workload against the mock directly, nginx proxy_pass, tollgate
# (memory store; Redis limits + routing + telemetry; 3 replicas behind nginx), LiteLLM proxy and
# Portkey gateway, on this machine, in one run; prints one markdown table. See docs/BENCHMARKS.md.
#
#   loadtest/bench.sh                 full run (~13 min): builds release binaries first
#   loadtest/bench.sh --smoke         ~10 s check for CI: mock + tollgate (memory, redis), no
#                                     nginx/LiteLLM/Portkey, no timing assertions; exits non-zero
#                                     only when requests fail
#   loadtest/bench.sh --install       also install what is missing: nginx and wrk (apt), LiteLLM (pip, into
#                                     a venv) and Portkey (npm), under target/bench-cache
#   loadtest/bench.sh --no-build      use the binaries already in --bin-dir
#   loadtest/bench.sh --debug         use (and build) target/debug (the smoke default)
#   loadtest/bench.sh --release       use (and build) target/release (the full-run default)
#   loadtest/bench.sh --mcp           the MCP scenario instead (loadtest/bench/mcp.py): the added
#                                     p50/p99 of a tools/call through tollgate vs the upstream directly
#   loadtest/bench.sh --cache         the answer cache's scenario instead (loadtest/bench/cache.py:
#                                     Valkey + RediSearch from target/pyenv, hits, misses, the
#                                     lookup's cost, a paraphrase workload's hit rate)
# Every other option goes to loadtest/bench/bench.py (--help lists them: --rate, --duration,
# --concurrency, --only, --pin, --out, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

build=1 install=0 smoke=0 cache_bench=0 mcp_bench=0 profile=""
args=()
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    --install) install=1 ;;
    --debug) profile=debug ;;
    --release) profile=release ;;
    --smoke) smoke=1; args+=("$a") ;;
    --cache) cache_bench=1 ;;
    --mcp) mcp_bench=1 ;;
    *) args+=("$a") ;;
  esac
done
[ -n "$profile" ] || { [ "$smoke" = 1 ] && profile=debug || profile=release; }
cache="${TOLLGATE_BENCH_CACHE:-$PWD/target/bench-cache}"

if [ "$install" = 1 ]; then
  mkdir -p "$cache"
  if ! command -v nginx >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq nginx wrk || echo "bench: nginx/wrk install failed" >&2
  fi
  if [ ! -x "$cache/litellm-venv/bin/litellm" ]; then
    python3 -m venv "$cache/litellm-venv" &&
      "$cache/litellm-venv/bin/pip" install -q 'litellm[proxy]' || echo "bench: LiteLLM install failed" >&2
  fi
  if [ ! -f "$cache/portkey/node_modules/@portkey-ai/gateway/build/start-server.js" ]; then
    mkdir -p "$cache/portkey" &&
      (cd "$cache/portkey" && { [ -f package.json ] || npm init -y >/dev/null; } &&
        npm install --no-audit --no-fund @portkey-ai/gateway) || echo "bench: Portkey install failed" >&2
  fi
fi

if [ "$build" = 1 ]; then
  flag=""; [ "$profile" = release ] && flag="--release"
  cargo build $flag -p tollgate -p tollgate-loadtest
fi

if [ "$mcp_bench" = 1 ]; then
  [ -x target/pyenv/bin/python ] || scripts/pyenv.sh
  exec target/pyenv/bin/python loadtest/bench/mcp.py --bin-dir "target/$profile" "${args[@]}"
fi

if [ "$cache_bench" = 1 ]; then
  [ -x target/pyenv/bin/python ] || scripts/pyenv.sh
  exec python3 loadtest/bench/cache.py --bin-dir "target/$profile" "${args[@]}"
fi

# The Python helper owns every process it starts and kills them on exit; this trap covers the
# helper itself when this script is interrupted.
python3 loadtest/bench/bench.py --bin-dir "target/$profile" --cache "$cache" "${args[@]}" &
helper=$!
trap 'kill -TERM "$helper" 2>/dev/null || true; wait "$helper" 2>/dev/null || true' EXIT INT TERM HUP
wait "$helper"
rc=$?
trap - EXIT INT TERM HUP
exit "$rc"
