"""Export a training checkpoint as a Hugging Face model folder.

    python -m torchtrain.export --config recipes/debug.toml \\
        --checkpoint outputs/debug/checkpoints/step-00000150 --out hf/debug \\
        [--family llama|qwen2|qwen3|mistral|qwen|internlm2] [--dtype bfloat16|float32|float16] \\
        [--tokenizer PATH] [--max-shard-mb 5000] [--section.key value ...]
    torchrun --standalone --nproc_per_node=4 -m torchtrain.export ...   # the shards split among 4 processes

Streams on the CPU: the model tensors of the DCP checkpoint (whatever parallel layout wrote it) are
read one at a time and written into safetensors shards as they come, so memory holds about one
tensor, never the model. Under torchrun the shards are divided among the processes (gloo); the
folder is the same whatever their number. Extra ``--section.key value`` arguments override the
recipe, as in training (e.g. ``--model.name``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from torchtrain.checks import check_model
from torchtrain.config import HF_MODEL, ConfigError, load_config, recipe_help
from torchtrain.hf_checkpoint import EXPORT_DTYPES, export_checkpoint
from torchtrain.models.hf import export_families, export_family_of
from torchtrain.models.shape import model_args_for


def recipe_tokenizer(config) -> str:
    """The ``tokenizer.json`` path the recipe trains with (the default BPE from its cache)."""
    from torchtrain.data.corpus import DEFAULT_CORPUS, open_corpus
    from torchtrain.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    data = config.data
    if data.tokenizer == DEFAULT_TOKENIZER:
        tokenizer = load_tokenizer(DEFAULT_TOKENIZER, vocab_size=data.vocab_size, cache_dir=data.cache_dir,
                                   corpus=open_corpus(DEFAULT_CORPUS, data.text_field))
    else:
        tokenizer = load_tokenizer(data.tokenizer)
    return str(tokenizer.path)


def default_family(config) -> str:
    """The family of the Hugging Face model the run started from (``model.name = "hf"``), else ``llama``."""
    if config.model.name == HF_MODEL and config.checkpoint.initial_load_path:
        path = Path(config.checkpoint.initial_load_path) / "config.json"
        try:
            family = export_family_of(json.loads(path.read_text()).get("model_type"))
        except (OSError, ValueError):
            family = None
        if family is not None:
            return family
    return "llama"


def default_dtype(config) -> str:
    """The dtype the recipe trains in: ``training.dtype``, whose ``auto`` is bfloat16 on the GPUs training runs on
    (the parameters are kept in fp32 and cast to it for compute, so it is the precision the model was fitted in)."""
    return "bfloat16" if config.training.dtype == "auto" else config.training.dtype


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtrain.export", description=__doc__.split("\n\n")[0],
                                     epilog=recipe_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. OUTPUT/checkpoints/step-N")
    parser.add_argument("--out", required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--family", default=None, choices=export_families(),
                        help="default: the family of the Hugging Face model the run started from "
                             "(model.name = 'hf'), else llama")
    parser.add_argument("--dtype", default=None, choices=list(EXPORT_DTYPES),
                        help="default: the recipe's training.dtype (auto: bfloat16)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the recipe's)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--max-shard-mb", type=float, default=5000.0, help="largest safetensors file, in MB")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun: the shards are split among the processes
        torch.distributed.init_process_group("gloo")
    try:
        config = load_config(args.config, overrides)
        model_args = model_args_for(config, torch.device("cpu"))
        check_model(config, model_args)
        tokenizer = None if args.no_tokenizer else (args.tokenizer or recipe_tokenizer(config))
        export_checkpoint(args.checkpoint, model_args, args.out, args.family or default_family(config),
                          EXPORT_DTYPES[args.dtype or default_dtype(config)], tokenizer_path=tokenizer,
                          max_shard_bytes=int(args.max_shard_mb * 1e6))
    except (ConfigError, ValueError, OSError) as e:  # OSError: an unreadable checkpoint or unwritable --out, named
        # Under torchrun every rank meets the same mistake (the ranks' own problems are gathered): rank 0 says it.
        sys.exit(f"error: {e}" if int(os.environ.get("RANK", "0")) == 0 else 1)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
