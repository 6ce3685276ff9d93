"""Tensor parallelism on 2 ranks (gloo, fp32) against one process: the loss and every gradient.

Run by tests/test_tp.py as ``torchrun --nproc_per_node=2 tests/workers/tp_parity.py CASE...``; each
CASE is checked in turn (the process start-up is the expensive part on a small CPU):

* ``loss``: ``linear_cross_entropy_sum`` with DTensor inputs (sequence-sharded or replicated hidden
  states, vocabulary-sharded weight) against the plain one, in fp64, over several chunks;
* ``eager``, ``docs``, ``ac_compile``, ``fsdp``: the debug Transformer (GQA) made tensor-parallel on
  the meta device, loaded with a single-process reference's weights, against that reference: plain,
  with packed documents, with checkpointed and compiled blocks, and with FSDP2 over a 2-D mesh.

Rank 0 prints one ``ok CASE ...`` line per case; any mismatch raises.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from torchtrain import loss as loss_module
from torchtrain.loss import IGNORE_INDEX, linear_cross_entropy_sum
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.tp import apply_tp

WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


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

    for layout in ("Shard(1)", "Replicate", "plain"):
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        if layout == "plain":
            h = hidden.clone().requires_grad_()
        else:
            h = distribute_tensor(hidden, mesh, [Shard(1) if layout == "Shard(1)" else Replicate()])
            h.requires_grad_()
        got = linear_cross_entropy_sum(h, w, labels)
        assert type(got) is torch.Tensor and got.dim() == 0, type(got)
        (got * 0.37).backward()
        close(got, expected.detach(), f"loss ({layout})", 1e-12)
        grad_h = h.grad.full_tensor() if isinstance(h.grad, DTensor) else h.grad
        if layout != "plain":
            assert h.grad.placements == h.placements, h.grad.placements
        close(grad_h, h_ref.grad, f"grad hidden ({layout})", 1e-12)
        assert w.grad.placements == (Shard(0),)
        close(w.grad.full_tensor(), w_ref.grad, f"grad weight ({layout})", 1e-12)
        with torch.no_grad():
            close(linear_cross_entropy_sum(h, w, labels), expected.detach(), f"no-grad loss ({layout})", 1e-12)
    # The same loss on every rank.
    every = [torch.empty(()) for _ in range(dist.get_world_size())]
    dist.all_gather(every, got.detach().float())
    assert every[0] == every[1], every
    loss_module.MIN_CHUNK_ELEMENTS = 2**22
    log(f"ok loss {expected.item():.6f}")


def model_args():
    # The debug model (8 query heads, 2 KV heads: GQA), made smaller for a quick CPU run.
    return get_model_args("debug").__class__(**{**get_model_args("debug").__dict__,
                                                "dim": 128, "num_layers": 2, "ffn_dim": 256, "vocab_size": 1024})


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
    if case == "ac_compile":
        apply_activation_checkpointing(model, "full")
        assert apply_compile(model, "inductor", torch.device("cpu")), "inductor does not work here"
    if case == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    model.to_empty(device="cpu")
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            assert isinstance(param, DTensor), f"{name} is not a DTensor"
            shard = distribute_tensor(full[clean(name)].detach(), param.device_mesh, param.placements,
                                      src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        for name, buf in model.named_buffers():
            buf.copy_(dict(reference.named_buffers())[clean(name)])
    return model


def check_model(mesh, case: str) -> None:
    torch.manual_seed(0)
    reference = Transformer(model_args())
    reference.init_weights()
    batch, seq = 2, 32
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, reference.args.vocab_size, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 5:9] = IGNORE_INDEX
    kwargs = {}
    if case == "docs":  # two packed documents per row, positions restarting at each
        lengths = [(13, 19), (20, 12)]
        document_ids = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in lengths])
        positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
        kwargs = {"positions": positions, "document_ids": document_ids}

    model = build_tp_model(reference, mesh, case)
    expected = reference(tokens, labels=labels, **kwargs)
    expected.backward()
    steps = 2 if case == "ac_compile" else 1  # the second step runs the compiled graphs again
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        got = model(tokens, labels=labels, **kwargs)
        assert type(got) is torch.Tensor, type(got)
        got.backward()
        close(got, expected.detach(), f"{case}: loss", 1e-5)
    ref_params = dict(reference.named_parameters())
    grads = {clean(name): p.grad for name, p in model.named_parameters()}
    assert grads.keys() == ref_params.keys(), set(grads) ^ set(ref_params)
    for name, grad in grads.items():
        close(grad.full_tensor(), ref_params[name].grad, f"{case}: grad {name}", 1e-5)
    # The output projection's weight stays vocabulary-sharded: the loss never gathered it.
    out_w = model.output.weight
    assert out_w.placements[-1] == Shard(0) and out_w.to_local().shape[0] == model_args().vocab_size // 2
    if case == "eager":  # the logits path (no labels): vocabulary-sharded logits
        with torch.no_grad():
            logits = model(tokens, **kwargs)
            assert logits.placements == (Shard(-1),) or logits.placements == (Shard(2),), logits.placements
            close(logits.full_tensor(), reference(tokens, **kwargs), "eager: logits", 1e-5)
    log(f"ok {case} {expected.item():.4f}")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        if case == "loss":
            check_loss_parallel(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        elif case == "fsdp":  # 2-D DTensors: FSDP over a size-1 dp dimension, on top of TP
            check_model(init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp")), case)
        else:
            check_model(init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), case)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
