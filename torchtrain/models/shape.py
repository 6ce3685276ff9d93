"""The model shape of a run, resolved in one place: a registry size, or the ``config.json`` of the
Hugging Face model a run starts from, with the recipe's context length, RoPE base and attention
backend. Training, planning, generation and export all take the shape from :func:`model_args_for`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from torchtrain.config import HF_MODEL, Config, ConfigError
from torchtrain.models.attention_choice import DEFAULT_BACKEND, capability_name, measured_choice, variant_of
from torchtrain.models.hf import model_args_from_hf_config
from torchtrain.models.llama import ModelArgs
from torchtrain.models.registry import get_model_args

logger = logging.getLogger(__name__)

__all__ = ["model_args_for", "model_args_from_hf_folder"]


def model_args_from_hf_folder(folder: str | Path) -> ModelArgs:
    """``model_args_from_hf_config`` of ``folder/config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json")
    return model_args_from_hf_config(json.loads(path.read_text()))


def model_args_for(config: Config, device: torch.device) -> ModelArgs:
    """The recipe's model shape with its attention backend ("auto": :func:`auto_attention`) and the
    recipe's overrides of its context length, RoPE base and sliding window.

    ``model.name = "hf"`` reads ``checkpoint.initial_load_path``'s ``config.json``; a folder that gives
    no shape raises :class:`ConfigError` naming the key.
    """
    if config.model.name == HF_MODEL:
        folder = config.checkpoint.initial_load_path
        try:
            args = model_args_from_hf_folder(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{config.source}: checkpoint.initial_load_path = {folder!r} is invalid; its config.json "
                              f"gives no model shape: {e}") from None
        if config.training.seq_len > args.max_seq_len and not config.model.max_seq_len:
            # Continued pre-training at a longer context than the release's: extend the RoPE table.
            logger.warning("training.seq_len %d is longer than the %d positions of %s; positions beyond are new "
                           "to the model", config.training.seq_len, args.max_seq_len, folder)
            args.max_seq_len = config.training.seq_len
    else:
        args = get_model_args(config.model.name)
    args.max_seq_len = config.model.max_seq_len or args.max_seq_len
    args.rope_theta = config.model.rope_theta or args.rope_theta
    args.sliding_window = config.model.sliding_window or args.sliding_window
    attention = config.model.attention
    args.attention = auto_attention(device, config.data.document_mask, args.sliding_window) if attention == "auto" \
        else attention
    return args


def auto_attention(device: torch.device, document_mask: bool, sliding_window: int) -> str:
    """``model.attention = "auto"``: a backend proven on the device. On CUDA, PyTorch's SDPA (flash / cuDNN) for
    plain causal attention and FlexAttention where documents or a window mask it, unless a recorded GPU check on
    this compute capability measured our Triton kernels correct and faster (``models/attention_choice.py``).
    SDPA elsewhere."""
    if device.type != "cuda":
        return "sdpa"
    variant = variant_of(document_mask, sliding_window)
    if not torch.cuda.is_available():  # planning a GPU run on a machine without one: no device to look up
        return DEFAULT_BACKEND[variant]
    capability = capability_name(*torch.cuda.get_device_capability(device))
    return measured_choice(capability, variant) or DEFAULT_BACKEND[variant]
