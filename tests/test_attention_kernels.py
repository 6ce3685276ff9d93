"""The Triton attention kernels (``torchtrain::flash_attention``) under the Triton interpreter, on CPU.

Oracle: ``torchtrain.kernels.attention.reference`` in fp64. Shapes stay small (the interpreter runs each
program in numpy): S <= 256, a few heads, head dims 16-64, fp32 and fp16 only (the
interpreter's bf16 is not trustworthy).

NOTE: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates: triton.language's own
helpers when ``triton`` is first imported, our kernels when ``torchtrain.kernels.attention.triton_kernels``
is. So the variable is set at the very top of this module, before anything imports triton (the
op and the model import neither until the first kernel call). If triton was nevertheless
imported compiled earlier in this process (another test module, a plugin), the in-process tests
are skipped and :func:`test_in_a_fresh_interpreter_process` runs this file in a subprocess.
"""

import os

_interpret_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see the NOTE above
try:
    import dataclasses  # noqa: E402
    import subprocess  # noqa: E402
    import sys  # noqa: E402

    import pytest  # noqa: E402
    import torch  # noqa: E402

    triton = pytest.importorskip("triton")

    from triton.runtime.jit import JITFunction  # noqa: E402

    from torchtrain.kernels.attention import flash_attention, op, reference_attention  # noqa: E402
    from torchtrain.kernels.attention.reference import reference_attention_backward  # noqa: E402

    IN_PROCESS = not isinstance(triton.language.zeros, JITFunction)  # triton was imported for the interpreter
    if IN_PROCESS:
        assert op.kernels_module().INTERPRET and op.uses_kernels(torch.device("cpu")), "kernels not interpreted"
finally:
    # The variable has done its work (triton and our kernels are decorated). Left set, it would reach
    # every later test and every worker they launch, which would then run the interpreted kernels
    # where the trainer's CPU path is the reference: ten times slower, and a path that depends on
    # which test modules were collected first.
    if _interpret_before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _interpret_before

in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled before TRITON_INTERPRET "
                                "was set: covered by test_in_a_fresh_interpreter_process")


@pytest.mark.skipif(IN_PROCESS, reason="only needed when triton was imported compiled in this process")
def test_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


TOL = {  # (forward atol, backward atol); rtol alike
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
}


def _inputs(batch, q_heads, kv_heads, seq, dim, dtype, seed=0, kv_seq=None):
    """q/dout/dlse of ``seq`` queries and k/v of ``kv_seq`` keys (default ``seq``)."""
    gen = torch.Generator().manual_seed(seed)
    kv_seq = seq if kv_seq is None else kv_seq
    q = torch.randn(batch, q_heads, seq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_seq, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_seq, dim, generator=gen)
    dout = torch.randn(batch, q_heads, seq, dim, generator=gen)
    dlse = torch.randn(batch, q_heads, seq, generator=gen)
    return [t.to(dtype) for t in (q, k, v, dout)] + [dlse]


def _packed_ids(batch, lengths_per_row):
    """``[B, S]`` document ids from per-row document lengths (contiguous, non-decreasing)."""
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in lengths_per_row]
    assert all(len(r) == len(rows[0]) for r in rows)
    return torch.stack(rows)[:batch]


def _check_against_fp64(q, k, v, dout, dlse, *, causal, document_ids=None, kv_document_ids=None, window=0,
                        scale=None):
    """Forward out/lse and dq/dk/dv (through a loss on both out and lse) against fp64."""
    fwd_tol, bwd_tol = TOL[q.dtype]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, causal=causal, document_ids=document_ids, kv_document_ids=kv_document_ids,
                               window=window, scale=scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ((out.float() * dout.float()).sum() + (torch.nan_to_num(lse, neginf=0.0) * dlse).sum()).backward()

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref_leaves, causal=causal, document_ids=document_ids,
                                           kv_document_ids=kv_document_ids, window=window, scale=scale)
    ((ref_out * dout.double()).sum() + (torch.nan_to_num(ref_lse, neginf=0.0) * dlse.double()).sum()).backward()

    torch.testing.assert_close(out.double(), ref_out, atol=fwd_tol, rtol=fwd_tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=fwd_tol, rtol=fwd_tol)
    for name, got, ref in zip("qkv", leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=bwd_tol, rtol=bwd_tol,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    return out, lse, [t.grad for t in leaves]


# (dtype, batch, q_heads, kv_heads, seq, dim, causal, docs, window): GQA ratios 1/2/4, tails
# (S not a multiple of the 32-token interpreter tile), several documents with length-1 ones,
# sliding windows, a non-power-of-two head dim (48), and one S=256 case.
CASES = {
    "fp32-causal-mha": (torch.float32, 1, 2, 2, 64, 32, True, None, 0),
    "fp32-full-gqa2-tail": (torch.float32, 2, 4, 2, 77, 16, False, None, 0),
    "fp32-causal-gqa4-d64-tail": (torch.float32, 1, 4, 1, 50, 64, True, None, 0),
    "fp32-causal-d48": (torch.float32, 1, 2, 1, 40, 48, True, None, 0),
    "fp16-causal-gqa2-tail": (torch.float16, 1, 4, 2, 100, 32, True, None, 0),
    "fp16-full-mha": (torch.float16, 1, 2, 2, 45, 16, False, None, 0),
    "fp32-causal-docs-gqa2": (torch.float32, 2, 4, 2, 90, 16, True, [[1, 30, 1, 1, 40, 17], [90]], 0),
    "fp16-full-docs-gqa4": (torch.float16, 1, 4, 1, 70, 32, False, [[1, 33, 1, 35]], 0),
    "fp32-causal-window": (torch.float32, 1, 2, 1, 128, 16, True, None, 20),
    "fp32-full-window-docs": (torch.float32, 1, 2, 2, 96, 16, False, [[40, 1, 55]], 7),
    "fp16-causal-window1": (torch.float16, 1, 2, 1, 40, 16, True, None, 1),
    "fp16-causal-docs-s256": (torch.float16, 1, 2, 1, 256, 16, True, [[1, 100, 1, 70, 84]], 0),
}


@in_process
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_fp64_reference(case):
    dtype, batch, q_heads, kv_heads, seq, dim, causal, docs, window = CASES[case]
    q, k, v, dout, dlse = _inputs(batch, q_heads, kv_heads, seq, dim, dtype)
    document_ids = None if docs is None else _packed_ids(batch, docs)
    _check_against_fp64(q, k, v, dout, dlse, causal=causal, document_ids=document_ids, window=window)


# Fewer queries than keys (bottom-right aligned: query i sits at key position i + Skv - Sq), with
# the queries' and keys' document ids given separately, as context parallelism calls the op: one
# chunk of queries against the all-gathered keys up to the end of that chunk.
# (dtype, q_heads, kv_heads, q_len, kv_len, dim, causal, docs over the keys, window)
SHORT_QUERY_CASES = {
    "fp32-causal-gqa2-tail": (torch.float32, 4, 2, 21, 77, 16, True, None, 0),
    "fp32-causal-docs": (torch.float32, 2, 1, 32, 96, 16, True, [[10, 40, 1, 45]], 0),
    "fp16-causal-docs-gqa2": (torch.float16, 4, 2, 40, 120, 32, True, [[70, 1, 49]], 0),
    "fp32-full-docs": (torch.float32, 2, 2, 30, 64, 16, False, [[20, 30, 14]], 0),
    "fp32-causal-window": (torch.float32, 2, 1, 33, 100, 16, True, None, 12),
}


@in_process
@pytest.mark.parametrize("case", list(SHORT_QUERY_CASES), ids=list(SHORT_QUERY_CASES))
def test_fewer_queries_than_keys_match_fp64_reference(case):
    dtype, q_heads, kv_heads, q_len, kv_len, dim, causal, docs, window = SHORT_QUERY_CASES[case]
    q, k, v, dout, dlse = _inputs(1, q_heads, kv_heads, q_len, dim, dtype, seed=9, kv_seq=kv_len)
    kv_document_ids = None if docs is None else _packed_ids(1, docs)
    document_ids = None if docs is None else kv_document_ids[:, kv_len - q_len:]
    _check_against_fp64(q, k, v, dout, dlse, causal=causal, document_ids=document_ids,
                        kv_document_ids=kv_document_ids, window=window)


def test_fewer_queries_than_keys_are_the_last_rows_of_the_square_case():
    # The convention itself, on the oracle: Sq queries against Skv keys give the last Sq rows of the
    # square attention over all Skv positions; the backward formula agrees with autograd there.
    q, k, v, dout, dlse = (t.double() for t in _inputs(1, 4, 2, 48, 16, torch.float32, seed=10))
    document_ids = _packed_ids(1, [[17, 1, 30]])
    start = 29
    for causal, window in ((True, 0), (True, 7), (False, 0)):
        full_out, full_lse = reference_attention(q, k, v, causal=causal, document_ids=document_ids, window=window)
        leaves = [q[:, :, start:].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
        masks = dict(causal=causal, document_ids=document_ids[:, start:], kv_document_ids=document_ids, window=window)
        out, lse = reference_attention(*leaves, **masks)
        torch.testing.assert_close(out, full_out[:, :, start:])
        torch.testing.assert_close(lse, full_lse[:, :, start:])
        ((out * dout[:, :, start:]).sum() + (lse * dlse[:, :, start:]).sum()).backward()
        grads = reference_attention_backward(dout[:, :, start:], dlse[:, :, start:], q[:, :, start:], k, v,
                                             out.detach(), lse.detach(), **masks)
        for got, leaf in zip(grads, leaves):
            torch.testing.assert_close(got, leaf.grad)


def test_distinct_query_and_key_document_ids():
    q, k, v, _, _ = _inputs(1, 2, 1, 8, 16, torch.float64, seed=11, kv_seq=8)
    query_docs = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    key_docs = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]])
    out, lse = reference_attention(q, k, v, causal=False, document_ids=query_docs, kv_document_ids=key_docs)
    # Queries of documents 0 and 3 find no key of theirs: out 0, lse -inf; the others see exactly theirs.
    assert (out[:, :, [0, 1, 6, 7]] == 0).all() and torch.isneginf(lse[:, :, [0, 1, 6, 7]]).all()
    expected, _ = reference_attention(q[:, :, 2:4], k[:, :, :4], v[:, :, :4], causal=False)
    torch.testing.assert_close(out[:, :, 2:4], expected)


def test_document_ids_alone_need_as_many_queries_as_keys():
    q, k, v, _, _ = _inputs(1, 2, 1, 8, 16, torch.float32, seed=12, kv_seq=16)
    with pytest.raises(ValueError, match="kv_document_ids"):
        flash_attention(q, k, v, document_ids=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_document_ids must be an int tensor \[B, S\] = \(1, 16\)"):
        flash_attention(q, k, v, document_ids=torch.zeros(1, 8, dtype=torch.int32),
                        kv_document_ids=torch.zeros(1, 8, dtype=torch.int32))


@in_process
def test_unsorted_document_ids_and_custom_scale():
    # Tile skipping compares id ranges, which is exact for any ids: interleaved documents too.
    q, k, v, dout, dlse = _inputs(1, 2, 1, 70, 16, torch.float32, seed=1)
    document_ids = torch.randint(0, 3, (1, 70), generator=torch.Generator().manual_seed(2))
    _check_against_fp64(q, k, v, dout, dlse, causal=True, document_ids=document_ids, scale=0.3)


@in_process
def test_rows_that_see_no_key_give_zero_and_neg_inf():
    # Negative document ids mark padding: such a query sees no key and no query sees it.
    q, k, v, dout, dlse = _inputs(1, 2, 1, 40, 16, torch.float32, seed=3)
    document_ids = _packed_ids(1, [[10, 25, 5]])
    document_ids[0, :10] = -1  # a whole tile's worth of padding rows, and more in the next tile
    document_ids[0, 35:] = -1
    out, lse, grads = _check_against_fp64(q, k, v, dout, dlse, causal=True, document_ids=document_ids)
    pad = document_ids[0] < 0
    assert (out[:, :, pad] == 0).all() and torch.isneginf(lse[:, :, pad]).all()
    assert torch.isfinite(lse[:, :, ~pad]).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, pad] == 0).all() and (grads[1][:, :, pad] == 0).all()  # no query saw them


@in_process
def test_cpu_reference_path_matches_kernels(monkeypatch):
    # Without the interpreter the op runs the pure-PyTorch reference on CPU: same results.
    q, k, v, dout, dlse = _inputs(1, 4, 2, 50, 16, torch.float32, seed=4)
    document_ids = _packed_ids(1, [[20, 1, 29]])
    results = {}
    for use_kernels in (True, False):
        monkeypatch.setattr(op, "uses_kernels", lambda device, flag=use_kernels: flag)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flash_attention(*leaves, causal=True, document_ids=document_ids, window=9)
        ((out * dout).sum() + (lse * dlse).sum()).backward()
        results[use_kernels] = [out, lse] + [t.grad for t in leaves]
    for got, ref in zip(results[True], results[False]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_backward_reference_matches_autograd_of_reference():
    q, k, v, dout, dlse = (t.double() for t in _inputs(1, 4, 1, 20, 16, torch.float32, seed=5))
    document_ids = _packed_ids(1, [[5, 1, 14]])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=False, document_ids=document_ids, window=6)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    grads = reference_attention_backward(dout, dlse, q, k, v, out.detach(), lse.detach(), causal=False,
                                         document_ids=document_ids, window=6)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


@in_process
def test_opcheck():
    q, k, v, dout, dlse = _inputs(1, 2, 1, 40, 16, torch.float32, seed=6)
    document_ids = _packed_ids(1, [[12, 1, 27]])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.torchtrain.flash_attention.default,
                          (q, k, v, document_ids, None, True, 0, 0.25))
    torch.library.opcheck(torch.ops.torchtrain.flash_attention.default, (q, k, v, None, None, False, 5, 0.25))
    out, lse = flash_attention(q, k, v, causal=True)
    torch.library.opcheck(torch.ops.torchtrain.flash_attention_backward.default,
                          (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, None, True,
                           0, 0.25))
    # Fewer queries than keys, with their own document ids (what context parallelism calls).
    q_tail = q[:, :, 24:].detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.torchtrain.flash_attention.default,
                          (q_tail, k, v, document_ids[:, 24:], document_ids, True, 0, 0.25))


@in_process
def test_compile_fullgraph_has_no_graph_break():
    q, k, v, dout, dlse = _inputs(1, 4, 2, 40, 16, torch.float32, seed=7)
    document_ids = _packed_ids(1, [[15, 25]])

    def step(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, document_ids=document_ids)
        return (out * dout).sum() + (lse * dlse).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref)


@in_process
def test_debug_model_trains_the_same_with_triton_and_reference():
    from torchtrain.models import Transformer, get_model_args

    args = dataclasses.replace(get_model_args("debug"), dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               ffn_dim=96, vocab_size=128, max_seq_len=64)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=gen)
    labels = torch.randint(0, args.vocab_size, (2, 48), generator=gen)
    document_ids = _packed_ids(2, [[20, 1, 27], [48]])

    runs = {}
    for backend in ("triton", "reference"):
        model = Transformer(dataclasses.replace(args, attention=backend))
        model.init_weights(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(tokens, document_ids=document_ids, labels=labels) / labels.numel()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        runs[backend] = (torch.stack(losses), dict(model.named_parameters()))
    torch.testing.assert_close(runs["triton"][0], runs["reference"][0], atol=1e-5, rtol=1e-5)
    assert runs["triton"][0][-1] < runs["triton"][0][0]  # it trains
    for name, p in runs["triton"][1].items():
        torch.testing.assert_close(p, runs["reference"][1][name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _expected_by_pairs(q, k, v, document_ids, kv_document_ids, window):
    """fp64 softmax attention with the visibility of every (query, key) pair decided one by one."""
    q_len, kv_len = q.shape[2], k.shape[2]
    offset = kv_len - q_len  # the queries are the last q_len positions
    visible = torch.zeros(q.shape[0], 1, q_len, kv_len, dtype=torch.bool)
    for b in range(q.shape[0]):
        for i in range(q_len):
            for j in range(kv_len):
                seen = j <= i + offset and (window == 0 or j > i + offset - window)
                if document_ids is not None:
                    seen = seen and int(document_ids[b, i]) == int(kv_document_ids[b, j])
                visible[b, 0, i, j] = seen
    group = q.shape[1] // k.shape[1]
    kr, vr = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vr


@in_process
@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
@pytest.mark.parametrize("q_len", [20, 6])  # the square case, and fewer queries than keys (a decode step, a cp chunk)
@pytest.mark.parametrize("docs", [False, True])
def test_every_model_backend_applies_causal_document_and_window_masks(backend, q_len, docs):
    # The model-facing attention(): SDPA needs an explicit bottom-right causal / document / window mask here.
    from torchtrain.models.attention import attention

    q, k, v, _, _ = _inputs(2, 4, 2, q_len, 16, torch.float32, seed=13, kv_seq=20)
    kv_document_ids = _packed_ids(2, [[7, 13], [3, 2, 15]]) if docs else None
    document_ids = None if kv_document_ids is None else kv_document_ids[:, 20 - q_len:]
    for window in (0, 5):
        got = attention(q, k, v, backend=backend, causal=True, document_ids=document_ids,
                        kv_document_ids=kv_document_ids if q_len != 20 else None, window=window)
        expected = _expected_by_pairs(q, k, v, document_ids, kv_document_ids, window)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5,
                                   msg=lambda m: f"{backend} window {window}: {m}")