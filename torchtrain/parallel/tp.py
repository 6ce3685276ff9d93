"""Tensor parallelism (Megatron-style) with sequence parallelism, applied to a ``Transformer`` from outside.

Within a block, the attention heads and the feed-forward hidden units are split across the ``tp``
ranks: ``wq/wk/wv`` and ``w1/w3`` are column-parallel (each rank computes its own heads / hidden
units from the full input), ``wo`` and ``w2`` are row-parallel (each rank contributes a partial sum
of the output). Between those regions, the residual stream, the RMSNorms and the embedding output
are sharded along the sequence (sequence parallelism), so the norms' work and the activations they
save are split ``tp`` ways too. The communication per block is then one all-gather of the sequence
before each of attention and feed-forward, and one reduce-scatter after each (instead of two
all-reduces without sequence parallelism: the same bytes, but 1/tp of the activations).

The output projection is vocabulary-parallel (its weight sharded by rows): the loss
(:func:`torchtrain.loss.linear_cross_entropy_sum`) sees a sharded weight and sequence-sharded hidden
states and computes the cross-entropy without ever gathering the logits or the weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

logger = logging.getLogger(__name__)

__all__ = ["apply_tp"]


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard ``model`` (a :class:`~torchtrain.models.llama.Transformer`) over the 1-D ``tp_mesh``, in place.

    Works on a model on the meta device (parameters become meta DTensors; materialise with
    ``to_empty`` and ``init_weights`` afterwards) and on a materialised one (rank 0's weights are
    scattered; the RMSNorm gains are kept as each rank has them). Apply it before activation checkpointing, ``torch.compile`` and FSDP,
    which then see DTensor parameters (FSDP shards them further over the data-parallel mesh).

    What the ranks then hold and exchange:

    * the embedding table is sharded by vocabulary rows; its output is the residual stream,
      sharded along the sequence (``Shard(1)``) as a DTensor from there on;
    * each block gathers the sequence before attention and feed-forward and reduce-scatters after;
    * the output projection's weight is sharded by vocabulary rows (``Shard(0)``). With labels, the
      model's loss is computed vocabulary-parallel from the norm's sequence-sharded output; without,
      the model returns vocabulary-sharded logits (a DTensor ``Shard(-1)``: ``full_tensor()`` them
      or use ``torch.distributed.tensor.parallel.loss_parallel``).

    A pipeline stage (``tok_embeddings`` and/or ``output`` set to ``None``) takes and returns plain
    tensors: its rank's sequence shard ``[B, S / tp, dim]`` of the hidden states.

    Gradients: two come out laid out unlike their parameters, the RMSNorm gains' ``Partial`` (each
    rank holds the sum over its sequence shard) and the embedding's ``Replicate`` (the whole table's
    gradient on every rank). FSDP, when applied on top, lays them out like the parameters before it
    reduces them; without it, gradient clipping and the optimizer still compute the right values
    (DTensor redistributes where an op needs it), at the price of those redistributions and of the
    full embedding gradient held on every rank until ``zero_grad``.

    The caller must feed every tp rank the same full ``[B, S]`` tokens, positions, document ids and
    labels, with ``S`` divisible by the tp size. Raises ``ValueError`` if the tp size does not
    divide the head counts, the feed-forward width or the vocabulary.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim}-D {tp_mesh}")
    tp = tp_mesh.size()
    args = model.args
    for name in ("num_heads", "num_kv_heads", "ffn_dim", "vocab_size"):
        if getattr(args, name) % tp:
            raise ValueError(
                f"tensor parallelism tp={tp} must divide ModelArgs.{name}={getattr(args, name)}; "
                f"choose a tp size that divides num_heads, num_kv_heads, ffn_dim and vocab_size")

    # NOTE: the embedding's output stays a DTensor (use_local_output=False), and so does the whole
    # residual stream: the model derives the RoPE rows from ``h.shape[1]``, which must be the full
    # sequence length (a DTensor's shape is global; a local shard's would be S / tp). The blocks'
    # residual adds are then DTensor + DTensor (both Shard(1)), a local add.
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                          use_local_output=False),
        "norm": SequenceParallel(),
        # NOTE: the weight is sharded Shard(0) (by vocabulary): the loss path uses it directly, so the
        # hooks of this style only run for the logits path (``model(tokens)`` without labels).
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    root_plan = {name: style for name, style in root_plan.items() if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, root_plan)
    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(_wait_for_local_shard)

    # NOTE: pipeline stages exchange plain tensors: each tp rank's sequence shard [B, S / tp, dim] of
    # the hidden states (1/tp of the activation per send). A stage without the embedding takes its
    # input as that shard and makes it the sequence-sharded DTensor the blocks expect; a stage
    # without the output projection hands its residual stream on as the local shard.
    if model.tok_embeddings is None:
        parallelize_module(model, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
            input_kwarg_layouts={}, desired_input_kwarg_layouts={}))  # kwargs (labels, positions) stay plain
    if model.output is None:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True))

    # NOTE: parallelize_module registers fresh parameters per module, which unties a shared
    # embedding/output weight; both are sharded Shard(0) over the vocabulary, so tie them again.
    if args.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        colwise, rowwise, prepare_input = _styles(block)
        block_plan = {
            "attention_norm": SequenceParallel(),
            # The block calls attention(x, rope_cos, rope_sin, document_ids): only x is sharded; the
            # RoPE rows and document ids are plain full-sequence tensors on every rank.
            "attention": prepare_input(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": colwise(),
            "attention.wk": colwise(),
            "attention.wv": colwise(),
            "attention.wo": rowwise(output_layouts=Shard(1), use_local_output=False),
            # NOTE (Qwen3's q_norm / k_norm): each normalises one head of the rank's own heads, so its gain is
            # replicated and its input is the local [B, S, heads / tp, D] q or k, sharded on the heads (dim 2).
            # SequenceParallel is exactly that style on another dim: the gain's gradient comes out Partial (each
            # rank's sum over its heads), summed over the ranks like the other norms' (FSDP or settle_gradients).
            "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "ffn_norm": SequenceParallel(),
            "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(),
            "feed_forward.w3": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1), use_local_output=False),
        }
        # NOTE: PrepareModuleInput keeps the gathered input a Replicate DTensor (use_local_output=False)
        # so that in the backward the partial input-gradients of wq, wk and wv (w1 and w3) are summed
        # first and reduce-scattered once. With local inputs each projection's would be all-reduced
        # (counted with CommDebugMode: 3 all-reduces instead of 1 reduce-scatter per attention).
        # (modules the model leaves out, as q_norm / k_norm outside Qwen3, are None: nothing to place)
        parallelize_module(block, tp_mesh, {name: style for name, style in block_plan.items()
                                            if _submodule(block, name) is not None})

    # NOTE: a parameter that no style placed (a new norm or bias) would stay a plain tensor on every rank,
    # receive a different gradient on each and drift apart: refuse it.
    missed = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
    if missed:
        raise ValueError(f"the tensor-parallel plan (torchtrain/parallel/tp.py) places no layout on {missed}; "
                         "add their modules to the plan")
    logger.info("tensor parallel: tp=%d, sequence parallel, vocabulary-parallel output and loss "
                "(%s, %d blocks)", tp, ", ".join(root_plan) or "no root modules", len(model.layers))


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    for part in name.split("."):
        module = getattr(module, part, None)
    return module


def settle_gradients(params: list[torch.Tensor]) -> None:
    """Give every DTensor gradient its parameter's placements (once per step, before anything reads them).

    NOTE: FSDP does this in its reduction; without FSDP, torch's sharding rules leave two kinds of
    tensor-parallel gradients laid out otherwise than their parameters. A norm's weight gradient
    (sequence parallel: each tp rank's sum over its own tokens) is ``Partial``, and every op reading
    it (the gradient norm, each of AdamW's) would all-reduce it again; the vocabulary-sharded
    embedding's is ``Replicate``, the whole table's gradient on every rank (DTensor's embedding
    backward has no vocabulary-sharded rule). The Partial ones are summed in one all-reduce of a
    flat buffer per mesh; a Replicate one is cut to the rank's shard, locally.
    """
    partial: dict[DeviceMesh, list[torch.Tensor]] = {}
    for p in params:
        grad = p.grad
        if not isinstance(grad, DTensor) or grad.placements == p.placements:
            continue
        placement = grad.placements[0] if grad.device_mesh.ndim == 1 else None
        if isinstance(placement, Partial) and placement.reduce_op == "sum" and isinstance(p.placements[0], Replicate):
            partial.setdefault(grad.device_mesh, []).append(p)
        else:
            p.grad = grad.redistribute(p.device_mesh, p.placements)
    for mesh, group in partial.items():
        locals_ = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in locals_])
        torch.distributed.all_reduce(flat, group=mesh.get_group())
        for p, local, piece in zip(group, locals_, flat.split([t.numel() for t in locals_])):
            p.grad = DTensor.from_local(piece.view_as(local), mesh, p.placements, run_check=False)


def _wait_for_local_shard(module: nn.Module, inputs, out: DTensor) -> DTensor:
    """The embedding's output with its reduce-scatter waited for: a DTensor over a plain local tensor.

    NOTE: RowwiseParallel leaves the local shard an AsyncCollectiveTensor (the reduce-scatter still in
    flight). The first compiled block is traced with that subclass inside the DTensor, and the same
    compiled code is then called by the next block with a plain local tensor (a compiled block's
    output): under inductor its unwrapping code reads the subclass's ``elem`` and fails
    (AttributeError: 'Tensor' object has no attribute 'elem', torch 2.13). The first block needs
    the values at once anyway, so waiting here costs nothing.
    """
    local = out.to_local()
    if not isinstance(local, AsyncCollectiveTensor):
        return out
    # wait_tensor on the wrapper (not on its inner tensor) stays on the autograd graph: the
    # embedding's gradient flows back through it
    return DTensor.from_local(torch.ops._c10d_functional.wait_tensor(local), out.device_mesh, out.placements,
                              run_check=False, shape=out.shape, stride=out.stride())


def _styles(block: nn.Module) -> tuple[type, type, type]:
    """The column-parallel, row-parallel and input-preparing styles for ``block``'s linear layers.

    NOTE: a block converted to float8 (``parallel/float8.py``, tensorwise scaling) uses torchao's float8
    styles: they cast an input to float8 once, with a scale from the whole (not the local) tensor, before
    it is all-gathered (half the bytes of bf16), and do the same for the output gradients in the
    backward, so every rank's float8 matmuls round exactly as one process's would.
    """
    if not all(type(m).__name__ == "Float8Linear" for m in block.modules() if isinstance(m, nn.Linear)):
        return ColwiseParallel, RowwiseParallel, PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
