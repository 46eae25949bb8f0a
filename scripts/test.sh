#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need and the machine lacks:
# redis-server (the Redis tests start their own on free ports) and the official openai SDK
# (the compatibility test drives the gateway with it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server
  else
    echo "redis-server is missing: sudo apt-get install -y redis-server" >&2
    exit 1
  fi
fi
if ! python3 -c "import openai" >/dev/null 2>&1; then
  python3 -m pip install -q openai
fi

cargo test --workspace "$@"
