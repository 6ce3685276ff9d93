"""The summed cross-entropy paths against F.cross_entropy in fp64: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from torchtrain import loss as loss_module
from torchtrain.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum


def reference(hidden, weight, labels):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def make(batch=3, seq=37, dim=16, vocab=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :5] = IGNORE_INDEX  # some ignored tokens, as at document boundaries
    return hidden, weight, labels


@pytest.fixture(params=[2**22, 64], ids=["one-chunk", "many-chunks"])
def chunk_elements(request, monkeypatch):
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ELEMENTS", request.param)
    return request.param


def test_linear_cross_entropy_matches_reference(chunk_elements):
    hidden, weight, labels = make()
    expected = reference(hidden, weight, labels)
    expected_grads = torch.autograd.grad(expected * 0.37, (hidden, weight))
    got = linear_cross_entropy_sum(hidden, weight, labels)
    grads = torch.autograd.grad(got * 0.37, (hidden, weight))  # a scaled loss, as the trainer's
    torch.testing.assert_close(got.double(), expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_cross_entropy_sum_matches_reference(chunk_elements):
    hidden, weight, labels = make()
    logits = (hidden @ weight.t()).detach().requires_grad_()
    expected = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, logits)
    got = cross_entropy_sum(logits, labels)
    (grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got.double(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_fp32_close_to_fp64_and_no_grad_path():
    hidden, weight, labels = make(dtype=torch.float32)
    expected = reference(hidden.double(), weight.double(), labels)
    with torch.no_grad():
        got = linear_cross_entropy_sum(hidden, weight, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = make()
    labels.fill_(IGNORE_INDEX)
    got = linear_cross_entropy_sum(hidden, weight, labels)
    got.backward()
    assert got.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_model_loss_equals_loss_of_its_logits():
    from torchtrain.models import Transformer, get_model_args

    torch.manual_seed(0)
    model = Transformer(get_model_args("debug")).double()
    model.init_weights()
    tokens = torch.randint(0, 8192, (2, 33))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    fused = model(tokens, labels=labels)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    plain = cross_entropy_sum(model(tokens), labels)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
