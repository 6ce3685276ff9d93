"""The planner's traffic and work per step against counts made by hand, one layout of each family.

For each layout the planner's bytes on the wire per mesh dimension are compared with a count
from the model's parameter sizes (FSDP, HSDP) or its activation shape (TP's sequence-parallel
collectives), and its step time with the classification the time model documents
(plan/timing.py): FSDP's and HSDP's collectives overlap the compute, everything else but the
pipeline's sends is exposed. The debug model on the GPU target (bf16 parameters for compute,
fp32 gradient reduction), traced block by block. Then the work a CPU plan counts (FLOPs by the
model's formula, attention's apart; the update's memory traffic) and how a measured device times it.
"""

import dataclasses

import pytest
import torch

from torchtrain.config import load_config
from torchtrain.models import Transformer
from torchtrain.models.shape import model_args_for
from torchtrain.parallel import ParallelDims
from torchtrain.parallel.pp import split_layers
from torchtrain.plan.cli import planning_config
from torchtrain.plan.fake_step import Target, gpu_model_args
from torchtrain.plan.planner import FSDP_DIMS, dimension_spans, on_gpu, plan_layout
from torchtrain.plan.timing import GPUS, LINK_EFFICIENCY, MEASURED_EFFICIENCY, measured_device

REPO_RECIPE = "recipes/debug.toml"
BATCH, SEQ = 2, 128
BF16, FP32 = 2, 4
H100 = GPUS["h100"]


def plan(world_size: int, *overrides: str, num_layers: int | None = None):
    config = planning_config(load_config(REPO_RECIPE, [f"--training.seq_len={SEQ}",
                                                       f"--training.local_batch_size={BATCH}", *overrides]))
    args = gpu_model_args(config)
    if num_layers is not None:
        args = dataclasses.replace(args, num_layers=num_layers)
    return plan_layout(config, args, world_size, H100, 0.5, exact=True), args


def parameter_counts(args, tp: int = 1) -> tuple[int, list[int]]:
    """(root, [each block]) parameters one rank holds before FSDP shards them: tensor parallelism
    splits every matrix (projections, embedding, output) and replicates the norms' vectors."""
    with torch.device("meta"):
        model = Transformer(args)

    def held(params) -> int:
        return sum(p.numel() // tp if p.dim() == 2 else p.numel() for p in params)

    blocks = [held(block.parameters()) for block in model.layers.values()]
    root = held(p for name, p in model.named_parameters() if not name.startswith("layers."))
    return root, blocks


def wire(bytes_full: float, group: int) -> float:
    """What one rank sends in a ring all-gather or reduce-scatter of a ``bytes_full`` tensor."""
    return bytes_full * (group - 1) / group


def fsdp_default(root: int, blocks: list[int], group: int) -> dict[str, float]:
    """FSDP with the default resharding: every unit gathered for the forward, every block but the
    last again for the backward (the root and the last block stay gathered); every unit's gradient
    reduce-scattered once."""
    gathered = root + sum(blocks) + sum(blocks[:-1])
    return {"all-gather": wire(gathered * BF16, group), "reduce-scatter": wire((root + sum(blocks)) * FP32, group)}


def seconds(nbytes: float) -> float:
    return nbytes / (H100.intra_node_bytes_per_s * LINK_EFFICIENCY)  # every group here sits in one node


def check_volumes(comm, dim: str, group: int, expected: dict[str, float]) -> None:
    volume = comm[dim]
    assert volume.group_size == group, (dim, volume.group_size)
    for kind, nbytes in expected.items():
        assert volume.wire_bytes[kind] == pytest.approx(nbytes, rel=1e-6), (dim, kind)


def check_classification(role, fsdp_bytes: float, exposed_bytes: float) -> None:
    # The small all-reduces (gradient norm, norms' Partial gradients) are left out of the hand counts.
    assert role.time.fsdp_s == pytest.approx(seconds(fsdp_bytes), rel=0.01)
    assert role.time.tp_s == pytest.approx(seconds(exposed_bytes), rel=0.01)


def test_fsdp_gathers_each_unit_for_the_forward_and_the_blocks_again_for_the_backward():
    p, args = plan(2, "--parallelism.dp_shard=2")
    root, blocks = parameter_counts(args)
    expected = fsdp_default(root, blocks, 2)
    (role,) = p.roles
    (dim,) = [d for d in role.comm_per_step if d in FSDP_DIMS]
    check_volumes(role.comm_per_step, dim, 2, expected)
    check_classification(role, sum(expected.values()), 0)


def test_fsdp_over_dp_shard_and_cp_is_named_and_overlapped():
    p, args = plan(4, "--parallelism.dp_shard=2", "--parallelism.cp=2")
    root, blocks = parameter_counts(args)
    expected = fsdp_default(root, blocks, 4)  # the cp ranks hold the same parameters: FSDP shards over 4
    (role,) = p.roles
    assert not [d for d in role.comm_per_step if d.startswith("group of")]
    check_volumes(role.comm_per_step, "dp_shard_cp", 4, expected)
    # all-gather CP: each block gathers its keys and values (and the keys' document ids, int32) in the
    # forward and reduce-scatters their gradients in the backward
    kv, document_ids = 2 * BATCH * SEQ * args.num_kv_heads * args.head_dim * BF16, BATCH * SEQ * 4
    cp = {"all-gather": wire(kv + document_ids, 2) * args.num_layers, "reduce-scatter": wire(kv, 2) * args.num_layers}
    check_volumes(role.comm_per_step, "cp", 2, cp)
    check_classification(role, sum(expected.values()), sum(cp.values()))


def test_fsdp_with_tp_shards_what_tp_holds_and_tp_moves_activations_per_block():
    # TP's sequence-parallel collectives per block, as the difference of a 4- and a 2-block model:
    # the forward gathers the two norms' outputs and reduce-scatters the two projections' outputs,
    # the backward the other way round, each a [B, S, dim] tensor (bf16: FSDP casts the parameters).
    two, _ = plan(4, "--parallelism.dp_shard=2", "--parallelism.tp=2", num_layers=2)
    four, args = plan(4, "--parallelism.dp_shard=2", "--parallelism.tp=2")
    root, blocks = parameter_counts(args, tp=2)
    expected = fsdp_default(root, blocks, 2)
    (role,), (role_two,) = four.roles, two.roles
    check_volumes(role.comm_per_step, "dp_shard_cp", 2, expected)
    hidden = BATCH * SEQ * args.dim * BF16
    for kind in ("all-gather", "reduce-scatter"):
        per_block = (role.comm_per_step["tp"].wire_bytes[kind] - role_two.comm_per_step["tp"].wire_bytes[kind]) / 2
        assert per_block == pytest.approx(4 * wire(hidden, 2), rel=1e-6), kind
    tp = role.comm_per_step["tp"]
    check_classification(role, sum(expected.values()), tp.wire_bytes["all-gather"] + tp.wire_bytes["reduce-scatter"])


def test_hsdp_shards_within_a_group_and_all_reduces_the_shards_across_groups():
    p, args = plan(4, "--parallelism.dp_replicate=2", "--parallelism.dp_shard=2")
    root, blocks = parameter_counts(args)
    expected = fsdp_default(root, blocks, 2)
    (role,) = p.roles
    check_volumes(role.comm_per_step, "dp_shard_cp", 2, expected)
    shard = (root + sum(blocks)) / 2 * FP32
    replicate = {"all-reduce": 2 * wire(shard, 2)}  # a ring all-reduce: a reduce-scatter and an all-gather
    check_volumes(role.comm_per_step, "dp_replicate", 2, replicate)
    check_classification(role, sum(expected.values()) + replicate["all-reduce"], 0)


def test_pipelined_fsdp_gathers_once_and_reduces_once_per_step():
    p, args = plan(4, "--parallelism.pp=2", "--parallelism.dp_shard=2")
    with torch.device("meta"):
        model = Transformer(args)
    ends = [("tok_embeddings.",), ("norm.", "output.")]  # the trainer's split: fewer blocks on the last stage
    stage_params = [sum(p.numel() for n, p in model.named_parameters()
                        if n.startswith(end) or any(n.startswith(f"layers.{i}.") for i in ids))
                    for end, ids in zip(ends, split_layers(args, 2, seq_len=SEQ), strict=True)]
    for role, params in zip(p.roles, stage_params, strict=True):
        expected = {"all-gather": wire(params * BF16, 2), "reduce-scatter": wire(params * FP32, 2)}
        check_volumes(role.comm_per_step, "dp_shard_cp", 2, expected)
        assert role.time.fsdp_s == pytest.approx(seconds(sum(expected.values())), rel=0.01)
        assert role.time.pp_s > 0 and role.time.tp_s == pytest.approx(0, abs=1e-9)


def test_flattened_dimensions_span_their_parts_ranks():
    # pp 2, dp_shard 4, cp 2, tp 2: tp neighbours 1 apart, cp 2, dp_shard 4, pp 32
    dims = ParallelDims(pp=2, dp_replicate=1, dp_shard=4, cp=2, tp=2)
    strides, sizes = dimension_spans(dims)
    assert (strides["tp"], strides["cp"], strides["dp_shard"], strides["pp"]) == (1, 2, 4, 16)
    assert (strides["dp_shard_cp"], sizes["dp_shard_cp"]) == (2, 8)  # ranks 0, 2, ..., 14: two nodes of 8
    assert (strides["dp"], sizes["dp"]) == (4, 4)
    assert (strides["dp_cp"], sizes["dp_cp"]) == (2, 8)


def cpu_plan(world_size: int, *overrides: str):
    config = planning_config(load_config(REPO_RECIPE, [f"--training.seq_len={SEQ}",
                                                       f"--training.local_batch_size={BATCH}", *overrides]))
    args = model_args_for(config, torch.device("cpu"))
    return plan_layout(config, args, world_size, H100, 0.5, target=Target("cpu", torch.float32), exact=True), args


def test_a_cpu_plan_counts_the_flops_of_the_model_formula_with_attention_apart():
    # On CPU the sdpa backend runs ATen's CPU flash kernel, whose FLOPs torch's registry does not know.
    p, args = cpu_plan(1)
    assert args.attention == "sdpa"
    (role,) = p.roles
    tokens = BATCH * SEQ
    with torch.device("meta"):
        model = Transformer(args)
    matrices = sum(q.numel() for name, q in model.named_parameters() if q.dim() == 2 and "tok_embeddings" not in name)
    # Attention executed per layer and token: QKᵀ and PV forward (2 · 2·s·d); backward, QKᵀ again (a
    # flash kernel recomputes the scores) and the four gradient products (5 · 2·s·d).
    attention = 14 * args.num_layers * args.dim * SEQ * tokens
    assert role.attention_flops_per_step == attention
    assert role.flops_per_step == 6 * matrices * tokens + attention


def test_the_update_moves_at_least_what_adamw_reads_and_writes():
    p, args = cpu_plan(1)
    (role,) = p.roles
    with torch.device("meta"):
        params = sum(q.numel() for q in Transformer(args).parameters())
    adamw = 7 * FP32 * params  # reads parameter, gradient and both moments; writes parameter and moments
    # The update is measured once per step, the rest per microbatch: two microbatches add the latter twice.
    accumulated, _ = cpu_plan(1, "--training.grad_accum_steps=2")
    update = 2 * role.memory_traffic_per_step - accumulated.roles[0].memory_traffic_per_step
    assert adamw <= update <= 2 * adamw


def test_a_measured_device_times_each_kind_at_its_rate_and_hides_nothing_without_overlap():
    rates = {"all-gather": 1e9, "reduce-scatter": 0.5e9, "all-reduce": 2e9, "send": 1.5e9}
    cpu = measured_device("cpu", 2**34, 100e9, 50e9, 20e9, rates, overlaps_collectives=False)
    p, _ = plan(2, "--parallelism.dp_shard=2")
    (role,) = on_gpu(dataclasses.replace(p, efficiency=MEASURED_EFFICIENCY), cpu).roles
    matmul = role.flops_per_step - role.attention_flops_per_step
    assert role.time.compute_s == pytest.approx(matmul / 100e9 + role.attention_flops_per_step / 50e9
                                                + role.memory_traffic_per_step / 20e9)
    (dim,) = [d for d in role.comm_per_step if d in FSDP_DIMS]
    fsdp = role.comm_per_step[dim].wire_bytes
    assert role.time.fsdp_s == pytest.approx(sum(nbytes / rates[kind] for kind, nbytes in fsdp.items()))
    assert role.time.exposed_fsdp_s == role.time.fsdp_s
    # The same work on an H100 (a spec sheet: overlapped, memory traffic inside the efficiency).
    (h100,) = p.roles
    assert h100.time.exposed_fsdp_s < h100.time.fsdp_s
    assert h100.time.compute_s == pytest.approx(h100.flops_per_step / (H100.peak_flops * 0.5))
