#!/usr/bin/env bash
# Trains a recipe (default: recipes/debug.toml) with torchrun on every local GPU, or on the CPU.
# Extra arguments are config overrides, e.g. --training.steps 20. RECIPE and NPROC override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${TORCHTRAIN_VENV:-.venv}"
nproc="${NPROC:-$("$venv/bin/python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec "$venv/bin/torchrun" --standalone --nproc_per_node="$nproc" -m torchtrain.train \
    --config "${RECIPE:-recipes/debug.toml}" "$@"
