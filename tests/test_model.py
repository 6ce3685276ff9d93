"""Model construction, initialisation, registry and shape bookkeeping (CPU, tiny sizes)."""

import copy
import dataclasses

import pytest
import torch

from torchtrain.models import MODELS, ModelArgs, RopeScaling, Transformer, get_model_args
from torchtrain.models.llama import apply_rope

TINY = ModelArgs(dim=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=64)


def _meta_init(args: ModelArgs, seed: int) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# ---------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------

def test_meta_init_is_deterministic():
    a, b, c = _meta_init(TINY, 0), _meta_init(TINY, 0), _meta_init(TINY, 1)
    state_a, state_b, state_c = _state(a), _state(b), _state(c)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    for name, p in a.named_parameters():
        if p.std() > 0:  # not ones/zeros
            assert not torch.equal(p, state_c[name]), f"{name} ignores the seed"


def test_init_weights_on_a_normally_built_model_matches_meta_build():
    torch.manual_seed(123)
    model = Transformer(TINY)
    model.init_weights(seed=0)
    meta_built = _state(_meta_init(TINY, 0))
    for name, t in _state(model).items():
        assert torch.equal(t, meta_built[name]), name


def test_init_values():
    model = _meta_init(dataclasses.replace(TINY, qkv_bias=True, out_bias=True), 0)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert (p == 0).all(), name
        if "norm" in name:
            assert (p == 1).all(), name
    block = model.layers["0"]
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.002
    assert abs(block.attention.wq.weight.std().item() - 0.02 * 0.88) < 0.003  # truncated at 3 std
    # Residual-writing projections are scaled down by sqrt(2 * num_layers).
    ratio = block.feed_forward.w2.weight.std() / block.feed_forward.w1.weight.std()
    assert abs(ratio.item() - (2 * TINY.num_layers) ** -0.5) < 0.05
    assert block.attention.wo.weight.abs().max() <= 3 * 0.02 / (2 * TINY.num_layers) ** 0.5


def test_rope_buffers_are_not_in_the_state_dict_and_follow_buffer_device():
    model = _meta_init(TINY, 0)
    assert not any("rope" in key for key in model.state_dict())
    reference = Transformer(TINY)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos, atol=0, rtol=0)
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.shape == (TINY.max_seq_len, TINY.head_dim)
    with torch.device("meta"):
        meta_model = Transformer(TINY)
    meta_model.init_weights(buffer_device="cpu")
    assert meta_model.rope_sin.device.type == "cpu"
    torch.testing.assert_close(meta_model.rope_sin, reference.rope_sin, atol=0, rtol=0)


def test_tied_embeddings_share_storage():
    args = dataclasses.replace(TINY, tie_embeddings=True)
    for model in (Transformer(args), _meta_init(args, 0)):
        assert model.output.weight is model.tok_embeddings.weight
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
        assert sum(p.numel() for p in model.parameters()) == args.num_params()
    model = _meta_init(args, 0)
    tokens = torch.randint(0, args.vocab_size, (2, 8))
    model(tokens).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return _meta_init(TINY, 0).eval()


def test_forward_shapes_positions_and_dtype(model):
    tokens = torch.randint(0, TINY.vocab_size, (3, 16))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (3, 16, TINY.vocab_size) and logits.dtype == torch.float32
        torch.testing.assert_close(model(tokens, positions=torch.arange(16)), logits, atol=0, rtol=0)
        torch.testing.assert_close(model(tokens, positions=torch.arange(16).expand(3, 16)), logits, atol=0, rtol=0)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        assert bf16(tokens).dtype == torch.bfloat16
        # fp32 RoPE tables do not promote bf16 queries/keys (autocast, FSDP mixed precision).
        x = torch.randn(1, 2, 16, TINY.head_dim, dtype=torch.bfloat16)
        assert apply_rope(x, model.rope_cos[:16], model.rope_sin[:16]).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


def test_pipeline_style_split_matches_full_model(model):
    """Dropping blocks and setting embeddings / norm / output to None gives hidden states in and out."""
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"], first.layers["3"]
    first.norm = first.output = None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    assert list(last.layers.keys()) == ["2", "3"]
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 16, TINY.dim)
        torch.testing.assert_close(last(hidden), model(tokens), atol=1e-6, rtol=0)


def _saved_for_backward(model: torch.nn.Module, tokens: torch.Tensor, autocast: bool) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves in one forward with the loss, and the loss."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens, labels=tokens)
    return sum(storages.values()), loss


def test_autocast_saves_what_bf16_parameters_save():
    """Mixed precision without FSDP (autocast) keeps the activations that FSDP's bf16 parameters keep.

    The instrument is autograd's own saved-tensor hooks, on the default recipe's model: under autocast
    each matmul casts its fp32 input, and a residual stream left in fp32 would be cast (and saved) once
    per matmul reading it, three times per attention and twice per MLP.
    """
    args = dataclasses.replace(get_model_args("debug"), max_seq_len=128)
    fp32 = _meta_init(args, 0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (2, 128))
    autocast_bytes, autocast_loss = _saved_for_backward(fp32, tokens, autocast=True)
    bf16_bytes, bf16_loss = _saved_for_backward(bf16, tokens, autocast=False)
    assert autocast_bytes <= bf16_bytes * 1.01, (autocast_bytes, bf16_bytes)
    torch.testing.assert_close(autocast_loss.float(), bf16_loss.float(), rtol=1e-2, atol=0)


def test_backward_gives_finite_gradients_everywhere():
    model = _meta_init(dataclasses.replace(TINY, qkv_bias=True), 0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    document_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    model(tokens, document_ids=document_ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------
# ModelArgs validation, registry, counts
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    (dict(dim=66), "divisible by num_heads"),
    (dict(num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dim=12, num_heads=4), "even"),
    (dict(explicit_head_dim=-8), "explicit_head_dim must be an integer >= 0"),
    (dict(explicit_head_dim=15), "head_dim .* must be even"),
    (dict(attention="flash"), r"valid choices: \['flex', 'reference', 'sdpa', 'triton'\]"),
    (dict(rope_scaling=RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)), "low_freq_factor"),
])
def test_validate_rejects_bad_args(override, message):
    args = dataclasses.replace(TINY, **override)
    with pytest.raises(ValueError, match=message):
        args.validate()
    with pytest.raises(ValueError, match=message):
        Transformer(args)


def test_registry_names_and_copies():
    for name in MODELS:
        MODELS[name].validate()
    args = get_model_args("llama3_8b")
    args.max_seq_len = 1
    assert MODELS["llama3_8b"].max_seq_len == 8192
    with pytest.raises(ValueError, match=r"Did you mean 'llama3_8b'.*Valid names"):
        get_model_args("llama3-8b")
    with pytest.raises(ValueError, match="Valid names"):
        get_model_args("zzz")


# Published totals (billions, two decimals) of the public releases.
PUBLISHED_BILLIONS = {
    "llama2_7b": 6.74,
    "llama2_13b": 13.02,
    "llama2_70b": 68.98,
    "llama3_8b": 8.03,
    "llama3_70b": 70.55,
    "internlm_7b": 7.32,
    "qwen_14b": 14.17,
    "qwen2.5_7b": 7.62,
    "qwen2.5_14b": 14.77,
    "llama3.1_8b": 8.03,
    "llama3.1_70b": 70.55,
    "llama3.2_1b": 1.24,
    "llama3.2_3b": 3.21,
    "llama3.3_70b": 70.55,
    "mistral_7b": 7.24,
    "qwen3_8b": 8.19,
    "qwen3_32b": 32.76,
}


@pytest.mark.parametrize("name", list(PUBLISHED_BILLIONS))
def test_param_counts_match_published_and_meta_model(name):
    args = get_model_args(name)
    total = args.num_params()
    assert round(total / 1e9, 2) == PUBLISHED_BILLIONS[name]
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == total
    # (a tied output projection is counted: it does the output's matmul work; see ModelArgs.num_params)
    non_embedding = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)
                        if n != "tok_embeddings.weight")
    assert args.num_params(exclude_embedding=True) == non_embedding


def test_param_counts_exact():
    assert get_model_args("llama2_7b").num_params() == 6_738_415_616
    assert get_model_args("llama2_70b").num_params() == 68_976_648_192
    assert get_model_args("llama3_8b").num_params() == 8_030_261_248


def test_flops_per_token_convention():
    args = get_model_args("debug")
    n = args.num_params(exclude_embedding=True)
    assert args.flops_per_token(2048) == 6 * n + 12 * args.num_layers * args.dim * 2048
    # The output projection counts even when tied; only the input table is excluded.
    tied = dataclasses.replace(args, tie_embeddings=True)
    assert tied.flops_per_token(2048) == args.flops_per_token(2048)
    assert tied.num_params() == args.num_params() - args.vocab_size * args.dim
    # The attention term is the attention's width, num_heads * head_dim: Qwen3-32B's 64 * 128, not dim 5120.
    qwen3 = get_model_args("qwen3_32b")
    assert qwen3.flops_per_token(4096) == (6 * qwen3.num_params(exclude_embedding=True)
                                           + 12 * qwen3.num_layers * 64 * 128 * 4096)
    # A window counts min(s, w) keys per query.
    mistral = get_model_args("mistral_7b")
    assert mistral.flops_per_token(32768) == (6 * mistral.num_params(exclude_embedding=True)
                                              + 12 * mistral.num_layers * mistral.dim * 4096)


def test_a_wider_head_and_the_qk_norm_in_the_model():
    args = dataclasses.replace(TINY, explicit_head_dim=32, qk_norm=True)  # 4 heads of 32 on a 64-wide stream
    model = _meta_init(args, 0)
    attention = model.layers["0"].attention
    assert args.head_dim == 32 and attention.wq.weight.shape == (4 * 32, 64) and attention.wo.weight.shape == (64, 128)
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (32,)
    assert torch.equal(attention.q_norm.weight, torch.ones(32))
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, args.vocab_size)
    assert dataclasses.replace(TINY, explicit_head_dim=0).head_dim == TINY.dim // TINY.num_heads


def test_a_block_draws_the_same_values_whatever_else_the_module_holds():
    # A pipeline stage keeps some blocks and drops the embedding or the output; its blocks must
    # start from the values the whole model gives them.
    full = _meta_init(TINY, 7)
    with torch.device("meta"):
        stage = Transformer(TINY)
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    stage.to_empty(device="cpu")
    stage.init_weights(seed=7)
    full_state = _state(full)
    for name, t in _state(stage).items():
        assert torch.equal(t, full_state[name]), name

