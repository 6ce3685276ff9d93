#!/usr/bin/env bash
# Refreshes constraints.txt: resolves pyproject.toml's ranges (with the test extra) to today's newest
# releases in a new, empty virtual environment and writes every installed version. Afterwards run
# `bash .ci/run`, which installs exactly these pins into another new environment and runs the tests.
#
# torch and triton are chosen here, not by the resolver: torch is the release the project is tested
# with, and triton the one torch's CUDA wheels require, so the kernel tests on CPU use the Triton that
# a GPU run uses.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=2.13.0
triton_version=3.7.1  # the "triton==" requirement of torch 2.13.0's CUDA wheels

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install --quiet "torch==$torch_version" "triton==$triton_version; platform_machine == 'x86_64'"
"$pip" install --quiet ".[test]"
{
    echo "# Exact versions for scripts/setup.sh (pip --constraint). Written by scripts/lock.sh; do not edit."
    echo "# Resolved on $(uname -s) $(uname -m), Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)."
    # pip is the environment's own; torch's local label (+cpu, +cu128) names a build, not a version.
    "$pip" list --format=freeze --exclude pip --exclude torchtrain | sed -E 's/^(torch==[^+]*)\+.*/\1/' \
        | LC_ALL=C sort -f -t= -k1,1
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
