#!/usr/bin/env bash
# Install nhi-broker with its test extras into ./.venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The client SDK is its own distribution (clients/python), tested in the same run (tests/clients).
.venv/bin/python -m pip install --quiet -e ./clients/python
.venv/bin/ruff check .
.venv/bin/ruff check --config clients/python/pyproject.toml clients/python
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
