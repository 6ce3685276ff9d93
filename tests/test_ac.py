"""Activation checkpointing: every mode gives the loss and gradients of no checkpointing, and recomputes what it says.

A small debug-shaped model (GQA, 4 blocks) in fp32 on CPU; each mode is compared with the same model
without checkpointing, eager and compiled per block.
"""

import dataclasses

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from torchtrain.config import ConfigError, load_config
from torchtrain.loss import IGNORE_INDEX
from torchtrain.models import BACKENDS, Transformer, get_model_args
from torchtrain.parallel.ac import (
    _BlockInputOffload,
    _OffloadedInput,
    apply_activation_checkpointing,
    check_activation_checkpoint,
    checkpointed_blocks,
)
from torchtrain.parallel.compile import apply_compile

ARGS = dataclasses.replace(get_model_args("debug"), dim=64, num_heads=4, num_kv_heads=2, ffn_dim=128,
                           vocab_size=256, num_layers=4, max_seq_len=64)
LINEARS_PER_BLOCK = 7  # wq, wk, wv, wo, w1, w3, w2: one aten.mm each
# A full recompute stops once it has rebuilt every saved tensor (torch's early stop): w2's output is
# read by nothing in the backward, so its matmul is not rerun.
RECOMPUTED_MATMULS = LINEARS_PER_BLOCK - 1


def build(mode: str = "none", num_layers: int = 0, offload: bool = False, backend: str | None = None):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(seed=3)
    apply_activation_checkpointing(model, mode, num_layers, offload)
    if backend is not None:
        assert apply_compile(model, backend, torch.device("cpu"))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 48), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    # Two packed documents in the first row: document ids and restarting positions reach the blocks.
    document_ids = torch.zeros_like(tokens)
    document_ids[0, 20:] = 1
    positions = torch.arange(48).repeat(2, 1)
    positions[0, 20:] -= 20
    return tokens, labels, {"document_ids": document_ids, "positions": positions}


def loss_and_grads(model):
    tokens, labels, kwargs = batch()
    loss = model(tokens, labels=labels, **kwargs)
    loss.backward()
    grads = {name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad
             for name, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def expected():
    return loss_and_grads(build("none"))


def assert_same(got, expected, rtol=1e-6, atol=1e-7):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


MODES = [("full", 0), ("selective", 0), ("layers", 0), ("layers", 1), ("layers", 2), ("layers", 3), ("layers", 4)]


@pytest.mark.parametrize("mode,num_layers", MODES, ids=lambda v: str(v))
def test_eager_modes_match_no_checkpointing(mode, num_layers, expected):
    assert_same(loss_and_grads(build(mode, num_layers)), expected)


@pytest.mark.parametrize("mode,num_layers", [("none", 0), ("full", 0), ("selective", 0), ("layers", 2)],
                         ids=lambda v: str(v))
def test_compiled_modes_match_eager_no_checkpointing(mode, num_layers, expected):
    # aot_eager: dynamo's trace through the checkpoint (and the selective policy's tags) and AOTAutograd's
    # forward/backward partition, without inductor's compile time (selective under inductor also matches,
    # at rtol 1e-4, but compiling takes a minute on 2 cores).
    model = build(mode, num_layers, backend="aot_eager")
    for _ in range(2):  # the second step reruns the cached graphs
        model.zero_grad(set_to_none=True)
        got = loss_and_grads(model)
    assert_same(got, expected, rtol=1e-5, atol=1e-6)


class CountOps(TorchDispatchMode):
    """Counts aten.mm calls that reach dispatch (a selectively saved mm answered from cache does not)."""

    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def matmuls_in_backward(mode: str, num_layers: int = 0) -> int:
    model = build(mode, num_layers)
    tokens, labels, kwargs = batch()
    loss = model(tokens, labels=labels, **kwargs)
    with CountOps() as counter:
        loss.backward()
    return counter.mm


def test_selective_recomputes_no_matmul_and_full_recomputes_all():
    baseline = matmuls_in_backward("none")
    assert baseline >= 2 * LINEARS_PER_BLOCK * ARGS.num_layers  # each linear: input and weight gradients
    assert matmuls_in_backward("selective") == baseline
    assert matmuls_in_backward("full") == baseline + RECOMPUTED_MATMULS * ARGS.num_layers
    assert matmuls_in_backward("layers", 1) == baseline + RECOMPUTED_MATMULS


class CountAttention(TorchDispatchMode):
    """Counts the calls of the attention ops the backends declare (models/attention.py) that reach dispatch."""

    def __init__(self):
        super().__init__()
        self.ops = {op for backend in BACKENDS.values() for op in backend.saved_ops}
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.ops
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_selective_keeps_each_backends_attention_and_full_reruns_it(attention, monkeypatch):
    """The attention op a backend declares runs once per block in the forward; "selective" never reruns it,
    "full" reruns it in every block's backward. The triton backend's op runs its reference path inside the
    op here (the kernels under the interpreter are the kernel tests' business)."""
    from torchtrain.kernels.attention import op

    monkeypatch.setattr(op, "uses_kernels", lambda device: False)
    calls = {}
    for mode in ("selective", "full"):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(ARGS, attention=attention))
        model.init_weights(seed=3)
        apply_activation_checkpointing(model, mode)
        tokens, labels, kwargs = batch()
        with CountAttention() as forward:
            loss = model(tokens, labels=labels, **kwargs)
        with CountAttention() as backward:
            loss.backward()
        calls[mode] = (forward.calls, backward.calls)
    assert calls == {"selective": (ARGS.num_layers, 0), "full": (ARGS.num_layers, ARGS.num_layers)}, calls


def test_selective_keeps_flex_attention():
    """FlexAttention has no backward on CPU, so the test above cannot run it: its higher-order op is what the
    policy keeps, in the form torch's selective checkpointing accepts as a saved op."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from torchtrain.parallel.ac import selective_policy

    flex = torch.ops.higher_order.flex_attention
    assert BACKENDS["flex"].saved_ops == (flex,)
    assert selective_policy(None, flex) == CheckpointPolicy.MUST_SAVE
    create_selective_checkpoint_contexts([flex])  # raises for anything but an op or a higher-order op


@pytest.mark.parametrize("num_blocks,k,picked", [
    (4, 0, []), (4, 1, [2]), (4, 2, [1, 3]), (4, 3, [0, 2, 3]), (4, 4, [0, 1, 2, 3]), (8, 3, [1, 4, 6]),
    (80, 8, [5, 15, 25, 35, 45, 55, 65, 75]),
])
def test_layers_spreads_the_checkpointed_blocks_evenly(num_blocks, k, picked):
    assert checkpointed_blocks(num_blocks, k) == picked


def test_layers_on_a_pipeline_stage_picks_by_global_block_index():
    model = Transformer(ARGS)
    del model.layers["0"], model.layers["1"]  # the second of two stages: blocks 2 and 3
    apply_activation_checkpointing(model, "layers", 2)  # the whole model checkpoints blocks 1 and 3
    wrapped = {name for name, block in model.layers.items() if isinstance(block, CheckpointWrapper)}
    assert wrapped == {"3"}
    with pytest.raises(ValueError, match=r"num_layers = 5.*\[0, 4\]"):
        apply_activation_checkpointing(Transformer(ARGS), "layers", 5)


def test_state_dict_names_are_unchanged_by_the_wrappers():
    # Checkpoints written with or without checkpointing (and offload's extra wrapper) load into each other.
    plain = Transformer(ARGS)
    for model in (build("selective", offload=True), build("layers", 2)):
        assert list(model.state_dict().keys()) == list(plain.state_dict().keys())


class CountingOffload(_BlockInputOffload):
    packed = 0

    def pack(self, t):
        out = super().pack(t)
        CountingOffload.packed += out is not t
        return out


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_offload_hooks_move_only_the_block_input_and_keep_numerics(backend, expected, monkeypatch):
    # On CPU the "offload" is a copy to other host memory: it exercises the hooks (which saved tensor
    # is the block input, the round trip) without a GPU. Compiled, the hooks see what the graph saves.
    monkeypatch.setattr("torchtrain.parallel.ac._BlockInputOffload", CountingOffload)
    CountingOffload.packed = 0
    model = build("full", offload=True, backend=backend)
    assert all(isinstance(block, _OffloadedInput) or isinstance(block._orig_mod, _OffloadedInput)
               for block in model.layers.values())
    assert_same(loss_and_grads(model), expected, rtol=1e-5, atol=1e-6)
    assert CountingOffload.packed == ARGS.num_layers  # one input per block: no parameter, no RoPE table


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_offload_on_cpu_is_refused_naming_the_key(tmp_path):
    config = load_config(write(tmp_path, '[activation_checkpoint]\nmode = "full"\noffload = true\n'))
    with pytest.raises(ConfigError, match=r"activation_checkpoint\.offload = true .* on cpu; set it to false"):
        check_activation_checkpoint(config, get_model_args("debug"), torch.device("cpu"))
    check_activation_checkpoint(config, get_model_args("debug"), torch.device("cuda"))  # accepted on a GPU


@pytest.mark.parametrize("text,message", [
    ('mode = "partial"', r"activation_checkpoint\.mode = 'partial' is invalid; valid choices: 'none', 'full', "
                         r"'selective', 'layers'"),
    ('mode = "layers"\nnum_layers = -1', r"activation_checkpoint\.num_layers = -1 is invalid; it must be zero"),
    ('mode = "layers"\nnum_layers = 5', r"activation_checkpoint\.num_layers = 5 is invalid; model 'debug' has 4 "
                                        r"blocks; valid: 0 \.\. 4"),
    ('mode = "full"\nnum_layers = 2', r"activation_checkpoint\.num_layers = 2 is invalid; it is used by mode = "
                                      r"'layers' only"),
    ('offload = true', r"activation_checkpoint\.offload = True is invalid; it offloads the inputs of checkpointed"),
    ('num_layers = "two"', r"activation_checkpoint\.num_layers = 'two' is not a valid integer"),
])
def test_config_errors_name_the_key_and_what_is_valid(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config(write(tmp_path, f"[activation_checkpoint]\n{text}\n"))
        check_activation_checkpoint(config, get_model_args("debug"), torch.device("cuda"))


def test_config_accepts_every_mode(tmp_path):
    for text in ('mode = "selective"', 'mode = "layers"\nnum_layers = 4', 'mode = "layers"\nnum_layers = 0',
                 'mode = "full"\noffload = true'):
        load_config(write(tmp_path, f"[activation_checkpoint]\n{text}\n"))
