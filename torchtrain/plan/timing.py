"""The step-time model: FLOPs, bytes and a schedule in; seconds, tokens/s per device and MFU out.

Its rates come from a :class:`Device`: either a spec sheet (the GPU table, :data:`GPUS`) or a
profile measured on the machine itself (``bench/plan_time.py`` measures the CPU's matmul rate and
gloo's rate per collective and checks the model's step times against real runs). Every constant
below is named and documented; none was fitted to a GPU row it is compared with (no GPU has run
this code; see docs/plan.md):

* **compute** = the FLOPs the rank executes (recomputation included) / (the device's peak x
  ``efficiency``), attention's at the device's attention rate where it has one (a measured
  profile). For a spec sheet, ``efficiency`` (default :data:`DEFAULT_EFFICIENCY`,
  ``--efficiency``) is the achieved fraction of the bf16 peak over the whole step's kernels,
  matmuls and the rest: an assumption. For a measured profile the peak *is* the matmul rate the
  device achieved on the model's own GEMM shapes, and attention runs at the rate its kernel
  achieved on the model's attention shape, so the efficiency is :data:`MEASURED_EFFICIENCY`; the
  ops that do neither (norms, activations, the loss's softmax, the optimizer, copies) add their
  bytes read and written (counters.py) at the profile's measured memory rate;
* **communication** = wire bytes per rank, per collective kind / that kind's rate. From a spec
  sheet every kind runs at the link's bandwidth x :data:`LINK_EFFICIENCY`: NVLink for a group
  whose ranks sit in one node of :data:`GPUS_PER_NODE`, otherwise InfiniBand (one NIC per GPU, as
  in DGX/HGX systems). A measured profile gives a rate per kind (gloo's all-reduce, all-gather,
  reduce-scatter and point-to-point differ by up to 3x on a CPU);
* **overlap**: on a device that overlaps collectives with compute (GPUs: NCCL runs on its own
  stream), FSDP's all-gathers and reduce-scatters (and HSDP's all-reduce) hide behind the blocks'
  compute, except the first all-gather and the last reduce-scatter of a step (one unit each), and
  whatever exceeds the compute. They are the traffic of FSDP's own mesh: ``dp_shard_cp`` (dp_shard x
  cp flattened, what FSDP shards over) and ``dp_replicate`` (see planner.FSDP_DIMS). On a device
  that does not (``overlaps_collectives=False``: gloo on a CPU copies with the same cores that
  compute), all of it is exposed. Tensor-parallel and context-parallel collectives sit between the
  matmuls that need them and are counted as exposed everywhere, as are the loss's and gradient
  norm's small all-reduces (``dp``, ``dp_cp``), and pipeline sends. A flattened group's ranks are
  its innermost part's stride apart (planner.dimension_spans), which decides NVLink or network.
* **pipeline bubble**: idle fraction ``(pp - 1) / microbatches`` of the busy time for gpipe and
  1f1b, divided by the stages per rank for the interleaved schedules, and by a further
  :data:`ZERO_BUBBLE_FILL` for the zero-bubble ones (their deferred weight passes fill most of the
  rest; an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtrain.parallel.pp import ZERO_BUBBLE_SCHEDULES

GPUS_PER_NODE = 8
DEFAULT_EFFICIENCY = 0.5  # achieved fraction of the bf16 peak: an assumption, not a measurement
MEASURED_EFFICIENCY = 1.0  # a measured profile's rate is already what the matmuls achieve
LINK_EFFICIENCY = 0.8  # achieved fraction of a link's bandwidth by NCCL rings (typical bus bandwidth)
ZERO_BUBBLE_FILL = 3  # zero-bubble schedules leave this much less bubble than interleaved 1F1B
# What a training process can allocate of a GPU: less the CUDA context and the allocator's
# fragmentation, which the tracker (live tensors only) does not see. NOTE: a rule of thumb for
# PyTorch on these GPUs, not a measurement.
USABLE_MEMORY_FRACTION = 0.95
CONTEXT_BYTES = 2**30

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "send")  # as counters.py records them


@dataclass(frozen=True)
class Device:
    """What the step-time model needs of one accelerator (or of one process's share of a CPU)."""

    name: str
    memory_bytes: float  # capacity as sold
    peak_flops: float  # dense peak of the training dtype (bf16 on GPUs, no sparsity), or a measured matmul rate
    intra_node_bytes_per_s: float  # per device, one direction (NVLink)
    inter_node_bytes_per_s: float  # per device across nodes (InfiniBand / RoCE NIC), one direction
    # A measured profile's achieved rate of wire bytes per collective kind (all of COLLECTIVE_KINDS);
    # None: every kind at the link's bandwidth x LINK_EFFICIENCY.
    collective_bytes_per_s: tuple[tuple[str, float], ...] | None = None
    overlaps_collectives: bool = True
    # A measured profile's rate of the attention kernels, FLOPs counted as the planner counts them
    # (full score matrix); None: the same rate as the matmuls.
    attention_flops: float | None = None
    # A measured profile's rate of memory traffic for the ops without a FLOP formula (norms,
    # activations, the optimizer: counters.py); None: their time is part of the efficiency.
    memory_bytes_per_s: float | None = None

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * USABLE_MEMORY_FRACTION - CONTEXT_BYTES

    def bytes_per_second(self, kind: str, crosses_nodes: bool) -> float:
        if self.collective_bytes_per_s is not None:
            return dict(self.collective_bytes_per_s)[kind]
        return (self.inter_node_bytes_per_s if crosses_nodes else self.intra_node_bytes_per_s) * LINK_EFFICIENCY


def measured_device(name: str, memory_bytes: float, matmul_flops: float, attention_flops: float,
                    memory_bytes_per_s: float, collective_bytes_per_s: dict[str, float],
                    overlaps_collectives: bool) -> Device:
    """A device whose rates were measured on the machine (see bench/plan_time.py): plan it with
    :data:`MEASURED_EFFICIENCY`. Its collectives run at the measured rates whatever the group's span."""
    missing = set(COLLECTIVE_KINDS) - set(collective_bytes_per_s)
    if missing:
        raise ValueError(f"measured profile {name!r} lacks a rate for {', '.join(sorted(missing))}")
    rates = tuple((kind, float(collective_bytes_per_s[kind])) for kind in COLLECTIVE_KINDS)
    # The link figures are not read when per-kind rates are given; the slowest rate stands in for them.
    slowest = min(rate for _, rate in rates)
    return Device(name, memory_bytes, matmul_flops, slowest, slowest, rates, overlaps_collectives, attention_flops,
                  memory_bytes_per_s)


GPUS = {
    "a100-80g": Device("a100-80g", 80 * 2**30, 312e12, 300e9, 25e9),  # NVLink3 600 GB/s bidirectional; HDR 200 Gb/s
    "h100": Device("h100", 80 * 2**30, 989e12, 450e9, 50e9),  # SXM: NVLink4 900 GB/s bidirectional; NDR 400 Gb/s
    "h200": Device("h200", 141e9, 989e12, 450e9, 50e9),
    "b200": Device("b200", 180e9, 2250e12, 900e9, 50e9),  # NVLink5 1.8 TB/s bidirectional
}


def gpu_named(name: str) -> Device:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not in the table; valid choices: {', '.join(GPUS)}")
    return GPUS[name]


def group_crosses_nodes(stride: int, size: int) -> bool:
    """Whether ranks ``r, r + stride, ..., r + (size - 1) * stride`` span more than one node."""
    return size > 1 and stride * size > GPUS_PER_NODE


def comm_seconds(wire_bytes: dict[str, float], crosses_nodes: bool, device: Device) -> float:
    """Seconds to send ``wire_bytes`` (per collective kind, one rank's share) over a group."""
    return sum(nbytes / device.bytes_per_second(kind, crosses_nodes) for kind, nbytes in wire_bytes.items()
               if nbytes)


def bubble_fraction(schedule: str, pp: int, num_microbatches: int, stages_per_rank: int) -> float:
    """Idle time of the pipeline as a fraction of the busiest rank's compute."""
    if pp <= 1:
        return 0.0
    # Interleaved schedules (several stages per rank) cut it by their stages per rank, and the zero-bubble
    # ones fill two thirds of what is left with the weight-gradient passes.
    bubble = (pp - 1) / num_microbatches / stages_per_rank
    if schedule in ZERO_BUBBLE_SCHEDULES:
        bubble /= ZERO_BUBBLE_FILL
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


def step_time(flops: float, attention_flops: float, memory_traffic: float, tp_seconds: float, pp_seconds: float,
              fsdp_seconds: float, fsdp_units: int, bubble: float, device: Device, efficiency: float) -> StepTime:
    """Seconds of one optimizer step on the busiest rank (see the module docstring)."""
    attention_rate = device.attention_flops or device.peak_flops
    compute = ((flops - attention_flops) / device.peak_flops + attention_flops / attention_rate) / efficiency
    if device.memory_bytes_per_s:
        compute += memory_traffic / device.memory_bytes_per_s
    if device.overlaps_collectives:
        # The first all-gather and the last reduce-scatter of a step have nothing to hide behind:
        # about 1 / fsdp_units of each direction's traffic (FSDP units: the blocks and the root).
        edges = fsdp_seconds / max(fsdp_units, 1)
        exposed_fsdp = edges + max(0.0, fsdp_seconds - edges - compute)
    else:
        exposed_fsdp = fsdp_seconds
    busy = compute + tp_seconds + pp_seconds
    return StepTime(compute, tp_seconds, pp_seconds, fsdp_seconds, exposed_fsdp, busy * bubble)
