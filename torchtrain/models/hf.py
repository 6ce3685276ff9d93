"""Hugging Face interop: config fields and state-dict key names.

Our layout equals Hugging Face's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
``MistralForCausalLM`` layout up to key names (RoPE uses the same rotate-half convention, so no
weight permutation is needed), so conversion is a renaming table. ``transformers`` itself is not imported here: it is only
a test dependency.

* ``hf_config(args, family)``: the ``config.json`` fields of the equivalent HF model;
  ``LlamaConfig(**hf_config(args, "llama"))`` builds it.
* ``from_hf_state_dict(hf_sd, args)`` / ``to_hf_state_dict(sd, args)``: rename keys (tensors
  are passed through, not copied). Keys of absent layers are simply absent, so a pipeline
  stage's partial state dict converts too.
* ``model_args_from_hf_config(config_json)``: ``ModelArgs`` from a released ``config.json`` of
  Llama 2/3/3.1/3.2/3.3, Qwen2/2.5, Qwen3 (dense), Mistral, Qwen (1), InternLM and InternLM2
  (``HF_MODEL_TYPES``).

* ``SCHEMES``: how each family's checkpoints name our tensors (``llama``: Llama 2/3, Qwen2/2.5,
  Qwen3, Mistral and InternLM 1; ``qwen``: Qwen 1; ``internlm2``), picked from a folder's tensor
  names by ``scheme_of``;
  ``hf_source(name, scheme, args)`` is the checkpoint tensor (and the q/k/v part of a packed one)
  holding our parameter ``name``, ``unpack_qkv`` cuts that part out and ``pack_qkv`` puts it back.
  ``torchtrain.hf_checkpoint`` reads and writes the files with these tables.
* ``export_config(args, family)``: ``hf_config`` for the transformers families, and the released
  config fields of the remote-code ones (Qwen 1, InternLM2) an export can also write
  (``export_families``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from torchtrain.models.llama import ModelArgs, RopeScaling

__all__ = ["HF_ARCHITECTURES", "HF_MODEL_TYPES", "SCHEMES", "hf_config", "from_hf_state_dict", "to_hf_state_dict",
           "model_args_from_hf_config", "hf_source", "scheme_of", "unpack_qkv",
           "REMOTE_CODE_ARCHITECTURES", "export_families", "export_scheme", "export_family_of", "export_config",
           "pack_qkv"]

HF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # bias on q/k/v/o together or not at all (attention_bias)
    "qwen2": "Qwen2ForCausalLM",  # bias on q/k/v, never on o
    "qwen3": "Qwen3ForCausalLM",  # per-head q/k RMSNorm; head_dim its own; bias on q/k/v/o together or not at all
    "mistral": "MistralForCausalLM",  # Llama's names, no biases, a sliding window (or none)
}

# HF name -> our name, outside the blocks.
_TOP_LEVEL: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# HF module path -> ours, inside block N (``model.layers.N.`` <-> ``layers.N.``).
_PER_LAYER: dict[str, str] = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",  # Qwen3
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}

_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def _rename(key: str, top_level: dict[str, str], per_layer: dict[str, str],
            pattern: re.Pattern, prefix: str) -> str:
    if key in top_level:
        return top_level[key]
    match = pattern.fullmatch(key)
    if match is not None and match.group(2) in per_layer:
        layer, module, kind = match.groups()
        return f"{prefix}{layer}.{per_layer[module]}.{kind}"
    raise ValueError(f"no mapping for state-dict key {key!r}")


def from_hf_state_dict(hf_sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Hugging Face Llama/Qwen2 keys -> ours. With tied embeddings ``output.weight`` is the embedding tensor."""
    sd: dict[str, Tensor] = {}
    for key, value in hf_sd.items():
        if key.endswith("rotary_emb.inv_freq"):  # a derived buffer some old checkpoints saved
            continue
        if args.tie_embeddings and key == "lm_head.weight":
            continue
        sd[_rename(key, _TOP_LEVEL, _PER_LAYER, _HF_LAYER_KEY, "layers.")] = value
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


_TOP_LEVEL_TO_HF = {ours: hf for hf, ours in _TOP_LEVEL.items()}
_PER_LAYER_TO_HF = {ours: hf for hf, ours in _PER_LAYER.items()}


def to_hf_state_dict(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Our keys -> Hugging Face's. With tied embeddings ``lm_head.weight`` is left out, as in released checkpoints."""
    hf_sd: dict[str, Tensor] = {}
    for key, value in sd.items():
        if args.tie_embeddings and key == "output.weight":
            continue
        hf_sd[_rename(key, _TOP_LEVEL_TO_HF, _PER_LAYER_TO_HF, _OUR_LAYER_KEY, "model.layers.")] = value
    return hf_sd


def hf_config(args: ModelArgs, family: str = "llama") -> dict[str, Any]:
    """The ``config.json`` fields of the Hugging Face model equal to ``args``.

    ``family`` is ``"llama"`` (``LlamaForCausalLM``; InternLM's q/k/v/o biases map to
    ``attention_bias``), ``"qwen2"`` (``Qwen2ForCausalLM``: q/k/v bias, no o bias), ``"qwen3"``
    (``Qwen3ForCausalLM``: the per-head q/k norm, which it always has) or ``"mistral"``
    (``MistralForCausalLM``: no biases; the one family with a sliding window). RoPE is
    written as ``rope_theta`` + ``rope_scaling``, the form in the released config files,
    which transformers 4.x reads directly and 5.x converts into ``rope_parameters``.
    Raises ``ValueError`` if the family cannot express ``args``.
    """
    if family not in HF_ARCHITECTURES:
        raise ValueError(f"unknown HF family {family!r}; valid choices: {sorted(HF_ARCHITECTURES)}")
    rope_scaling = None
    if args.rope_scaling is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling.factor,
            "low_freq_factor": args.rope_scaling.low_freq_factor,
            "high_freq_factor": args.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": args.rope_scaling.original_max_seq_len,
        }
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_embeddings,
    }
    # NOTE: a feature the family's HF model lacks would be dropped silently by a config.json that cannot
    # say it, and the exported model would compute something else: refuse instead.
    if args.qk_norm != (family == "qwen3"):
        raise ValueError(f"family {family!r} {'always has a' if family == 'qwen3' else 'has no'} per-head q/k norm, "
                         f"but ModelArgs has qk_norm={args.qk_norm}; "
                         f"use family {'qwen3' if args.qk_norm else 'llama'!r}")
    if args.sliding_window and family != "mistral":
        raise ValueError(f"family {family!r} has no sliding window, but ModelArgs has sliding_window="
                         f"{args.sliding_window}; use family 'mistral'")
    if family in ("llama", "qwen3"):
        if args.qkv_bias != args.out_bias:
            raise ValueError(
                f"family {family!r} has one attention_bias flag for q/k/v/o, but ModelArgs has "
                f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}; use family 'qwen2' for q/k/v-only bias")
        config.update(attention_bias=args.qkv_bias, head_dim=args.head_dim)
        if family == "llama":
            config.update(mlp_bias=False)
        else:
            config.update(use_sliding_window=False, sliding_window=None)
    elif family == "mistral":
        if args.qkv_bias or args.out_bias:
            raise ValueError("family 'mistral' has no attention biases, but ModelArgs has "
                             f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}")
        config.update(head_dim=args.head_dim, sliding_window=args.sliding_window or None)
    else:
        if not args.qkv_bias or args.out_bias:
            raise ValueError(
                "family 'qwen2' always has a q/k/v bias and no o bias, but ModelArgs has "
                f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}")
        if args.explicit_head_dim:
            raise ValueError(f"family 'qwen2' has head_dim = hidden_size // num_attention_heads, but ModelArgs has "
                             f"explicit_head_dim={args.explicit_head_dim}; use family 'qwen3' or 'llama'")
        config.update(use_sliding_window=False)
    return config


# config.json ``model_type`` values ``model_args_from_hf_config`` reads.
HF_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "qwen", "internlm", "internlm2")


def _rope_from_hf(cfg: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and Llama-3.1 scaling from either the released form (``rope_theta`` +
    ``rope_scaling``) or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta", params.get("rope_theta", default_theta)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_seq_len=int(scaling["original_max_position_embeddings"]))
    raise ValueError(f"rope scaling type {kind!r} is not supported (only 'llama3' and none)")


def model_args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """The ``ModelArgs`` of a Hugging Face ``config.json`` (a parsed dict).

    ``model_type`` selects the field names: ``llama`` (``attention_bias`` -> q/k/v/o biases),
    ``qwen2`` (q/k/v biases), ``qwen3`` (``attention_bias``; the q/k norm; ``head_dim``, 128 when
    absent as in transformers; a window in some layers, ``use_sliding_window``, is refused),
    ``mistral`` (``sliding_window``, null: none), ``qwen`` (Qwen 1: ``intermediate_size`` is the width of both up
    projections together, so each SwiGLU branch is half of it; ``seq_length``,
    ``rotary_emb_base``, ``layer_norm_epsilon``; ``c_attn`` always has a bias), ``internlm``
    (InternLM 1: ``bias`` -> q/k/v/o biases) and ``internlm2`` (``bias`` -> wqkv and wo biases).
    Raises ``ValueError`` for other model types or features our model lacks.
    """
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported; valid choices: {list(HF_MODEL_TYPES)}")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if model_type == "qwen":
        if not cfg.get("no_bias", True):
            raise ValueError("Qwen config has no_bias = false (biases on the MLP), which our model lacks")
        if cfg.get("rotary_pct", 1.0) != 1.0:
            raise ValueError(f"Qwen config has rotary_pct = {cfg['rotary_pct']}; only 1.0 is supported")
        kv_channels = cfg.get("kv_channels", dim // heads)
        if kv_channels * heads != dim:
            raise ValueError(f"Qwen config kv_channels {kv_channels} * heads {heads} != hidden_size {dim}")
        args = ModelArgs(
            dim=dim, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads,
            vocab_size=int(cfg["vocab_size"]), ffn_dim=int(cfg["intermediate_size"]) // 2,
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)), rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
            max_seq_len=int(cfg.get("seq_length", cfg.get("max_position_embeddings", 2048))),
            qkv_bias=True, out_bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        args.validate()
        return args
    theta, scaling = _rope_from_hf(cfg, 1e6 if model_type == "internlm2" else 10000.0)
    if model_type == "llama":
        if cfg.get("mlp_bias", False):
            raise ValueError("Llama config has mlp_bias = true, which our model lacks")
        qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
    elif model_type == "qwen2":
        qkv_bias, out_bias = True, False
        if cfg.get("use_sliding_window", False):
            raise ValueError("Qwen2 config has use_sliding_window = true, which our model lacks")
    elif model_type == "qwen3":
        qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
        # NOTE: Qwen3 slides the window only in the layers from max_window_layers on (and only with
        # use_sliding_window); our blocks share one window, so such a mix is refused.
        sliding_layers = [t for t in cfg.get("layer_types") or [] if t == "sliding_attention"]
        if sliding_layers or (cfg.get("use_sliding_window", False) and cfg.get("sliding_window")
                              and cfg.get("max_window_layers", 28) < int(cfg["num_hidden_layers"])):
            raise ValueError("Qwen3 config has use_sliding_window = true (a window in some layers only), which our "
                             "model lacks")
    elif model_type == "mistral":
        qkv_bias = out_bias = False
    else:  # internlm, internlm2
        qkv_bias = out_bias = bool(cfg.get("bias", model_type == "internlm"))
    # NOTE: an explicit head_dim equal to hidden_size // heads is stored as 0 (derived), so the same
    # model read from configs with and without the key gives equal ModelArgs.
    head_dim = cfg.get("head_dim") or (128 if model_type == "qwen3" else None)
    explicit_head_dim = 0 if head_dim is None or int(head_dim) * heads == dim else int(head_dim)
    if explicit_head_dim and model_type not in ("llama", "qwen3", "mistral"):
        raise ValueError(f"config head_dim {head_dim} * num_attention_heads {heads} != hidden_size {dim}; "
                         f"model_type {model_type!r} needs head_dim = hidden_size // num_attention_heads")
    args = ModelArgs(
        dim=dim, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab_size=int(cfg["vocab_size"]),
        ffn_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        qkv_bias=qkv_bias, out_bias=out_bias, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        explicit_head_dim=explicit_head_dim, qk_norm=model_type == "qwen3",
        # (transformers' MistralConfig defaults sliding_window to 4096 when the key is absent; null is none)
        sliding_window=int(cfg.get("sliding_window", 4096) or 0) if model_type == "mistral" else 0)
    args.validate()
    return args


# ---- Checkpoint naming schemes: how each family names our tensors in its safetensors files

# scheme -> (our top-level name -> HF name, our per-layer module -> (HF module, part of a packed tensor or None),
#            HF per-layer prefix)
_QKV = {"attention.wq": "q", "attention.wk": "k", "attention.wv": "v"}
SCHEMES: dict[str, tuple[dict[str, str], dict[str, tuple[str, Optional[str]]], str]] = {
    "llama": ({ours: hf for hf, ours in _TOP_LEVEL.items()},
              {ours: (hf, None) for hf, ours in _PER_LAYER.items()}, "model.layers."),
    "qwen": ({"tok_embeddings.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
              "output.weight": "lm_head.weight"},
             {**{m: ("attn.c_attn", part) for m, part in _QKV.items()},
              "attention.wo": ("attn.c_proj", None),
              "feed_forward.w1": ("mlp.w2", None),  # Qwen 1's gate is w2: c_proj(w1(x) * silu(w2(x)))
              "feed_forward.w3": ("mlp.w1", None),
              "feed_forward.w2": ("mlp.c_proj", None),
              "attention_norm": ("ln_1", None), "ffn_norm": ("ln_2", None)}, "transformer.h."),
    "internlm2": ({"tok_embeddings.weight": "model.tok_embeddings.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "output.weight"},
                  {**{m: ("attention.wqkv", part) for m, part in _QKV.items()},
                   **{m: (m, None) for m in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                             "attention_norm", "ffn_norm")}}, "model.layers."),
}


@dataclass(frozen=True)
class HFSource:
    key: str  # HF tensor name
    part: Optional[str] = None  # "q", "k" or "v" of a packed q/k/v tensor


def hf_source(name: str, scheme: str, args: ModelArgs) -> HFSource:
    top, per_layer, prefix = SCHEMES[scheme]
    if name == "output.weight" and args.tie_embeddings:
        return HFSource(top["tok_embeddings.weight"])
    if name in top:
        return HFSource(top[name])
    match = _OUR_LAYER_KEY.fullmatch(name)
    if match is not None and match.group(2) in per_layer:
        layer, module, kind = match.groups()
        hf_module, part = per_layer[module]
        return HFSource(f"{prefix}{layer}.{hf_module}.{kind}", part)
    raise ValueError(f"no Hugging Face name for parameter {name!r} in naming scheme {scheme!r}")


def unpack_qkv(tensor: Tensor, part: Optional[str], scheme: str, args: ModelArgs) -> Tensor:
    """Our q, k or v slice of a packed q/k/v weight or bias (the whole tensor if ``part`` is None)."""
    if part is None:
        return tensor
    hd, kv = args.head_dim, args.num_kv_heads
    q_per_kv = args.num_heads // kv
    index = "qkv".index(part)
    if scheme == "qwen":  # [q; k; v] stacked along dim 0
        sizes = [args.num_heads * hd, kv * hd, kv * hd]
        if tensor.shape[0] != sum(sizes):
            raise PackedShapeError(f"packed q/k/v rows {sum(sizes)}", tensor.shape)
        return tensor.split(sizes, dim=0)[index]
    # internlm2: [kv groups, q_per_kv + 2 (q..., k, v), head_dim, (dim)]
    rows = kv * (q_per_kv + 2) * hd
    if tensor.shape[0] != rows:
        raise PackedShapeError(f"packed q/k/v rows {rows}", tensor.shape)
    grouped = tensor.reshape(kv, q_per_kv + 2, hd, *tensor.shape[1:])
    picked = grouped[:, :q_per_kv] if part == "q" else grouped[:, q_per_kv + index - 1: q_per_kv + index]
    return picked.reshape(-1, *tensor.shape[1:])


class PackedShapeError(Exception):
    def __init__(self, expected: str, got: torch.Size):
        super().__init__(expected, got)
        self.expected, self.got = expected, got


def scheme_of(keys: set[str]) -> str:
    if "transformer.wte.weight" in keys or any(k.startswith("transformer.h.") for k in keys):
        return "qwen"
    if "model.tok_embeddings.weight" in keys or any(".attention.wqkv." in k for k in keys):
        return "internlm2"
    return "llama"


# ---- Export: the families a training checkpoint can be written as, and the inverse of unpack_qkv

# Families whose modeling code is not in transformers (``trust_remote_code``): their folders load with the
# family's own code, next to the weights. Each is written in the naming scheme of the same name.
REMOTE_CODE_ARCHITECTURES: dict[str, str] = {"qwen": "QWenLMHeadModel", "internlm2": "InternLM2ForCausalLM"}

# config.json model_type -> the family an export writes by default (InternLM 1 uses Llama's names, and
# LlamaForCausalLM's one attention_bias flag holds its q/k/v/o biases).
_EXPORT_FAMILY_OF_MODEL_TYPE = {"internlm": "llama"}


def export_families() -> list[str]:
    """Every ``family`` ``export_config`` writes: the transformers families, then the remote-code ones."""
    return [*HF_ARCHITECTURES, *REMOTE_CODE_ARCHITECTURES]


def export_scheme(family: str) -> str:
    """The naming scheme (``SCHEMES``) a ``family``'s checkpoint uses."""
    return family if family in REMOTE_CODE_ARCHITECTURES else "llama"


def export_family_of(model_type: Optional[str]) -> Optional[str]:
    """The export family of a config.json ``model_type`` (None if it is not one we write)."""
    family = _EXPORT_FAMILY_OF_MODEL_TYPE.get(model_type, model_type)
    return family if family in export_families() else None


def export_config(args: ModelArgs, family: str) -> dict[str, Any]:
    """The ``config.json`` fields of ``args`` as ``family`` (any of ``export_families()``); ``hf_config``
    for the transformers families. Raises ``ValueError`` if the family cannot express ``args``.

    Qwen (1) and InternLM2 are written with the field names of their released config files, which
    ``model_args_from_hf_config`` reads back to ``args``. Qwen's long-context tricks (dynamic NTK,
    log-n attention scaling) are switched off: our model has neither.
    """
    if family not in REMOTE_CODE_ARCHITECTURES:
        if family not in HF_ARCHITECTURES:
            raise ValueError(f"unknown HF family {family!r}; valid choices: {export_families()}")
        return hf_config(args, family)
    # NOTE: as in hf_config, what the family's config cannot say is refused, not dropped.
    if args.rope_scaling is not None or args.sliding_window or args.qk_norm or args.explicit_head_dim:
        raise ValueError(f"family {family!r} has no Llama-3.1 RoPE scaling, sliding window, q/k norm or head width "
                         f"of its own, but ModelArgs has rope_scaling={args.rope_scaling}, sliding_window="
                         f"{args.sliding_window}, qk_norm={args.qk_norm}, explicit_head_dim={args.explicit_head_dim}")
    common = {"architectures": [REMOTE_CODE_ARCHITECTURES[family]], "model_type": family,
              "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": args.num_layers,
              "num_attention_heads": args.num_heads, "max_position_embeddings": args.max_seq_len,
              "tie_word_embeddings": args.tie_embeddings}
    if family == "qwen":
        if args.num_kv_heads != args.num_heads or not args.qkv_bias or args.out_bias:
            raise ValueError(
                "family 'qwen' (Qwen 1) has as many key/value heads as query heads, a q/k/v bias and no o bias, but "
                f"ModelArgs has num_kv_heads={args.num_kv_heads} of num_heads={args.num_heads}, "
                f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}")
        return {**common, "intermediate_size": 2 * args.ffn_dim,  # Qwen 1 counts both up projections
                "kv_channels": args.head_dim, "layer_norm_epsilon": args.norm_eps,
                "rotary_emb_base": args.rope_theta, "rotary_pct": 1.0, "seq_length": args.max_seq_len,
                "no_bias": True, "use_dynamic_ntk": False, "use_logn_attn": False}
    if args.qkv_bias != args.out_bias:
        raise ValueError("family 'internlm2' has one bias flag for wqkv and wo, but ModelArgs has "
                         f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}")
    return {**common, "intermediate_size": args.ffn_dim, "num_key_value_heads": args.num_kv_heads,
            "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "rope_scaling": None, "bias": args.qkv_bias}


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, scheme: str, args: ModelArgs) -> Tensor:
    """The packed q/k/v weight or bias of ``scheme`` ("qwen" or "internlm2") from our wq, wk, wv:
    the exact inverse of ``unpack_qkv``."""
    if scheme == "qwen":
        return torch.cat([q, k, v], dim=0)
    kv, hd = args.num_kv_heads, args.head_dim
    rest = q.shape[1:]
    return torch.cat([q.reshape(kv, args.num_heads // kv, hd, *rest), k.reshape(kv, 1, hd, *rest),
                      v.reshape(kv, 1, hd, *rest)], dim=1).reshape(-1, *rest)
