#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need and the machine lacks:
# redis-server (the Redis tests start their own on free ports; with TLS for the TLS test), openssl, chromium (the HTML report test) and the tests' Python venv
# (scripts/pyenv.sh: Valkey and RediSearch for the store-topology tests, the official openai
# and MCP SDKs, kubernetes-validate; instant when already there).
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
# openssl makes the CA and server certificate of the TLS test (tests/tests/tls_acl.rs).
if ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq openssl
  else
    echo "openssl is missing: sudo apt-get install -y openssl" >&2
    exit 1
  fi
fi
# Headless Chromium renders the HTML usage report in tests/tests/showback.rs.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium
  else
    echo "chromium is missing: sudo apt-get install -y chromium" >&2
    exit 1
  fi
fi
bash scripts/pyenv.sh

# The 1,500-connection trickling scenario measures how fast the gateway closes connections; it
# runs on its own, before the rest, because after the whole suite's connection churn it can miss
# its bound on a 2-core machine (see the note in tests/tests/hardening.rs).
cargo test -p tollgate-tests --test hardening "$@" -- trickling_clients_beyond_the_cap_make_room
cargo test --workspace "$@" -- --skip trickling_clients_beyond_the_cap_make_room
