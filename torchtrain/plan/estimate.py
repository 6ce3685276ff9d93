"""A closed-form estimate of a layout's memory and step time, to prune a search before measuring.

Only :mod:`torchtrain.plan.search` uses it: the layouts that look fastest and fit here are then
measured with the fake step, whose numbers are the ones reported. The formulas (bytes per token
per block saved for the backward, bf16 compute with fp32 master weights, gradients and two Adam
moments) follow this model's blocks (see models/llama.py) and the trainer's parallelism; they are
deliberately simple and slightly pessimistic so that pruning rarely drops a layout that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchtrain.models import ModelArgs
from torchtrain.plan.schedule import backward_events, peak_in_flight
from torchtrain.plan.timing import Device, bubble_fraction, comm_seconds, group_crosses_nodes, step_time

BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp_replicate: int
    dp_shard: int
    schedule: str  # "" without pipeline parallelism
    stages_per_rank: int
    microbatch: int  # samples per forward
    num_microbatches: int  # per pipeline step (1 without pp)
    grad_accum: int
    ac_mode: str
    reshard: str

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def block_params(args: ModelArgs) -> int:
    return (args.num_params(exclude_embedding=True) - args.vocab_size * args.dim - args.dim) // args.num_layers


def activation_bytes_per_token(args: ModelArgs, tp: int, ac_mode: str) -> float:
    """Bytes one block keeps per token of a microbatch, from its forward to its backward (bf16).

    No checkpointing: the sequence-sharded residual and norm inputs (d / tp each), the gathered
    inputs of the q/k/v and gate/up projections (d each, full sequence), q, k, v, the attention
    output and its reshaped copy, and the four SwiGLU tensors (f / tp each). Full checkpointing:
    only the block's input. Other modes are counted as half of the block's activations.
    """
    kv = args.num_kv_heads * args.head_dim
    # (q, the attention output and its copy are num_heads * head_dim wide: dim, except where the head width is set)
    full = BF16 * (2 * args.dim + (2 * args.dim + 3 * args.q_dim + 2 * kv + 4 * args.ffn_dim) / tp)
    if ac_mode == "none":
        return full
    if ac_mode == "full":
        return BF16 * args.dim / tp
    return full / 2


def estimate(args: ModelArgs, layout: Layout, seq_len: int, gpu: Device, efficiency: float,
             tokens_per_gpu: float) -> tuple[float, float]:
    """(peak bytes of the busiest rank, step seconds) of ``layout``, in closed form."""
    stages = layout.pp * layout.stages_per_rank
    blocks = math.ceil(args.num_layers / stages) * layout.stages_per_rank  # blocks on the busiest rank
    head = args.vocab_size * args.dim  # embedding or output projection
    local_params = (blocks * block_params(args) + 2 * head / (1 if layout.pp == 1 else 2)) / layout.tp
    sharded = local_params / layout.dp_shard
    fsdp = layout.dp > 1
    memory = 4 * FP32 * sharded  # parameters, gradients, two Adam moments (fp32)
    if fsdp and (layout.pp > 1 or layout.reshard == "never"):
        memory += BF16 * local_params  # gathered for the whole step
        if layout.pp > 1:
            memory += FP32 * local_params  # unsharded gradients accumulated over the microbatches
    elif fsdp:
        memory += 2 * BF16 * (block_params(args) / layout.tp) + BF16 * 2 * head / layout.tp  # two blocks + root
    tokens = layout.microbatch * seq_len / layout.cp
    per_block = activation_bytes_per_token(args, layout.tp, layout.ac_mode) * tokens
    in_flight = 1
    if layout.pp > 1:
        ids = [layout.pp * k for k in range(layout.stages_per_rank)]
        if layout.schedule == "zbv":
            ids = [0, 2 * layout.pp - 1]
        most = peak_in_flight(backward_events(layout.schedule, layout.pp, 0, ids, layout.num_microbatches))
        in_flight = sum(most.values()) / layout.stages_per_rank
    memory += per_block * blocks * in_flight
    # The backward of one block (its recomputed or saved activations and their gradients), and the
    # chunked loss (its fp32 weight gradient and a chunk of logits about the hidden states' size).
    memory += 2 * activation_bytes_per_token(args, layout.tp, "none") * tokens
    memory += FP32 * head / layout.tp + 3 * FP32 * tokens * args.dim

    # Every rank does 1/world of the step's work; full checkpointing re-runs the forward (4/3).
    recompute = {"none": 1.0, "full": 4 / 3}.get(layout.ac_mode, 7 / 6)
    flops = args.flops_per_token(seq_len) * tokens_per_gpu * recompute
    microbatches = layout.grad_accum * layout.num_microbatches
    tp_bytes = 8 * 2 * BF16 * tokens * args.dim * (layout.tp - 1) / layout.tp * blocks * microbatches
    # Sequence parallel: an all-gather before and a reduce-scatter after each tensor-parallel matmul pair.
    tp_seconds = comm_seconds({"all-gather": tp_bytes * recompute / 2, "reduce-scatter": tp_bytes * recompute / 2},
                              group_crosses_nodes(1, layout.tp), gpu)
    gathers = 1 if layout.pp > 1 or layout.reshard == "never" else 2
    # Under pipelining FSDP gathers and reduces once per optimizer step; otherwise once per microbatch.
    share = (layout.dp_shard - 1) / layout.dp_shard * (1 if layout.pp > 1 else microbatches)
    fsdp_bytes = {"all-gather": gathers * BF16 * local_params * share, "reduce-scatter": FP32 * local_params * share}
    fsdp_seconds = comm_seconds(fsdp_bytes, group_crosses_nodes(layout.tp * layout.cp, layout.dp_shard), gpu)
    fsdp_seconds += comm_seconds({"all-reduce": 2 * FP32 * sharded}, True, gpu) if layout.dp_replicate > 1 else 0.0
    pp_bytes = 2 * BF16 * tokens * args.dim / layout.tp * microbatches * layout.stages_per_rank
    pp_seconds = comm_seconds({"send": pp_bytes}, True, gpu) if layout.pp > 1 else 0.0
    bubble = bubble_fraction(layout.schedule, layout.pp, layout.num_microbatches, layout.stages_per_rank)
    time = step_time(flops, 0.0, 0.0, tp_seconds, pp_seconds, fsdp_seconds, blocks + 1, bubble, gpu, efficiency)
    return memory, time.total_s
