"""Named model sizes: the shapes of public releases plus small CPU models.

Each entry is a literal ``ModelArgs`` whose fields match the release's published
``config.json`` (hidden size, layers, heads, intermediate size, vocabulary, norm epsilon,
RoPE base, biases, tying); ``max_seq_len`` is the context length the model was released
with. ``get_model_args(name)`` returns a copy, so callers may override fields freely.
"""

from __future__ import annotations

import dataclasses
import difflib

from torchtrain.models.llama import ModelArgs, RopeScaling

__all__ = ["MODELS", "get_model_args"]

# Llama 3.1's RoPE scaling ("rope_type": "llama3" in config.json) that stretches the 8192-token context of
# Llama 3 to 131072; Llama 3.2's small models use it with factor 32.
LLAMA3_1_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
LLAMA3_2_ROPE_SCALING = dataclasses.replace(LLAMA3_1_ROPE_SCALING, factor=32.0)

# meta-llama/Llama-3.1-70B: 70.55B, Llama 3 70B's shape with the RoPE scaling. Llama-3.3-70B has the same config.
_LLAMA3_1_70B = ModelArgs(
    dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=128256, ffn_dim=28672,
    norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, rope_scaling=LLAMA3_1_ROPE_SCALING,
)

MODELS: dict[str, ModelArgs] = {
    # 7.0M parameters (4.9M without the embedding table): unit tests and CPU smoke runs.
    "debug": ModelArgs(
        dim=256, num_layers=4, num_heads=8, num_kv_heads=2, vocab_size=8192, ffn_dim=704,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=False,
    ),
    # 30.9M parameters: the CPU benchmark model.
    "debug_30m": ModelArgs(
        dim=512, num_layers=8, num_heads=8, num_kv_heads=2, vocab_size=8192, ffn_dim=1408,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=False,
    ),
    # meta-llama/Llama-2-7b-hf: 6.74B.
    "llama2_7b": ModelArgs(
        dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=32000, ffn_dim=11008,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    ),
    # meta-llama/Llama-2-13b-hf: 13.02B.
    "llama2_13b": ModelArgs(
        dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, vocab_size=32000, ffn_dim=13824,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    ),
    # meta-llama/Llama-2-70b-hf: 68.98B, grouped-query attention 64/8.
    "llama2_70b": ModelArgs(
        dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=32000, ffn_dim=28672,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    ),
    # meta-llama/Meta-Llama-3-8B: 8.03B.
    "llama3_8b": ModelArgs(
        dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, vocab_size=128256, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
    ),
    # meta-llama/Meta-Llama-3-70B: 70.55B.
    "llama3_70b": ModelArgs(
        dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=128256, ffn_dim=28672,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
    ),
    # meta-llama/Llama-3.1-8B: 8.03B; Llama 3's shape with the RoPE scaling (factor 8, low_freq_factor 1,
    # high_freq_factor 4, original_max_position_embeddings 8192).
    "llama3.1_8b": ModelArgs(
        dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, vocab_size=128256, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, rope_scaling=LLAMA3_1_ROPE_SCALING,
    ),
    "llama3.1_70b": _LLAMA3_1_70B,
    # meta-llama/Llama-3.2-1B: 1.24B. Tied embeddings; head_dim 64 (= 2048 / 32); RoPE scaling factor 32.
    "llama3.2_1b": ModelArgs(
        dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, vocab_size=128256, ffn_dim=8192,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
        rope_scaling=LLAMA3_2_ROPE_SCALING,
    ),
    # meta-llama/Llama-3.2-3B: 3.21B. Tied embeddings; head_dim 128 (= 3072 / 24); RoPE scaling factor 32.
    "llama3.2_3b": ModelArgs(
        dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, vocab_size=128256, ffn_dim=8192,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
        rope_scaling=LLAMA3_2_ROPE_SCALING,
    ),
    # meta-llama/Llama-3.3-70B-Instruct: 70.55B, Llama-3.1-70B's config.json (shape, RoPE scaling, context).
    "llama3.3_70b": _LLAMA3_1_70B,
    # mistralai/Mistral-7B-v0.1: 7.24B. Every layer attends to the last 4096 keys (config.json sliding_window);
    # max_position_embeddings 32768.
    "mistral_7b": ModelArgs(
        dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, vocab_size=32000, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=32768, sliding_window=4096,
    ),
    # internlm/internlm-7b: 7.32B; Llama layout with a bias on q, k, v and o.
    "internlm_7b": ModelArgs(
        dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=103168, ffn_dim=11008,
        norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048, qkv_bias=True, out_bias=True,
    ),
    # Qwen/Qwen-14B (Qwen 1): 14.17B. Its config lists intermediate_size 27392, the combined
    # width of its two up projections; each SwiGLU branch is 13696 wide.
    "qwen_14b": ModelArgs(
        dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, vocab_size=152064, ffn_dim=13696,
        norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048, qkv_bias=True,
    ),
    # Qwen/Qwen2.5-7B: 7.62B. Released context 131072 (config.json max_position_embeddings).
    "qwen2.5_7b": ModelArgs(
        dim=3584, num_layers=28, num_heads=28, num_kv_heads=4, vocab_size=152064, ffn_dim=18944,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072, qkv_bias=True,
    ),
    # Qwen/Qwen2.5-14B: 14.77B. Note norm_eps 1e-5 here, unlike the 7B's 1e-6.
    "qwen2.5_14b": ModelArgs(
        dim=5120, num_layers=48, num_heads=40, num_kv_heads=8, vocab_size=152064, ffn_dim=13824,
        norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=131072, qkv_bias=True,
    ),
    # Qwen/Qwen3-8B: 8.19B. config.json: head_dim 128 (= 4096 / 32), per-head q/k RMSNorm, no attention bias,
    # use_sliding_window false, max_position_embeddings 40960, untied.
    "qwen3_8b": ModelArgs(
        dim=4096, num_layers=36, num_heads=32, num_kv_heads=8, vocab_size=151936, ffn_dim=12288,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, qk_norm=True,
    ),
    # Qwen/Qwen3-32B: 32.76B. config.json: head_dim 128, not 5120 / 64 = 80, so the attention is 8192 wide;
    # per-head q/k RMSNorm, no attention bias, use_sliding_window false, max_position_embeddings 40960, untied.
    "qwen3_32b": ModelArgs(
        dim=5120, num_layers=64, num_heads=64, num_kv_heads=8, vocab_size=151936, ffn_dim=25600,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, qk_norm=True, explicit_head_dim=128,
    ),
}


def get_model_args(name: str) -> ModelArgs:
    """A copy of the named ``ModelArgs``; ``ValueError`` listing the valid names otherwise."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {sorted(MODELS)}")
    return dataclasses.replace(MODELS[name])
