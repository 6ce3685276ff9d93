"""The attention kernels compiled ahead of time for GPUs this machine need not have, and what the
compiled code says.

Targets: sm_80 (A100), sm_90 (H100, H200), sm_100 (B200). For each kernel launch the trainer makes
(forward; backward: preprocess, dK/dV, dQ), each autotuning config the autotuner would try on that
architecture (``triton_kernels.config_table``), and each variant (head dim, dtype, causal, sliding
window, packed documents):

1. The launchers of ``triton_kernels.py`` are called on CPU tensors of a representative shape with
   the kernels replaced by recorders, so every argument, stride and flag is the one a real launch
   passes.
2. Triton's own binder turns those arguments into the signature and specialisations the runtime
   would compile for (16-byte aligned pointers, integers divisible by 16, integers equal to 1).
   NOTE: that binder is built with Triton's ``create_function_from_signature`` and
   ``JITFunction._pack_args``, internals of the pinned Triton release: what ``JITFunction.run`` does
   before compiling, minus the device. Without those specialisations Triton cannot prove alignment,
   does not pipeline any load, and the result describes a kernel no GPU would run.
3. ``triton.compile`` runs the whole pipeline for the target, through the bundled ``ptxas``.

From the result: shared memory (the kernel's metadata) against the architecture's per-block limit,
registers and spills (ptxas's own report, ``-v``), the matrix instructions in the PTX (``mma.sync`` on
sm_80, ``wgmma`` on sm_90, ``tcgen05.mma`` on sm_100), and the software pipelining of the tile loop
(loads turned into asynchronous copies into ``num_stages``-deep shared buffers, read from the TTGIR).

``python bench/kernel_static.py`` prints and records the whole table; ``tests/test_kernel_static.py``
checks a subset in CI.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature


def _compiled_kernels():
    """``triton_kernels`` decorated for the compiler whatever ``TRITON_INTERPRET`` says now (the kernels are
    compiled here, never run); an error if this process already imported them for the interpreter."""
    import importlib
    import sys

    name = "torchtrain.kernels.attention.triton_kernels"
    if name not in sys.modules:
        with knobs.runtime.scope():
            knobs.runtime.interpret = False
            importlib.import_module(name)
    if sys.modules[name].INTERPRET:
        raise RuntimeError("the attention kernels were imported for Triton's interpreter in this process; "
                           "compile them in a process without TRITON_INTERPRET=1")
    return sys.modules[name]


# Shared memory one block may use (the opt-in maximum), in bytes: A100 163 KB; H100, H200, B200 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# The tensor-core instruction each architecture's matmuls must lower to, as it appears in the PTX.
MATMUL_INSTRUCTION = {80: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma"}
KERNELS = ("fwd", "preprocess", "dkdv", "dq")  # in launch order
_AUTOTUNED = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}
_DEFAULT_WARPS, _DEFAULT_STAGES = 4, 3  # Triton's launch defaults (the preprocess kernel is not autotuned)


@dataclass(frozen=True)
class Variant:
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True
    window: int = 0  # sliding window (keys each query sees), 0: none
    documents: bool = False

    def __str__(self) -> str:
        masks = "+".join(name for name, on in (("causal", self.causal), (f"window{self.window}", self.window),
                                               ("docs", self.documents)) if on) or "full"
        return f"d{self.head_dim} {self.dtype} {masks}"


@dataclass
class Launch:
    kernel: str  # one of KERNELS
    fn: triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@dataclass
class StaticReport:
    kernel: str
    arch: int
    variant: str
    block_m: int | None
    block_n: int | None
    num_warps: int
    num_stages: int
    shared_bytes: int
    shared_limit: int
    registers: int
    spill_stores: int  # bytes, from ptxas -v
    spill_loads: int
    stack_bytes: int
    matmul_instructions: int  # of MATMUL_INSTRUCTION[arch] in the PTX
    other_matmul_instructions: list[str]  # tensor-core instructions of the other architectures found
    async_copies: int  # asynchronous global -> shared copies in the TTGIR (cp.async / TMA)
    buffer_depths: list[int]  # leading dims of the multi-buffered shared allocations (num_stages deep)
    compile_s: float

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def pipelined(self) -> bool:
        """The tile loop's loads are asynchronous copies into shared buffers as deep as configured: at least
        ``num_stages - 1`` (what Triton allocates on sm_80; sm_90 and sm_100 allocate ``num_stages``). A
        loop of one stage has nothing to overlap."""
        if self.num_stages < 2 or self.kernel == "preprocess":
            return True
        return self.async_copies > 0 and max(self.buffer_depths, default=0) >= self.num_stages - 1

    def problems(self) -> dict[str, str]:
        """What is wrong with this compiled kernel, by kind: {} when nothing."""
        found = {}
        if not self.fits:
            found["shared memory"] = f"{self.shared_bytes} B over the {self.shared_limit} B limit"
        if self.spills:
            found["spills"] = f"{self.spill_stores} B stored, {self.spill_loads} B loaded"
        if self.kernel != "preprocess" and not self.matmul_instructions:
            found["no tensor-core matmul"] = f"no {MATMUL_INSTRUCTION[self.arch]}"
        if self.other_matmul_instructions:
            found["another architecture's matmul"] = ", ".join(self.other_matmul_instructions)
        if not self.pipelined:
            found["not pipelined"] = f"{self.async_copies} async copies, buffers {self.buffer_depths}"
        return found

    def row(self) -> dict:
        return {**asdict(self), "fits": self.fits, "spills": self.spills, "pipelined": self.pipelined,
                "problems": self.problems()}


def launches(variant: Variant, seq_len: int = 256, batch: int = 2, q_heads: int = 32, kv_heads: int = 8
             ) -> list[Launch]:
    """The kernel launches of one forward and one backward of ``variant``, as the launchers make them."""
    dtype = getattr(torch, variant.dtype)
    q = torch.zeros(batch, q_heads, seq_len, variant.head_dim, dtype=dtype)
    k = torch.zeros(batch, kv_heads, seq_len, variant.head_dim, dtype=dtype)
    v = torch.zeros_like(k)
    docs = torch.zeros(batch, seq_len, dtype=torch.int32) if variant.documents else None
    scale = 1 / math.sqrt(variant.head_dim)
    recorded: list[Launch] = []
    kernels = _compiled_kernels()
    with _recording(kernels, recorded):
        out, lse = kernels.forward(q, k, v, docs, None, variant.causal, variant.window, scale)
        kernels.backward(torch.zeros_like(out), None, q, k, v, out, lse, docs, None, variant.causal,
                         variant.window, scale)
    return recorded


@contextlib.contextmanager
def _recording(kernels, recorded: list[Launch]) -> Iterator[None]:
    """Replace the module's kernels by recorders of their launches."""
    names = {**_AUTOTUNED, "preprocess": "_bwd_preprocess_kernel"}
    originals = {kind: getattr(kernels, name) for kind, name in names.items()}

    class Recorder:
        def __init__(self, kind: str, kernel):
            self.kind, self.fn = kind, kernel.fn if isinstance(kernel, Autotuner) else kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append(Launch(self.kind, self.fn, args, kwargs))

    try:
        for kind, name in names.items():
            setattr(kernels, name, Recorder(kind, originals[kind]))
        yield
    finally:
        for kind, name in names.items():
            setattr(kernels, name, originals[kind])


def configs(kernel: str, arch: int) -> list[tuple[int | None, int | None, int, int]]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` the autotuner tries for ``kernel`` on ``arch``."""
    if kernel == "preprocess":
        return [(None, None, _DEFAULT_WARPS, _DEFAULT_STAGES)]
    return _compiled_kernels().config_table(kernel, arch // 10)


def compile_launch(launch: Launch, arch: int, config: tuple, variant: Variant) -> StaticReport:
    """Compile one launch for ``sm_<arch>`` with one autotuning config, as the runtime would, and read the result."""
    block_m, block_n, num_warps, num_stages = config
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, "num_warps": num_warps, "num_stages": num_stages}
    if block_m is not None:
        kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    started = time.perf_counter()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, which Triton prints when asked
        knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and with it the report
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    seconds = time.perf_counter() - started
    ptxas = log.getvalue()
    if "Used" not in ptxas:
        raise RuntimeError(f"ptxas printed no resource report for {launch.kernel} on sm_{arch}: {ptxas[-500:]!r}")
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return StaticReport(
        kernel=launch.kernel, arch=arch, variant=str(variant), block_m=block_m, block_n=block_n,
        num_warps=num_warps, num_stages=num_stages, shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_LIMIT[arch], registers=_number(r"Used (\d+) registers", ptxas),
        spill_stores=_number(r"(\d+) bytes spill stores", ptxas), spill_loads=_number(r"(\d+) bytes spill loads", ptxas),
        stack_bytes=_number(r"(\d+) bytes stack frame", ptxas),
        matmul_instructions=ptx.count(MATMUL_INSTRUCTION[arch]),
        other_matmul_instructions=sorted(name for a, name in MATMUL_INSTRUCTION.items() if a != arch and name in ptx),
        async_copies=len(re.findall(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local", ttgir)),
        buffer_depths=sorted({int(d) for d in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)}),
        compile_s=round(seconds, 2),
    )


def _number(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    return max(map(int, found)) if found else 0


def check(variant: Variant, arch: int, kernels: tuple[str, ...] = KERNELS,
          only_configs: slice = slice(None)) -> Iterator[StaticReport]:
    """Compile ``kernels`` of ``variant`` for ``arch``, each config (``only_configs`` of them), and report."""
    for launch in launches(variant):
        if launch.kernel in kernels:
            for config in configs(launch.kernel, arch)[only_configs]:
                yield compile_launch(launch, arch, config, variant)
