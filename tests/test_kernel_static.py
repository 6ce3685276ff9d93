"""The attention kernels compiled ahead of time for sm_80, sm_90 and sm_100, without a GPU
(kernels/attention/static_check.py: the launchers' real arguments, Triton's own specialisation, the full
compiler pipeline and the bundled ptxas).

CI compiles the subset below: every kernel, the first config the autotuner tries on each architecture
(its likeliest pick), for the training default (head dim 128, bf16, causal, packed documents) and plain
causal attention. ``python bench/kernel_static.py`` compiles every config of every variant (head dims
64/128, bf16/fp16, causal/documents/window) and records the table in bench/results/kernel_static.json.
"""

import pytest

from torchtrain.kernels.attention import triton_kernels
from torchtrain.kernels.attention.static_check import MATMUL_INSTRUCTION, SHARED_LIMIT, Variant, check

pytestmark = pytest.mark.skipif(triton_kernels.INTERPRET, reason="triton was imported for the interpreter")

VARIANTS = {"docs": Variant(128, "bfloat16", causal=True, documents=True), "causal": Variant(128, "bfloat16")}


@pytest.fixture(scope="module")
def reports():
    return {(name, arch): list(check(variant, arch, only_configs=slice(0, 1)))
            for name, variant in VARIANTS.items() for arch in SHARED_LIMIT}


@pytest.mark.parametrize("arch", SHARED_LIMIT)
def test_every_kernel_compiles_and_fits_the_architectures_shared_memory(reports, arch):
    for name in VARIANTS:
        compiled = reports[name, arch]
        assert [r.kernel for r in compiled] == ["fwd", "preprocess", "dkdv", "dq"]
        for report in compiled:
            assert 0 < report.shared_bytes <= SHARED_LIMIT[arch], report
            assert 0 < report.registers <= 255, report


@pytest.mark.parametrize("arch", SHARED_LIMIT)
def test_matmuls_lower_to_the_architectures_tensor_core_instructions(reports, arch):
    for name in VARIANTS:
        for report in reports[name, arch]:
            if report.kernel != "preprocess":
                assert report.matmul_instructions > 0, (MATMUL_INSTRUCTION[arch], report)
            assert not report.other_matmul_instructions, report


@pytest.mark.parametrize("arch", SHARED_LIMIT)
def test_the_tile_loops_are_software_pipelined_and_nothing_spills(reports, arch):
    for name in VARIANTS:
        for report in reports[name, arch]:
            assert report.pipelined, report
            assert not report.spills, report
