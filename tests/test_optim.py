"""AdamW parameter groups and the learning-rate schedules."""

import pytest
import torch

from torchtrain.config import LRScheduler, Optimizer
from torchtrain.models import Transformer, get_model_args
from torchtrain.optim import LRSchedule, build_optimizer, lr_factor


def test_no_weight_decay_on_norms_biases_and_embeddings():
    args = get_model_args("debug")
    args.qkv_bias = True
    model = Transformer(args)
    optimizer = build_optimizer(model, Optimizer(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    not_decayed = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in not_decayed and "norm.weight" in not_decayed
    assert "layers.0.attention.wq.bias" in not_decayed and "layers.0.ffn_norm.weight" in not_decayed
    assert "layers.0.attention.wq.weight" in decayed and "output.weight" in decayed
    assert decayed.isdisjoint(not_decayed) and len(decayed | not_decayed) == len(names)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_schedules_warm_up_then_reach_the_floor(name):
    config = LRScheduler(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    factors = [lr_factor(s, 100, config) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(factors[10:], factors[11:]))  # never rises after warmup
    if name == "wsd":
        assert factors[10:80] == pytest.approx([1.0] * 70)  # stable until the last 20%
        assert factors[80] < 1.0
    if name == "cosine":
        assert factors[10 + 89 // 2] == pytest.approx(0.55, abs=0.01)  # half-way between peak and floor


def test_a_run_shorter_than_its_warmup_warms_up_over_all_of_it(caplog):
    config = LRScheduler(name="cosine", warmup_steps=15)
    assert [lr_factor(s, 3, config) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    LRSchedule(build_optimizer(torch.nn.Linear(2, 2), Optimizer(lr=1.0), torch.device("cpu")), config, 3)
    assert "warmup_steps 15 is longer than the run's 3 steps" in caplog.text


def test_lr_schedule_state_round_trip():
    model = torch.nn.Linear(2, 2)
    config = LRScheduler(name="cosine", warmup_steps=2)
    first = LRSchedule(build_optimizer(model, Optimizer(lr=1.0), torch.device("cpu")), config, 10)
    for _ in range(5):
        first.step()
    second = LRSchedule(build_optimizer(model, Optimizer(lr=1.0), torch.device("cpu")), config, 10)
    second.load_state_dict(first.state_dict())
    assert second.last_lr() == first.last_lr() == pytest.approx(lr_factor(5, 10, config))


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_is_not_applied(fused):
    from torchtrain.optim import step_unless_non_finite

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    param.grad = torch.full((4,), float("nan"))
    step_unless_non_finite(optimizer, torch.tensor(False))
    assert torch.equal(param.detach(), torch.ones(4))
    assert not optimizer.state[param] or optimizer.state[param]["step"].item() == 0  # nor counted as a step
    param.grad = torch.ones(4)
    step_unless_non_finite(optimizer, torch.tensor(True))
    assert optimizer.state[param]["step"].item() == 1
    torch.testing.assert_close(param.detach(), torch.full((4,), 1 - 0.1 - 0.1 * 0.01 * 1))  # sign step + decay
