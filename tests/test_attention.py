"""The model-facing attention protocol: the sliding window through the model, the masks each backend
declares and the checks that read the declarations before a run starts. (Every backend's masks against
fp64 math: tests/test_attention_kernels.py, where the Triton kernels run under the interpreter.)"""

import dataclasses
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from torchtrain.checks import check_run
from torchtrain.config import Config, ConfigError, Model, Parallelism, Training
from torchtrain.models import Transformer, get_model_args
from torchtrain.models.attention import BACKENDS, MASKS, attention, reference_attention
from torchtrain.plan.counters import StepCounter

WINDOW = 5


def _inputs(q_len: int, kv_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=g) for _ in range(2))
    return q, k, v


def test_a_model_with_a_window_differs_from_one_without_only_beyond_the_window():
    args = dataclasses.replace(get_model_args("debug"), num_layers=2, dim=64, ffn_dim=128, vocab_size=256)
    plain, windowed = Transformer(args), Transformer(dataclasses.replace(args, sliding_window=WINDOW))
    plain.init_weights(seed=0)
    windowed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(tokens), windowed(tokens)
    # The first WINDOW positions see the same keys with or without the window; the later ones do not.
    torch.testing.assert_close(a[:, :WINDOW], b[:, :WINDOW])
    assert not torch.allclose(a[:, WINDOW:], b[:, WINDOW:], atol=1e-3)


def test_a_backend_without_a_mask_is_refused_by_name(monkeypatch):
    limited = dataclasses.replace(BACKENDS["sdpa"], masks=frozenset(MASKS) - {"window"})
    monkeypatch.setitem(BACKENDS, "sdpa", limited)
    q, k, v = _inputs(8, 8)
    with pytest.raises(ValueError, match="'sdpa' does not implement the window mask.*'reference', 'flex', 'triton'"):
        attention(q, k, v, backend="sdpa", window=3)
    attention(q, k, v, backend="sdpa")  # the masks it has still work
    config = Config(model=Model(attention="sdpa"))
    args = dataclasses.replace(get_model_args("debug"), attention="sdpa", sliding_window=64)
    with pytest.raises(ConfigError, match=r"model.attention = 'sdpa' does not implement the window mask this run "
                                          r"needs; valid choices: \['reference', 'flex', 'triton'\]"):
        check_run(config, args, 1, torch.device("cpu"))
    check_run(config, dataclasses.replace(args, sliding_window=0), 1, torch.device("cpu"))


def test_both_context_parallel_rotations_take_a_window():
    args = dataclasses.replace(get_model_args("debug"), sliding_window=64)
    for rotate in ("ring", "allgather"):  # (their parity with one process: tests/test_cp.py, window cases)
        check_run(Config(parallelism=Parallelism(dp_shard=1, cp=2, cp_rotate=rotate), training=Training(seq_len=256)),
                  args, 2, torch.device("cpu"))


def test_flops_count_the_keys_a_window_leaves():
    args = get_model_args("debug")
    windowed = dataclasses.replace(args, sliding_window=512)
    assert windowed.flops_per_token(256) == args.flops_per_token(256)  # a window longer than the sequence
    attention_share = 12 * args.num_layers * args.dim
    assert args.flops_per_token(2048) - windowed.flops_per_token(2048) == attention_share * (2048 - 512)
    # The planner's count of the attention op: the kernels compute a window's keys per query, no more.
    counts = {}
    for window in (0, 16):
        with FakeTensorMode(), StepCounter({}) as counter:  # fake tensors: shapes only, no kernel runs
            q, k, v = (torch.empty(1, 2, 64, 8) for _ in range(3))
            torch.ops.torchtrain.flash_attention(q, k, v, None, None, True, window, 0.5)
        counts[window] = counter.flops
    assert counts[0] == 2 * 2 * 2 * 64 * 64 * 8  # QK^T and PV, 2 FLOPs per multiply-add
    assert counts[16] == counts[0] * 16 // 64


@pytest.mark.parametrize("q_len", [20, 6])  # the square case, and a context-parallel chunk against all the keys
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("window", [0, WINDOW])
def test_flex_gives_the_references_output_and_log_sum_exp(q_len, docs, window):
    """FlexAttention (forward only on CPU: it has no CPU backward) against the fp64 reference, GQA 4:2."""
    from torchtrain.models.attention import reference_attention

    q, k, v = (t.double() for t in _inputs(q_len, 20, seed=3))
    kv_ids = torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 2 + [2] * 15]) if docs else None
    ids = None if kv_ids is None else kv_ids[:, 20 - q_len:]
    kv_ids = kv_ids if q_len != 20 else None
    out, lse = BACKENDS["flex"].fn(q, k, v, True, ids, kv_ids, window, None)
    expected_out, expected_lse = reference_attention(q, k, v, causal=True, document_ids=ids, kv_document_ids=kv_ids,
                                                     window=window)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_flex_rows_that_see_no_key_are_zero_with_an_infinitely_negative_log_sum_exp():
    q, k, v = (t.double() for t in _inputs(8, 8, seed=4))
    query_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    key_ids = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    out, lse = BACKENDS["flex"].fn(q, k, v, False, query_ids, key_ids, 0, None)
    nothing = (query_ids == 0) | (query_ids == 3)
    assert torch.equal(out[:, :, nothing[0]], torch.zeros_like(out[:, :, nothing[0]]))
    assert bool((lse[:, :, nothing[0]] == float("-inf")).all()) and lse[:, :, ~nothing[0]].isfinite().all()


@pytest.mark.parametrize("device,document_mask,window,expected", [
    ("cpu", True, 0, "sdpa"), ("cpu", False, 4, "sdpa"),
    ("cuda", False, 0, "sdpa"),  # SDPA's flash / cuDNN kernels: plain causal attention
    ("cuda", True, 0, "flex"), ("cuda", False, 4, "flex"),  # FlexAttention where documents or a window mask it
])
def test_auto_picks_a_backend_proven_on_the_device(device, document_mask, window, expected, tmp_path, monkeypatch):
    from torchtrain.models import attention_choice
    from torchtrain.models.shape import auto_attention

    monkeypatch.setattr(attention_choice, "GPU_CHECK_RECORD", tmp_path / "none.json")  # no recorded GPU check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert auto_attention(torch.device(device), document_mask, window) == expected


def test_auto_takes_triton_only_where_a_recorded_check_measured_it_correct_and_faster(tmp_path, monkeypatch):
    from torchtrain.models import attention_choice
    from torchtrain.models.attention_choice import decide, record_choices
    from torchtrain.models.shape import auto_attention

    findings = {  # variant -> (correct, fwd+bwd ms per sequence length)
        "causal": ({"sdpa": True, "flex": True, "triton": True},  # faster at 2k, slower at 32k
                   {"sdpa": {2048: 10.0, 32768: 100.0}, "triton": {2048: 9.0, 32768: 120.0}}),
        "documents": ({"sdpa": True, "flex": True, "triton": True},  # faster everywhere
                      {"flex": {2048: 10.0, 32768: 100.0}, "triton": {2048: 8.0, 32768: 70.0}}),
        "window": ({"sdpa": True, "flex": True, "triton": False},  # fastest, but wrong
                   {"flex": {2048: 10.0}, "triton": {2048: 1.0}}),
    }
    choices = {v: decide(v, correct, ms) for v, (correct, ms) in findings.items()}
    assert {v: c[0] for v, c in choices.items()} == {"causal": "sdpa", "documents": "triton", "window": "flex"}
    assert "32768: 0.83x" in choices["causal"][1] and "32768: 1.43x" in choices["documents"][1]
    assert decide("documents", {"flex": True, "triton": True}, {"triton": {2048: 1.0}})[0] == "flex"  # no common S
    assert decide("documents", {"flex": False, "triton": True}, {"triton": {2048: 1.0}})[0] == "triton"

    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(record_choices(path, "sm_90", "NVIDIA H100", "abc1234", choices)))
    path.write_text(json.dumps(record_choices(path, "sm_100", "NVIDIA B200", "abc1234",
                                              {v: ("triton", "test") for v in choices})))
    monkeypatch.setattr(attention_choice, "GPU_CHECK_RECORD", path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    for capability, expected in [((9, 0), ("sdpa", "triton", "flex")), ((10, 0), ("triton",) * 3),
                                 ((8, 0), ("sdpa", "flex", "flex"))]:  # sm_80: no record, the defaults
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        got = tuple(auto_attention(cuda, documents, window) for documents, window in [(False, 0), (True, 0), (True, 8)])
        assert got == expected, capability
    # Neither is a record made under another PyTorch release (other SDPA, Flex and Triton) ...
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    running = torch.__version__
    monkeypatch.setattr(torch, "__version__", "1.13.1+cu117")
    assert attention_choice.torch_release() == "1.13" and auto_attention(cuda, True, 0) == "flex"
    monkeypatch.setattr(torch, "__version__", running)
    assert auto_attention(cuda, True, 0) == "triton"
    # ... nor a record of other kernels (the source changed since it was measured).
    monkeypatch.setattr(attention_choice, "kernels_fingerprint", lambda: "0" * 16)
    assert auto_attention(cuda, True, 0) == "flex"


def test_flex_cannot_train_on_a_cpu_and_says_so():
    config = Config(model=Model(name="debug", attention="flex"), training=Training(seq_len=64))
    args = dataclasses.replace(get_model_args("debug"), attention="flex")
    with pytest.raises(ConfigError, match=r"model.attention = 'flex' has no backward on cpu, so it cannot train "
                                          r"there; valid choices on cpu: \['sdpa', 'reference', 'triton'\]"):
        check_run(config, args, 1, torch.device("cpu"))


def test_flex_builds_one_block_mask_per_batch():
    """The layers of a forward pass the same document ids: one block mask serves them all; other ids (or the
    same tensor changed in place) get their own."""
    import importlib

    attention_module = importlib.import_module("torchtrain.models.attention")  # the package exports the function
    q, k, v = (t.double() for t in _inputs(8, 8, seed=5))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2)
    build = attention_module._flex_block_mask
    first = build(q, k, True, ids, None, 0)
    assert build(q, k, True, ids, None, 0) is first
    assert build(q, k, True, ids, None, 2) is not first  # another window
    ids[:, 5:] = 1  # in place: the cached mask no longer describes these ids
    out = BACKENDS["flex"].fn(q, k, v, True, ids, None, 0, None)[0]
    assert build(q, k, True, ids, None, 0) is not first
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, document_ids=ids)[0])


def test_flex_blocks_compile_whole_with_their_block_mask():
    """On CUDA, auto's default for packed documents is flex inside compiled blocks: the block mask is built in
    the block's graph, which must trace whole (fullgraph, as parallel/compile.py compiles blocks). Inductor's
    CPU FlexAttention cannot return the log-sum-exp, so the graph runs through aot_eager here."""
    model = Transformer(dataclasses.replace(get_model_args("debug"), attention="flex", num_layers=2, max_seq_len=128))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 8192, (2, 128))
    ids = torch.cat([torch.zeros(2, 50, dtype=torch.int32), torch.ones(2, 78, dtype=torch.int32)], 1)
    with torch.no_grad():
        eager = model(tokens, document_ids=ids)
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block, backend="aot_eager", fullgraph=True))
        torch.testing.assert_close(model(tokens, document_ids=ids), eager, rtol=0, atol=0)
