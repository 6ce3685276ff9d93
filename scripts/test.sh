#!/usr/bin/env bash
# Runs the whole test suite on CPU (distributed tests use gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${TORCHTRAIN_VENV:-.venv}/bin/python" -m pytest tests -q "$@"
