"""Our Transformer against Hugging Face's reference implementations, and attention backends against each other.

Everything is fp32 on CPU with tiny random models; nothing is downloaded.
"""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchtrain.models import ModelArgs, RopeScaling, Transformer, attention, from_hf_state_dict, hf_config  # noqa: E402
from torchtrain.models import reference_attention, to_hf_state_dict  # noqa: E402
from torchtrain.models.llama import _rope_inv_freq, rope_tables  # noqa: E402

ATOL = 1e-5

TINY = ModelArgs(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=128, ffn_dim=96,
                 norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (biases and norm gains too), so every name mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(noise + 1.0 if "norm" in name else noise * 2)


def _hf_model(args: ModelArgs, family: str):
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_cls(**hf_config(args, family), attn_implementation="eager")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    _randomize(model)
    return model


def _ours_from_hf(hf_model, args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), args), strict=True)
    return model.eval()


CASES = {
    "llama_gqa": (TINY, "llama"),
    "llama_mha": (dataclasses.replace(TINY, num_kv_heads=4), "llama"),
    "llama3_rope_scaling": (dataclasses.replace(
        TINY, rope_theta=500000.0, max_seq_len=64,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)),
        "llama"),
    "llama_tied": (dataclasses.replace(TINY, tie_embeddings=True), "llama"),
    "internlm_qkvo_bias": (dataclasses.replace(TINY, num_kv_heads=4, qkv_bias=True, out_bias=True), "llama"),
    "qwen2_qkv_bias": (dataclasses.replace(TINY, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6), "qwen2"),
    # Qwen3-32B's kind of shape: heads wider than dim / num_heads (32, not 16), so q/k/v/o are not square.
    "qwen3_head_dim": (dataclasses.replace(TINY, qk_norm=True, explicit_head_dim=32, rope_theta=1e6, norm_eps=1e-6),
                       "qwen3"),
    "qwen3_tied": (dataclasses.replace(TINY, qk_norm=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
                   "qwen3"),
    # A window of 16 keys under 48-token sequences: most queries see fewer keys than without it.
    "mistral_window": (dataclasses.replace(TINY, sliding_window=16), "mistral"),
}


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, backend):
    args, family = CASES[case]
    args = dataclasses.replace(args, attention=backend)
    hf_model = _hf_model(args, family)
    model = _ours_from_hf(hf_model, args)
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # Explicit positions, [S] and [B, S] (what packing and context parallelism pass), match HF's position_ids.
    positions = torch.arange(5, 5 + tokens.shape[1])
    with torch.no_grad():
        expected = hf_model(tokens, position_ids=positions.expand(2, -1)).logits
        torch.testing.assert_close(model(tokens, positions=positions), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(tokens, positions=positions.expand(2, -1)), expected, atol=ATOL, rtol=0)


def test_the_window_and_the_qk_norm_change_the_logits():
    """The cases above would pass with a window or a q/k norm ignored only if these made no difference."""
    tokens = torch.randint(0, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    for case, without in (("mistral_window", {"sliding_window": 0}), ("qwen3_head_dim", {"qk_norm": False})):
        args, family = CASES[case]
        model = _ours_from_hf(_hf_model(args, family), args)
        other = Transformer(dataclasses.replace(args, **without)).eval()
        other.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            assert (model(tokens) - other(tokens)).abs().max() > 1e-2, case


def test_rope_scaling_frequencies_match_hf():
    args, _ = CASES["llama3_rope_scaling"]
    hf_model = _hf_model(args, "llama")
    cos, sin = rope_tables(args)
    inv_freq = hf_model.model.rotary_emb.inv_freq
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), inv_freq)
    torch.testing.assert_close(cos[:, : args.head_dim // 2], angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, : args.head_dim // 2], angles.sin(), atol=1e-6, rtol=0)
    # The case must exercise all three bands: frequencies kept, divided by `factor`, and blended.
    ratio = _rope_inv_freq(args, None) / _rope_inv_freq(dataclasses.replace(args, rope_scaling=None), None)
    factor = args.rope_scaling.factor
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / factor)).any()
    assert ((ratio < 1) & (ratio > 1 / factor + 1e-6)).any()


def test_state_dict_round_trip():
    for args, family in CASES.values():
        hf_sd = _hf_model(args, family).state_dict()
        ours = from_hf_state_dict(hf_sd, args)
        back = to_hf_state_dict(ours, args)
        expected_keys = set(hf_sd) - ({"lm_head.weight"} if args.tie_embeddings else set())
        assert set(back) == expected_keys
        for key in back:
            assert back[key] is hf_sd[key]


def test_hf_config_rejects_what_the_family_cannot_express():
    with pytest.raises(ValueError, match="qwen2"):
        hf_config(dataclasses.replace(TINY, qkv_bias=True), "llama")  # q/k/v bias without o bias
    with pytest.raises(ValueError, match="q/k/v bias"):
        hf_config(TINY, "qwen2")
    with pytest.raises(ValueError, match="valid choices"):
        hf_config(TINY, "gpt2")
    with pytest.raises(ValueError, match="family 'llama' has no per-head q/k norm.*use family 'qwen3'"):
        hf_config(dataclasses.replace(TINY, qk_norm=True), "llama")
    with pytest.raises(ValueError, match="family 'qwen3' always has a per-head q/k norm"):
        hf_config(TINY, "qwen3")
    with pytest.raises(ValueError, match="family 'llama' has no sliding window.*use family 'mistral'"):
        hf_config(dataclasses.replace(TINY, sliding_window=16), "llama")
    with pytest.raises(ValueError, match="family 'mistral' has no attention biases"):
        hf_config(dataclasses.replace(TINY, qkv_bias=True, out_bias=True), "mistral")
    with pytest.raises(ValueError, match="explicit_head_dim=32"):
        hf_config(dataclasses.replace(TINY, qkv_bias=True, explicit_head_dim=32), "qwen2")


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        from_hf_state_dict({"model.layers.0.mlp.extra.weight": torch.zeros(1)}, TINY)


# ---------------------------------------------------------------------------------------
# Document masking
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    return model.eval()


def test_single_document_equals_no_document_ids(tiny_model):
    tokens = torch.randint(0, TINY.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens, document_ids=torch.zeros(2, 32, dtype=torch.long)),
                                   tiny_model(tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_packed_documents_equal_separate_runs(tiny_model, backend):
    """Packing two documents with document ids and restarted positions gives each document's own logits."""
    model = tiny_model
    for layer in model.layers.values():
        layer.attention.backend = backend
    doc_a, doc_b = torch.randint(0, TINY.vocab_size, (1, 20)), torch.randint(0, TINY.vocab_size, (1, 12))
    packed = torch.cat([doc_a, doc_b], dim=1)
    document_ids = torch.tensor([[0] * 20 + [1] * 12])
    positions = torch.cat([torch.arange(20), torch.arange(12)]).unsqueeze(0)
    with torch.no_grad():
        got = model(packed, positions=positions, document_ids=document_ids)
        torch.testing.assert_close(got[:, :20], model(doc_a), atol=ATOL, rtol=0)
        torch.testing.assert_close(got[:, 20:], model(doc_b), atol=ATOL, rtol=0)
    for layer in model.layers.values():
        layer.attention.backend = TINY.attention


# ---------------------------------------------------------------------------------------
# Attention backends
# ---------------------------------------------------------------------------------------

def _qkv(batch=2, q_heads=8, kv_heads=2, seq=24, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_documents", [False, True])
def test_sdpa_matches_reference(kv_heads, causal, with_documents):
    q, k, v = _qkv(kv_heads=kv_heads)
    document_ids = None
    if with_documents:
        document_ids = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 24])
    grads = {}
    for backend in ("sdpa", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, backend=backend, causal=causal, document_ids=document_ids)
        out.pow(2).sum().backward()
        grads[backend] = (out.detach(), *[t.grad for t in leaves])
    for sdpa_t, ref_t in zip(grads["sdpa"], grads["reference"]):
        torch.testing.assert_close(sdpa_t, ref_t, atol=1e-5, rtol=1e-5)


def test_reference_matches_float64_math_and_lse():
    q, k, v = _qkv(kv_heads=2, seq=10)
    out, lse = reference_attention(q, k, v, causal=True, scale=0.3)
    kr, vr = (t.double().repeat_interleave(4, dim=1) for t in (k, v))
    scores = q.double() @ kr.transpose(-1, -2) * 0.3
    scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ vr, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-6, rtol=0)


def test_reference_fully_masked_row_gives_zeros_not_nan():
    q, k, v = (t.requires_grad_() for t in _qkv(kv_heads=2, seq=8))
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[3] = False  # query 3 sees no key at all
    out, lse = reference_attention(q, k, v, causal=True, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 3] == 0).all()
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isfinite(lse[:, :, :3]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unknown_backend_lists_choices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sdpa"):
        attention(q, k, v, backend="nope")
