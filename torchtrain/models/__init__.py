"""Models: the Llama-family ``Transformer``, its attention backends, named sizes and HF interop."""

from torchtrain.models.attention import BACKENDS, attention, reference_attention
from torchtrain.models.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from torchtrain.models.llama import ModelArgs, RopeScaling, Transformer
from torchtrain.models.registry import MODELS, get_model_args

__all__ = [
    "BACKENDS", "attention", "reference_attention",
    "ModelArgs", "RopeScaling", "Transformer",
    "MODELS", "get_model_args",
    "hf_config", "from_hf_state_dict", "to_hf_state_dict",
]
