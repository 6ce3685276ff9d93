"""Tensor parallelism on 2 ranks (gloo, fp32) against one process: the loss and every gradient.

Run by tests/test_tp.py as ``torchrun --nproc_per_node=2 tests/workers/tp_parity.py CASE...``; each
CASE is checked in turn (the process start-up is the expensive part on a small CPU):

* ``loss``: ``linear_cross_entropy_sum`` with DTensor inputs (sequence-sharded or replicated hidden
  states, vocabulary-sharded weight) against the plain one, in fp64, over several chunks;
* ``eager``, ``docs``, ``tied``, ``ac``, ``compile``, ``ac_compile``, ``fsdp``: the debug Transformer
  (GQA) made tensor-parallel on the meta device, loaded with a single-process reference's weights,
  against that reference: plain, with packed documents, with a tied embedding and biases, with
  checkpointed blocks (full and selective), compiled blocks (fullgraph), both, and with FSDP2 over a
  2-D (dp, tp) mesh;
* ``stages``: two pipeline stages (no output projection / no embedding) on the same tp ranks, run by
  hand as a schedule would, handing a plain sequence shard from one to the other;
* ``validate``: apply_tp names the model dimension the tp size does not divide.

Rank 0 prints one ``ok CASE ...`` line per case; any mismatch raises.
"""

import contextlib
import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from torchtrain import loss as loss_module
from torchtrain.loss import IGNORE_INDEX, linear_cross_entropy_sum
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.tp import apply_tp, settle_gradients

WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
# NOTE: aot_eager runs what meets DTensor under torch.compile (dynamo's fullgraph trace through the TP
# hooks, AOTAutograd's forward/backward split) in seconds; inductor, the trainer's default, also works
# (TP_COMPILE_BACKEND=inductor) but compiling takes ~50 s on 2 CPU cores.
COMPILE_BACKEND = os.environ.get("TP_COMPILE_BACKEND", "aot_eager")


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    """Equal up to ``rtol`` relative to the largest magnitude of ``expected`` (fp32 sums reorder)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def check_loss_parallel(mesh) -> None:
    loss_module.MIN_CHUNK_ELEMENTS = 64  # several chunks: vocab shard 48 > dim 8, ~6 chunks
    g = torch.Generator().manual_seed(0)
    batch, seq, dim, vocab = 3, 10, 8, 96
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7] = IGNORE_INDEX
    labels[1, 3] = vocab - 1  # targets in both shards, at their edges
    labels[1, 4] = vocab // 2
    labels[1, 5] = vocab // 2 - 1

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = linear_cross_entropy_sum(h_ref, w_ref, labels)
    (expected * 0.37).backward()

    # Sequence-sharded (the final norm's output), replicated, a plain full tensor on every rank, and
    # flattened tokens sharded along their one token dimension.
    for layout in ("Shard(1)", "Replicate", "plain", "flat Shard(0)"):
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        full, targets = hidden, labels
        if layout == "flat Shard(0)":
            full, targets = hidden.flatten(0, 1), labels.flatten()
        if layout == "plain":
            h = full.clone().requires_grad_()
        else:
            placement = {"Shard(1)": Shard(1), "Replicate": Replicate(), "flat Shard(0)": Shard(0)}[layout]
            h = distribute_tensor(full, mesh, [placement]).requires_grad_()
        got = linear_cross_entropy_sum(h, w, targets)
        assert type(got) is torch.Tensor and got.dim() == 0, type(got)
        (got * 0.37).backward()
        close(got, expected.detach(), f"loss ({layout})", 1e-12)
        grad_h = h.grad.full_tensor() if isinstance(h.grad, DTensor) else h.grad
        if layout != "plain":
            assert h.grad.placements == h.placements, h.grad.placements
        close(grad_h.view_as(hidden), h_ref.grad, f"grad hidden ({layout})", 1e-12)
        assert w.grad.placements == (Shard(0),)
        close(w.grad.full_tensor(), w_ref.grad, f"grad weight ({layout})", 1e-12)
        with torch.no_grad():
            close(linear_cross_entropy_sum(h, w, targets), expected.detach(), f"no-grad loss ({layout})", 1e-12)
    # Only the weight needs a gradient (a frozen trunk): the same weight gradient.
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    (linear_cross_entropy_sum(distribute_tensor(hidden, mesh, [Shard(1)]), w, labels) * 0.37).backward()
    close(w.grad.full_tensor(), w_ref.grad, "grad weight (frozen hidden)", 1e-12)
    # Misuse is named, not silently wrong.
    for bad_weight, bad_hidden, bad_labels, message in [
        (distribute_tensor(weight, mesh, [Shard(1)]), hidden, labels, "must be sharded Shard(0)"),
        (w, distribute_tensor(hidden, mesh, [Shard(2)]), labels, "sharded evenly along a token dimension"),
        (w, distribute_tensor(hidden, mesh, [Shard(1)]), labels[:, :4], "labels must be a plain tensor of the full"),
        (weight, distribute_tensor(hidden, mesh, [Shard(1)]), labels, "hidden is a DTensor but weight is not"),
    ]:
        try:
            linear_cross_entropy_sum(bad_hidden, bad_weight, bad_labels)
        except ValueError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"no ValueError for: {message}")
    # The same loss on every rank.
    every = [torch.empty(()) for _ in range(dist.get_world_size())]
    dist.all_gather(every, got.detach().float())
    assert every[0] == every[1], every
    loss_module.MIN_CHUNK_ELEMENTS = 2**22
    log(f"ok loss {expected.item():.6f}")


def model_args(case: str = ""):
    # The debug model (8 query heads, 2 KV heads: GQA), made smaller for a quick CPU run.
    overrides = {"dim": 128, "num_layers": 2, "ffn_dim": 256, "vocab_size": 1024}
    if case == "ac_compile":
        # NOTE: torch 2.13 on CPU cannot run a compiled, fully checkpointed block that holds DTensor
        # parameters and calls SDPA: the partitioner saves the CPU RNG state of the recomputed SDPA
        # (a "random" op, for its dropout) after the DeviceMesh it also saves, and the runtime then
        # finds the mesh among the saved tensors (torch/_functorch/partitioners.py,
        # functionalize_rng_ops). The reference backend has no random op; TP + AC + compile is
        # what this case checks.
        overrides["attention"] = "reference"
    if case == "tied":  # a shared embedding/output weight, and biases on the projections
        overrides.update(tie_embeddings=True, qkv_bias=True, out_bias=True)
    if case == "qk_norm":  # Qwen3's per-head q/k norms (on the head-sharded q and k), heads wider than dim / heads
        overrides.update(qk_norm=True, explicit_head_dim=32)
    if case == "window":  # Mistral's sliding window (7 keys of 32), each rank's heads masked alike
        overrides["sliding_window"] = 7
    return dataclasses.replace(get_model_args("debug"), **overrides)


def clean(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def build_tp_model(reference: Transformer, mesh, case: str) -> nn.Module:
    """The trainer's sequence: build on meta, parallelize, materialise, then load the reference's weights."""
    with torch.device("meta"):
        model = Transformer(reference.args)
    tp_mesh = mesh["tp"] if mesh.ndim == 2 else mesh
    apply_tp(model, tp_mesh)
    if case in ("ac", "ac_compile"):
        apply_activation_checkpointing(model, "full")
    if case in ("ac_selective", "ac_selective_compile"):
        apply_activation_checkpointing(model, "selective")
    if case in ("compile", "ac_compile", "ac_selective_compile"):
        assert apply_compile(model, COMPILE_BACKEND, torch.device("cpu")), f"{COMPILE_BACKEND} does not work here"
    if case == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return load(model, reference)


@torch.no_grad()
def load(model: nn.Module, reference: Transformer) -> nn.Module:
    """Materialise ``model`` (parallelized on meta) and give it the reference's weights and RoPE tables."""
    model.to_empty(device="cpu")
    if model.args.tie_embeddings:  # to_empty unties; the trainer's init_weights ties again
        model.output.weight = model.tok_embeddings.weight
    full = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), f"{name} is not a DTensor"
        shard = distribute_tensor(full[clean(name)].detach(), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    for name, buf in model.named_buffers():
        buf.copy_(dict(reference.named_buffers())[clean(name)])
    return model


def batch(vocab_size: int, case: str):
    """Tokens ``[2, 32]``, next-token labels with ignored entries, and packed-document kwargs for "docs"."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (2, 32), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 5:9] = IGNORE_INDEX
    kwargs = {}
    if case == "docs":  # two packed documents per row, positions restarting at each
        lengths = [(13, 19), (20, 12)]
        document_ids = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in lengths])
        positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
        kwargs = {"positions": positions, "document_ids": document_ids}
    return tokens, labels, kwargs


def check_model(mesh, case: str, report: bool = True) -> None:
    torch.manual_seed(0)
    reference = Transformer(model_args(case))
    reference.init_weights()
    tokens, labels, kwargs = batch(reference.args.vocab_size, case)
    model = build_tp_model(reference, mesh, case)
    expected = reference(tokens, labels=labels, **kwargs)
    expected.backward()
    steps = 2 if "compile" in case else 1  # the second step runs the compiled graphs again
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        comms = CommDebugMode() if case == "eager" else contextlib.nullcontext()  # a dispatch mode: no compile
        with comms:
            got = model(tokens, labels=labels, **kwargs)
            assert type(got) is torch.Tensor, type(got)
            got.backward()
        close(got, expected.detach(), f"{case}: loss", 1e-5)
    if case == "eager":
        # Sequence parallel: only all-gathers and reduce-scatters, no all-reduce (of activations or
        # gradients) anywhere in the forward or backward, the loss included.
        counts = {str(op): n for op, n in comms.get_comm_counts().items()}
        assert not any("all_reduce" in op for op in counts) and any("reduce_scatter" in op for op in counts), counts
    ref_params = dict(reference.named_parameters())
    grads = {clean(name): p.grad for name, p in model.named_parameters()}
    assert grads.keys() == ref_params.keys(), set(grads) ^ set(ref_params)
    for name, grad in grads.items():
        close(grad.full_tensor(), ref_params[name].grad, f"{case}: grad {name}", 1e-5)
    if case in ("eager", "fsdp", "qk_norm"):
        # What the trainer does next. The gradients take their parameters' layouts: without FSDP the
        # RMSNorm gains' come out Partial (summed by one all-reduce for the whole model) and the
        # embedding's Replicate (cut locally); FSDP lays them out like the parameters itself.
        params = list(model.parameters())
        unsettled = {clean(name) for name, p in model.named_parameters() if p.grad.placements != p.placements}
        if case == "eager":
            assert unsettled == {n for n in ref_params if n.endswith("norm.weight")} | {"tok_embeddings.weight"}, \
                unsettled
        with CommDebugMode() as comms:
            settle_gradients(params)
        reduced = sum(n for op, n in comms.get_comm_counts().items() if "all_reduce" in str(op) or "allreduce" in str(op))
        assert reduced == (1 if unsettled else 0), comms.get_comm_counts()
        for name, p in model.named_parameters():
            assert p.grad.placements == p.placements, (name, p.grad.placements)
            close(p.grad.full_tensor(), ref_params[clean(name)].grad, f"{case}: settled grad {name}", 1e-5)
        # Then the global gradient norm, clipping and an optimizer step give the single-process values.
        for m, params in ((reference, list(reference.parameters())), (model, params)):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
            torch.optim.SGD(params, lr=0.5, momentum=0.9, foreach=True).step()
            if m is reference:
                expected_norm = norm
        close(norm, expected_norm, f"{case}: gradient norm", 1e-5)
        for name, p in model.named_parameters():
            close(p.detach().full_tensor(), ref_params[clean(name)].detach(), f"{case}: {name} after a step", 1e-5)
    # The output projection's weight stays vocabulary-sharded: the loss never gathered it.
    out_w = model.output.weight
    assert out_w.placements[-1] == Shard(0) and out_w.to_local().shape[0] == model_args().vocab_size // 2
    if case == "tied":
        assert model.output.weight is model.tok_embeddings.weight
    if case == "eager":  # the logits path (no labels): vocabulary-sharded logits
        with torch.no_grad():
            logits = model(tokens, **kwargs)
            assert logits.placements == (Shard(-1),) or logits.placements == (Shard(2),), logits.placements
            close(logits.full_tensor(), reference(tokens, **kwargs), "eager: logits", 1e-5)
    if report:
        log(f"ok {case} {expected.item():.4f}")


def check_stages(mesh) -> None:
    """Two pipeline stages on the same tp ranks, run by hand as a schedule would: plain shards in between."""
    torch.manual_seed(0)
    reference = Transformer(model_args())
    reference.init_weights()
    tokens, labels, _ = batch(reference.args.vocab_size, "stages")
    expected = reference(tokens, labels=labels)
    expected.backward()

    stages = []
    for first in (True, False):
        with torch.device("meta"):
            stage = Transformer(reference.args)
        del stage.layers["1" if first else "0"]
        if first:
            stage.norm = stage.output = None
        else:
            stage.tok_embeddings = None
        apply_tp(stage, mesh)
        stages.append(load(stage, reference))
    sent = stages[0](tokens)
    assert type(sent) is torch.Tensor and sent.shape == (tokens.shape[0], tokens.shape[1] // 2, reference.args.dim)
    received = sent.detach().requires_grad_()
    got = stages[1](received, labels=labels)
    got.backward()
    sent.backward(received.grad)
    close(got, expected.detach(), "stages: loss", 1e-5)
    ref_params = dict(reference.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            close(p.grad.full_tensor(), ref_params[name].grad, f"stages: grad {name}", 1e-5)
    log(f"ok stages {expected.item():.4f}")


def check_validation(mesh) -> None:
    for field, value in [("num_kv_heads", 1), ("ffn_dim", 255), ("vocab_size", 1023), ("num_heads", 1)]:
        args = dataclasses.replace(model_args(), **{field: value})
        if field == "num_heads":
            args = dataclasses.replace(args, num_kv_heads=1, dim=64)
        with torch.device("meta"):
            model = Transformer(args)
        try:
            apply_tp(model, mesh)
        except ValueError as e:
            assert f"ModelArgs.{field}={value}" in str(e), str(e)
        else:
            raise AssertionError(f"apply_tp accepted {field}={value} at tp=2")
    log("ok validate")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        if case == "loss":
            check_loss_parallel(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        elif case == "stages":
            check_stages(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        elif case == "validate":
            check_validation(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        elif case == "fsdp":  # 2-D DTensors: FSDP over a size-1 dp dimension, on top of TP
            check_model(init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp")), case)
        elif case in ("ac", "ac_compile"):
            # NOTE: each also checks the selective policy (which saves the collectives' outputs), reported
            # under the same name; selective saves SDPA, so its compiled case keeps the SDPA backend.
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
            check_model(mesh, case.replace("ac", "ac_selective"), report=False)
            check_model(mesh, case)
        else:
            check_model(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), case)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
