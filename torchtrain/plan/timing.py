"""The step-time model: FLOPs, bytes and a schedule in; seconds, tokens/s per GPU and MFU out.

It is deliberately small, and every constant in it is an assumption until measured on the GPU
in question (nothing here was calibrated on a GPU; see docs/plan.md):

* **compute** = the FLOPs the rank executes (recomputation included) / (dense bf16 peak x
  ``efficiency``). ``efficiency`` (default :data:`DEFAULT_EFFICIENCY`, ``--efficiency``) is the
  achieved fraction of the peak over the whole step's kernels, matmuls and the rest;
* **communication** = wire bytes per rank / the link's bandwidth x :data:`LINK_EFFICIENCY`.
  A group whose ranks sit in one node of :data:`GPUS_PER_NODE` uses NVLink, otherwise InfiniBand
  (one NIC per GPU, as in DGX/HGX systems);
* **overlap**: FSDP's all-gathers and reduce-scatters (and HSDP's all-reduce) run on their own
  stream behind the blocks' compute, except the first all-gather and the last reduce-scatter of a
  step (one unit each), and whatever exceeds the compute. They are the traffic of FSDP's own mesh:
  ``dp_shard_cp`` (dp_shard x cp flattened, what FSDP shards over) and ``dp_replicate`` (see
  planner.FSDP_DIMS). Tensor-parallel and context-parallel collectives sit between the matmuls that
  need them and are counted as exposed, as are the loss's and gradient norm's small all-reduces
  (``dp``, ``dp_cp``). Pipeline sends are counted as exposed. A flattened group's ranks are its
  innermost part's stride apart (planner.dimension_spans), which decides NVLink or network.
* **pipeline bubble**: idle fraction ``(pp - 1) / microbatches`` of the compute for gpipe and
  1f1b, divided by the stages per rank for the interleaved schedules, and by a further 3 for the
  zero-bubble ones (their deferred weight passes fill most of the rest; an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtrain.parallel.pp import ZERO_BUBBLE_SCHEDULES

GPUS_PER_NODE = 8
DEFAULT_EFFICIENCY = 0.5  # achieved fraction of the bf16 peak: an assumption, not a measurement
LINK_EFFICIENCY = 0.8  # achieved fraction of a link's bandwidth by NCCL rings (typical bus bandwidth)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float  # capacity as sold
    bf16_flops: float  # dense peak, no sparsity
    nvlink_bytes_per_s: float  # per GPU, one direction
    network_bytes_per_s: float  # per GPU across nodes (InfiniBand / RoCE NIC), one direction

    @property
    def usable_memory_bytes(self) -> float:
        """What a training process can allocate: less the CUDA context and the allocator's
        fragmentation, which the tracker (live tensors only) does not see. NOTE: 1 GiB + 5% is a
        rule of thumb for PyTorch on these GPUs, not a measurement."""
        return self.memory_bytes * 0.95 - 2**30


GPUS = {
    "a100-80g": GPU("a100-80g", 80 * 2**30, 312e12, 300e9, 25e9),  # NVLink3 600 GB/s bidirectional; HDR 200 Gb/s
    "h100": GPU("h100", 80 * 2**30, 989e12, 450e9, 50e9),  # SXM: NVLink4 900 GB/s bidirectional; NDR 400 Gb/s
    "h200": GPU("h200", 141e9, 989e12, 450e9, 50e9),
    "b200": GPU("b200", 180e9, 2250e12, 900e9, 50e9),  # NVLink5 1.8 TB/s bidirectional
}


def gpu_named(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not in the table; valid choices: {', '.join(GPUS)}")
    return GPUS[name]


def group_crosses_nodes(stride: int, size: int) -> bool:
    """Whether ranks ``r, r + stride, ..., r + (size - 1) * stride`` span more than one node."""
    return size > 1 and stride * size > GPUS_PER_NODE


def comm_seconds(wire_bytes: float, crosses_nodes: bool, gpu: GPU) -> float:
    bandwidth = gpu.network_bytes_per_s if crosses_nodes else gpu.nvlink_bytes_per_s
    return wire_bytes / (bandwidth * LINK_EFFICIENCY)


def bubble_fraction(schedule: str, pp: int, num_microbatches: int, stages_per_rank: int) -> float:
    """Idle time of the pipeline as a fraction of the busiest rank's compute."""
    if pp <= 1:
        return 0.0
    # Interleaved schedules (several stages per rank) cut it by their stages per rank, and the zero-bubble
    # ones fill two thirds of what is left with the weight-gradient passes.
    bubble = (pp - 1) / num_microbatches / stages_per_rank
    if schedule in ZERO_BUBBLE_SCHEDULES:
        bubble /= 3
    return bubble


@dataclass
class StepTime:
    compute_s: float
    tp_s: float  # exposed
    pp_s: float  # exposed
    fsdp_s: float  # total; exposed_fsdp_s of it is not hidden
    exposed_fsdp_s: float
    bubble_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_s + self.pp_s + self.exposed_fsdp_s + self.bubble_s


def step_time(flops: float, tp_seconds: float, pp_seconds: float, fsdp_seconds: float, fsdp_units: int,
              bubble: float, gpu: GPU, efficiency: float) -> StepTime:
    """Seconds of one optimizer step on the busiest rank (see the module docstring)."""
    compute = flops / (gpu.bf16_flops * efficiency)
    # The first all-gather and the last reduce-scatter of a step have nothing to hide behind:
    # about 1 / fsdp_units of each direction's traffic (FSDP units: the blocks and the root).
    edges = fsdp_seconds / max(fsdp_units, 1)
    exposed_fsdp = edges + max(0.0, fsdp_seconds - edges - compute)
    busy = compute + tp_seconds + pp_seconds
    return StepTime(compute, tp_seconds, pp_seconds, fsdp_seconds, exposed_fsdp, busy * bubble)
