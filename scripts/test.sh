#!/usr/bin/env bash
# Install nhi-broker with its test extras into ./.venv and run the whole test suite.
# Also installs Debian's chromium and chromium-driver for the console's browser tests when missing
# (as root; otherwise it says how). Redis and PostgreSQL must be running (.ci/run starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
# The console's browser tests drive Debian's chromium through Debian's chromedriver (never a downloaded browser).
install_chromium() {
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
      echo "chromium and chromium-driver are missing: apt-get install chromium chromium-driver (as root)" >&2
    fi
  fi
}
install_chromium

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The client SDK is its own distribution (clients/python), tested in the same run (tests/clients), with its
# optional MCP and pydantic-ai integrations.
.venv/bin/python -m pip install --quiet -e './clients/python[mcp,pydantic-ai]'
.venv/bin/ruff check .
.venv/bin/ruff check --config clients/python/pyproject.toml clients/python
.venv/bin/mypy
# The SDK is typed too (py.typed): strict on its own configuration.
.venv/bin/mypy --config-file clients/python/pyproject.toml
exec .venv/bin/python -m pytest "$@"
