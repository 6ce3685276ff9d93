"""Float8 training (torchao) as far as a CPU allows: the module swap, its numerics (float8 rounding
emulated in high precision), checkpoint compatibility, and the refusal on hardware without float8."""

import copy

import pytest
import torch

from launcher import REPO
from torchtrain.config import ConfigError, Float8, load_config
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.float8 import apply_float8, check_float8

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def _model(seed: int = 0) -> Transformer:
    model = Transformer(get_model_args("debug"))
    model.init_weights(seed=seed)
    return model


def _float8(model: Transformer, recipe: str = "tensorwise") -> Transformer:
    converted = copy.deepcopy(model)
    apply_float8(converted, Float8(enabled=True, recipe=recipe), emulate=True)
    return converted


def test_only_the_blocks_linear_layers_are_swapped_and_the_state_dict_is_unchanged():
    plain = _model()
    converted = _float8(plain)
    kinds = {name: type(module).__name__ for name, module in converted.named_modules()}
    block_linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    assert len(block_linears) == 7 * plain.args.num_layers
    assert all(kinds[name] == "Float8Linear" for name in block_linears)
    assert kinds["output"] == "Linear" and kinds["tok_embeddings"] == "Embedding"
    # Same names, shapes and values: a float8 run's checkpoints load into a bf16 run and back.
    theirs, ours = plain.state_dict(), converted.state_dict()
    assert list(theirs) == list(ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    reloaded = _float8(_model(seed=1))
    reloaded.load_state_dict(plain.state_dict())
    torch.testing.assert_close(reloaded.layers["2"].feed_forward.w1.weight, plain.layers["2"].feed_forward.w1.weight)


def _to_e4m3(t: torch.Tensor) -> torch.Tensor:
    """Tensorwise dynamic scaling by hand: scale so the largest magnitude maps to e4m3's max, round, unscale."""
    scale = E4M3_MAX / t.abs().max().double().clamp(min=1e-12)
    return ((t.double() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double() / scale)


def test_a_converted_projection_computes_the_float8_rounded_matmul():
    model = _float8(_model())
    wq = model.layers["0"].attention.wq
    x = torch.randn(32, model.args.dim, generator=torch.Generator().manual_seed(0))
    expected = _to_e4m3(x) @ _to_e4m3(wq.weight).T
    torch.testing.assert_close(wq(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wq(x).double(), x.double() @ wq.weight.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_step_tracks_the_fp32_one(recipe):
    plain = _model()
    converted = _float8(plain, recipe)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, plain.args.vocab_size, (2, 64), generator=gen)
    labels = torch.randint(0, plain.args.vocab_size, (2, 64), generator=gen)
    losses = []
    for model in (plain, converted):
        loss = model(tokens, labels=labels) / labels.numel()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)
    for name, param in plain.named_parameters():
        got = converted.get_parameter(name).grad
        rel = ((got - param.grad).norm() / param.grad.norm()).item()
        assert rel < 0.25, (name, rel)  # e4m3 activations/weights and e5m2 gradients: a few % per matmul


def test_float8_is_refused_without_float8_hardware():
    config = load_config(REPO / "recipes/debug.toml", ["--float8.enabled", "true"])
    with pytest.raises(ConfigError, match=r"float8.enabled = true needs an NVIDIA GPU with float8 tensor cores "
                                          r"\(compute capability >= 8.9.*this run is on cpu; set float8.enabled = false"):
        check_float8(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"float8.recipe = 'blockwise' is invalid; valid choices: 'tensorwise', "
                                          r"'rowwise', 'rowwise_with_gw_hp'"):
        check_float8(load_config(REPO / "recipes/debug.toml", ["--float8.recipe", "blockwise"]), torch.device("cpu"))


def test_compiled_float8_blocks_match_eager_float8():
    from torchtrain.parallel.compile import apply_compile

    eager = _float8(_model())
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, "aot_eager", torch.device("cpu"), fuse_projections=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, eager.args.vocab_size, (2, 64), generator=gen)
    labels = torch.randint(0, eager.args.vocab_size, (2, 64), generator=gen)
    for model in (eager, compiled):
        model(tokens, labels=labels).backward()
    for name, param in eager.named_parameters():
        torch.testing.assert_close(compiled.get_parameter(name).grad, param.grad, rtol=1e-5, atol=1e-6)


def test_fsdp_with_float8_all_gather_matches_one_process():
    from launcher import torchrun

    out = torchrun(2, REPO / "tests/workers/float8_parity.py", "fsdp").stdout
    assert "ok fsdp" in out, out
