"""The attention kernels compiled ahead of time for sm_80, sm_90 and sm_100, without a GPU
(kernels/attention/static_check.py: the launchers' real arguments, Triton's own specialisation, the full
compiler pipeline and the bundled ptxas).

CI compiles the subset below: every kernel, the first config the autotuner tries on each architecture
(its likeliest pick), for the training default (head dim 128, bf16, causal, packed documents) and plain
causal attention. ``python bench/kernel_static.py`` compiles every config of every variant (head dims
64/128, bf16/fp16, causal/documents/window) and records the table in bench/results/kernel_static.json.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from launcher import REPO

ARCHS = (80, 90, 100)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
VARIANTS = {"docs": "Variant(128, 'bfloat16', causal=True, documents=True)", "causal": "Variant(128, 'bfloat16')"}

# Run in a process of its own: the kernels must be decorated for the compiler, and another test module may
# have imported triton for its interpreter in this one.
_COMPILE = """
import dataclasses, json, sys
from torchtrain.kernels.attention.static_check import Variant, check
variants = {variants}
print(json.dumps({{f"{{name}} {{arch}}": [dataclasses.asdict(r) for r in check(eval(v), arch, only_configs=slice(0, 1))]
                  for name, v in variants.items() for arch in {archs}}}))
"""


@pytest.fixture(scope="module")
def reports():
    from torchtrain.kernels.attention.static_check import StaticReport

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE.format(variants=VARIANTS, archs=ARCHS)], cwd=REPO,
                          env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    fields = {f.name for f in dataclasses.fields(StaticReport)}
    return {tuple(key.split()[:1]) + (int(key.split()[1]),): [StaticReport(**{k: v for k, v in row.items()
                                                                           if k in fields}) for row in rows]
            for key, rows in rows.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_and_fits_the_architectures_shared_memory(reports, arch):
    for name in VARIANTS:
        compiled = reports[name, arch]
        assert [r.kernel for r in compiled] == ["fwd", "preprocess", "dkdv", "dq"]
        for report in compiled:
            assert 0 < report.shared_bytes <= SHARED_LIMIT[arch], report
            assert 0 < report.registers <= 255, report


@pytest.mark.parametrize("arch", ARCHS)
def test_matmuls_lower_to_the_architectures_tensor_core_instructions(reports, arch):
    for name in VARIANTS:
        for report in reports[name, arch]:
            if report.kernel != "preprocess":
                assert report.matmul_instructions > 0, report
            assert not report.other_matmul_instructions, report


@pytest.mark.parametrize("arch", ARCHS)
def test_the_tile_loops_are_software_pipelined_and_nothing_spills(reports, arch):
    for name in VARIANTS:
        for report in reports[name, arch]:
            assert report.pipelined, report
            assert not report.spills, report
