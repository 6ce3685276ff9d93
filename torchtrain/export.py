"""Export a training checkpoint as a Hugging Face model folder.

    python -m torchtrain.export --config recipes/debug.toml \\
        --checkpoint outputs/debug/checkpoints/step-00000150 --out hf/debug [--family llama|qwen2|qwen3|mistral] \\
        [--dtype bfloat16|float32] [--tokenizer PATH] [--max-shard-mb 5000] [--section.key value ...]

Runs in one process on the CPU, without a process group: the model tensors of the DCP checkpoint
(whatever parallel layout wrote it) are read as full tensors, renamed and written as safetensors
with ``config.json`` and the recipe's tokenizer (or ``--tokenizer``). Extra ``--section.key value``
arguments override the recipe, as in training (e.g. ``--model.name``).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from torchtrain.config import ConfigError, load_config, recipe_help
from torchtrain.hf_checkpoint import export_hf, read_dcp_model_state
from torchtrain.checks import check_model
from torchtrain.models.hf import HF_ARCHITECTURES
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtrain.export", description=__doc__.split("\n\n")[0],
                                     epilog=recipe_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. OUTPUT/checkpoints/step-N")
    parser.add_argument("--out", required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--family", default="llama", choices=sorted(HF_ARCHITECTURES))
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="cast the weights (default: as stored)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the recipe's)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--max-shard-mb", type=float, default=5000.0, help="largest safetensors file, in MB")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, overrides)
        model_args = model_args_for(config, torch.device("cpu"))
        check_model(config, model_args)
        state = read_dcp_model_state(args.checkpoint, model_args)
        tokenizer = None if args.no_tokenizer else (args.tokenizer or recipe_tokenizer(config))
        export_hf(state, model_args, args.out, args.family, tokenizer_path=tokenizer,
                  max_shard_bytes=int(args.max_shard_mb * 1e6),
                  dtype={None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype])
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
