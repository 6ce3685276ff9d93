"""Context parallelism (gloo, fp32) against one process: the output, the loss and every gradient.

Run by tests/test_cp.py as ``torchrun --nproc_per_node=N tests/workers/cp_parity.py CASE...``; each
CASE is checked in turn (the process start-up is the expensive part on a small CPU). Every rank
builds the same single-process reference (the debug model, GQA: 8 query heads, 2 K/V heads) and
runs it on the whole batch; the context-parallel model runs each rank's load-balanced share.

* ``causal``, ``docs``, ``mha_docs``, ``op_docs``: cp over all N ranks, the model made context
  parallel with ``apply_cp`` alone: causal only (global positions), packed documents (positions
  restart, document mask), packed documents with as many K/V heads as query heads, and packed
  documents through the ``torchtrain::flash_attention`` op ("triton" backend; its CPU path);
* ``window_docs``: ``docs`` with a sliding window of 7 keys, which reaches back over chunk boundaries
  (the all-gather leaves out the keys before each chunk's windows);
* ``qk_norm_docs``: ``docs`` with Qwen3's attention (per-head q/k norms, heads wider than dim / heads);
* ``compile``: ``docs`` with every block compiled (fullgraph, aot_eager): the all-gathers trace;
* ``fsdp`` (4 ranks: dp_shard 2 x cp 2) and ``tp`` (4 ranks: tp 2 x cp 2): the trainer's own
  ``build_mesh`` + ``parallelize`` + ``init_weights``, so FSDP shards over dp_shard x cp and sums the
  cp ranks' gradients itself; the data-parallel ranks read different samples;
* ``ring_CASE`` (``ring_causal``, ``ring_docs``, ``ring_compile``, ``ring_fsdp``, ``ring_reference_docs``,
  ``ring_qk_norm_docs``,
  ``ring_window_docs``: at cp 4, chunks of 4 tokens, the window of 7 reaches the previous chunk whole, the
  one before it in part, and the one before that not at all):
  CASE with ``cp_rotate = "ring"``, the keys and values passed around the ring instead of all-gathered
  (``ring_compile``: the ring op inside the compiled blocks; ``reference_docs``: the model on the
  ``"reference"`` backend, whose blocks and block backward the ring then uses instead of the op's).

Rank 0 prints one ``ok CASE ...`` line per case; any mismatch raises.
"""

import dataclasses
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from torchtrain.config import Compile, Config, Data, Parallelism
from torchtrain.loss import IGNORE_INDEX
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel import ParallelDims, build_mesh, parallelize
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.cp import apply_cp, shard_sequence
from torchtrain.parallel.init import full_parameters

SEQ = 32
WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` relative to the largest magnitude of ``expected`` (fp32 sums reorder)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def model_args(case: str):
    overrides = {"dim": 128, "num_layers": 2, "ffn_dim": 256, "vocab_size": 1024, "max_seq_len": SEQ}
    if case == "mha_docs":
        overrides["num_kv_heads"] = get_model_args("debug").num_heads
    if case == "op_docs":
        overrides["attention"] = "triton"  # the op; on CPU without the interpreter its reference path
    if case == "reference_docs":
        overrides["attention"] = "reference"
    if case == "window_docs":
        overrides["sliding_window"] = 7
    if case == "qk_norm_docs":  # Qwen3: per-head q/k norms, heads wider than dim / heads (8 x 32 on a 128 model)
        overrides.update(qk_norm=True, explicit_head_dim=32)
    return dataclasses.replace(get_model_args("debug"), **overrides)


def global_batch(num_samples: int, vocab_size: int, docs: bool):
    """Tokens, labels (some ignored), positions and document ids ``[num_samples, SEQ]``."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (num_samples, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 5:9] = IGNORE_INDEX
    # Documents of odd lengths, so their boundaries fall inside the load-balanced chunks.
    lengths = [(5, 14, 13), (20, 12), (1, 30, 1), (32,)] if docs else [(SEQ,)] * 4
    rows = lengths[:num_samples]
    document_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in rows])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    return tokens, labels, positions, document_ids


def model_kwargs(positions, document_ids, docs: bool) -> dict:
    return {"positions": positions, "document_ids": document_ids} if docs else {}


def shard_inputs(cp: int, rank: int, tokens, labels, positions, document_ids, docs: bool):
    """This cp rank's share; without documents, the global positions 0 .. S-1 (always passed under cp)."""
    if not docs:
        positions = torch.arange(SEQ).expand(tokens.shape[0], -1)
    cut = [shard_sequence(t, cp, rank) for t in (tokens, labels, positions, document_ids)]
    kwargs = {"positions": cut[2]}
    if docs:
        kwargs["document_ids"] = cut[3]
    return cut[0], cut[1], kwargs


def clean(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def reference_run(args, tokens, labels, kwargs):
    """The single-process model (init_weights seed 0): loss / num_valid, logits and gradients."""
    reference = Transformer(args)
    reference.init_weights(seed=0)
    num_valid = (labels != IGNORE_INDEX).sum()
    (reference(tokens, labels=labels, **kwargs) / num_valid).backward()
    with torch.no_grad():
        loss = reference(tokens, labels=labels, **kwargs) / num_valid
        logits = reference(tokens, **kwargs)
    return reference, loss, logits


def check_cp_alone(case: str) -> None:
    """cp over every rank, apply_cp on a copy of the reference; gradients summed over the cp ranks by hand."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    base = case.removeprefix("ring_")
    docs = base != "causal"
    args = model_args(base)
    tokens, labels, positions, document_ids = global_batch(2, args.vocab_size, docs)
    reference, expected_loss, expected_logits = reference_run(args, tokens, labels,
                                                              model_kwargs(positions, document_ids, docs))

    model = Transformer(args)
    model.init_weights(seed=0)
    apply_cp(model, init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",)), "ring" if base != case else "allgather")
    if base == "compile":
        assert apply_compile(model, "aot_eager", torch.device("cpu"))
    local_tokens, local_labels, kwargs = shard_inputs(cp, rank, tokens, labels, positions, document_ids, docs)
    num_valid = (labels != IGNORE_INDEX).sum()  # the global count, as the trainer all-reduces it
    loss = model(local_tokens, labels=local_labels, **kwargs) / num_valid
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss)
    close(loss, expected_loss, f"{case}: loss")
    with torch.no_grad():
        close(model(local_tokens, **kwargs), shard_sequence(expected_logits, cp, rank), f"{case}: logits")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # what FSDP over dp_shard x cp does in the trainer
        close(grad, ref_params[clean(name)].grad, f"{case}: grad {clean(name)}")
    log(f"ok {case} {expected_loss.item():.6f}")


def check_with_trainer_layout(case: str) -> None:
    """dp_shard 2 x cp 2 ("fsdp") or tp 2 x cp 2 ("tp") through build_mesh / parallelize / init_weights."""
    layout = {"fsdp": Parallelism(dp_shard=2, cp=2), "tp": Parallelism(dp_shard=1, cp=2, tp=2),
              "ring_fsdp": Parallelism(dp_shard=2, cp=2, cp_rotate="ring")}[case]
    config = Config(parallelism=layout, compile=Compile(enabled=False), data=Data(document_mask=True))
    dims = ParallelDims.resolve(config.parallelism, dist.get_world_size())
    mesh = build_mesh(dims, torch.device("cpu"))
    args = model_args(case)
    num_samples = 2 * dims.dp
    tokens, labels, positions, document_ids = global_batch(num_samples, args.vocab_size, docs=True)
    reference, expected_loss, _ = reference_run(args, tokens, labels, model_kwargs(positions, document_ids, True))

    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, config, mesh, dims, torch.device("cpu"), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(seed=0, unit_scope=full_parameters)
    rows = slice(2 * mesh.dp.get_local_rank(), 2 * mesh.dp.get_local_rank() + 2)  # this dp rank's samples
    local_tokens, local_labels, kwargs = shard_inputs(
        dims.cp, mesh["cp"].get_local_rank(), tokens[rows], labels[rows], positions[rows], document_ids[rows], True)
    num_valid = (labels != IGNORE_INDEX).sum()
    loss = model(local_tokens, labels=local_labels, **kwargs) / num_valid
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss, group=mesh.dp_cp.get_group())
    close(loss, expected_loss, f"{case}: loss")
    ref_params = dict(reference.named_parameters())
    names = set()
    for name, p in model.named_parameters():
        assert isinstance(p.grad, DTensor) and "dp_shard_cp" in p.grad.device_mesh.mesh_dim_names, name
        close(p.grad.full_tensor(), ref_params[clean(name)].grad, f"{case}: grad {clean(name)}")
        names.add(clean(name))
    assert names == ref_params.keys(), names ^ set(ref_params)
    log(f"ok {case} {expected_loss.item():.6f}")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        if case in ("fsdp", "tp", "ring_fsdp"):
            check_with_trainer_layout(case)
        else:
            check_cp_alone(case)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
