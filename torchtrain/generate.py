"""Sample text from a checkpoint, for sanity checks: greedy, temperature, top-k and top-p, with a KV cache.

    python -m torchtrain.generate --checkpoint outputs/debug --prompt "def parse(" \\
        [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--top-k 0] [--seed 0] \\
        [--device auto|cpu|cuda|cuda:N] [--dtype auto|float32|bfloat16|float16] [--tokenizer PATH] \
        [--prompt-ids "1 2 3"]

``--checkpoint`` is a training checkpoint (a ``step-NNNNNNNN`` DCP folder, or a run's output folder,
whose newest checkpoint is used) or a Hugging Face model folder (``config.json`` + safetensors). A
checkpoint's model shape and tokenizer are the run's (its ``config.toml``, found above the
checkpoint; without it, the model named in the checkpoint's ``torchtrain.json`` and ``--tokenizer``);
a Hugging Face folder brings both. The model runs in one process, on one device, without
parallelism. Errors in the arguments or the paths are reported before any weight is read.

From Python, :func:`generate` takes any ``Transformer`` and prompt ids.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from torchtrain.checkpoint import complete_checkpoints, saved_model_name
from torchtrain.config import HF_MODEL, Config, ConfigError, load_config
from torchtrain.data.tokenizer import Tokenizer, tokenizer_from_file
from torchtrain.hf_checkpoint import load_hf_weights, read_dcp_model_state
from torchtrain.models import ModelArgs, Transformer, get_model_args
from torchtrain.models.kv_cache import KVCache
from torchtrain.models.llama import rope_tables
from torchtrain.checks import check_model
from torchtrain.models.shape import model_args_for, model_args_from_hf_folder

logger = logging.getLogger(__name__)

__all__ = ["generate", "sample_next", "resolve_source", "load_model", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

def check_sampling(temperature: float, top_p: float, top_k: int = 0) -> None:
    """Raise ``ValueError`` naming the argument and its valid range."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token ``[B]`` for next-token logits ``[B, vocab]``.

    ``temperature == 0``: the argmax. Otherwise a sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (0 = all) and then to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling; the most likely token is
    always kept). Sampling draws from ``generator`` on its device (the logits are moved there).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token when the tokens more likely than it hold less than top_p in all.
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # renormalises by itself


@torch.no_grad()
def generate(model: Transformer, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             eos_id: int | Sequence[int] | None = None, top_k: int = 0) -> Tensor:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; return prompt + continuation.

    ``prompt_ids``: ``[S]`` (a list or tensor) or ``[B, S]`` (prompts of equal length). The prompt
    is run once into a :class:`KVCache`, then each new token is one forward step of one token.
    Generation stops early once every sequence has produced an ``eos_id`` (one id or several); a
    sequence that finished first is padded with ``eos_id`` (the first, if several). Returns
    ``[S + n]`` or ``[B, S + n]`` int64 on the model's device, ``n <= max_new_tokens``. See
    :func:`sample_next` for ``temperature`` / ``top_p`` / ``top_k`` / ``generator``.
    """
    check_sampling(temperature, top_p, top_k)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    single = tokens.dim() == 1
    tokens = tokens.unsqueeze(0) if single else tokens
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [S] or [B, S] with S >= 1, got shape {tuple(tokens.shape)}")
    vocab_size = model.args.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"prompt ids must be in 0..{vocab_size - 1} (the model's vocab_size {vocab_size}), "
                         f"got {tokens.min().item()}..{tokens.max().item()}")
    total = tokens.shape[1] + max_new_tokens
    if max_new_tokens < 0 or total > model.args.max_seq_len:
        raise ValueError(f"prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} must be within "
                         f"the model's max_seq_len {model.args.max_seq_len} (and max_new_tokens >= 0)")
    eos = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                   device=device)
    if max_new_tokens == 0:
        return tokens[0] if single else tokens

    cache = KVCache.for_model(model, tokens.shape[0], max_len=total)
    logits = model(tokens, kv_cache=cache)[:, -1]  # prefill
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    new = []
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)
        if eos is not None:
            token = torch.where(done, eos[0], token)
            done |= torch.isin(token, eos)
        new.append(token)
        if (eos is not None and bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], kv_cache=cache)[:, -1]  # one token, attending to the cache
    out = torch.cat([tokens, torch.stack(new, dim=1)], dim=1)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------
# Loading: a training checkpoint or a Hugging Face folder
# ---------------------------------------------------------------------------------------

_SOURCES = ("a training checkpoint (a step-NNNNNNNN folder, or a run's output folder holding config.toml), "
            "or a Hugging Face model folder (config.json + model*.safetensors)")


@dataclass
class Source:
    """Where the weights come from and what they are."""

    kind: str  # "checkpoint" (DCP) or "hf"
    path: Path  # the step-NNNNNNNN folder or the Hugging Face folder
    model_args: ModelArgs
    config: Optional[Config] = None  # the run's config.toml (its tokenizer), for a checkpoint


def resolve_source(path: str | Path) -> Source:
    """Work out what ``path`` is, without reading any weights; ``ValueError`` saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is not a folder; --checkpoint takes {_SOURCES}")
    if (path / "config.json").is_file():
        return Source("hf", path, model_args_from_hf_folder(path))
    if (path / "config.toml").is_file() and not (path / ".metadata").is_file():  # a run's output folder
        config = load_config(path / "config.toml")
        folder = path / config.checkpoint.folder
        found = complete_checkpoints(folder)
        if not found:
            raise ValueError(f"run {path} has no checkpoint: no step-NNNNNNNN folder in {folder} (was it trained "
                             f"with checkpoint.enabled = true?)")
        path = found[-1][1]
        logger.info("newest checkpoint of the run: %s", path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is neither a checkpoint (no .metadata) nor a run's output folder (no config.toml) "
                         f"nor a Hugging Face folder (no config.json); --checkpoint takes {_SOURCES}")
    # The run's config.toml lies above its checkpoints (job.output_dir / checkpoint.folder / step-N).
    config = next((load_config(parent / "config.toml") for parent in list(path.parents)[:3]
                   if (parent / "config.toml").is_file()), None)
    if config is not None:  # the shape the run trained (a registry size, or "hf": an initial_load_path's)
        model_args = model_args_for(config, torch.device("cpu"))
        check_model(config, model_args)
        return Source("checkpoint", path, model_args, config)
    name = saved_model_name(path)
    if name is None or name == HF_MODEL:
        raise ValueError(f"checkpoint {path}: no run config.toml lies above it, and "
                         + ("it records no model" if name is None else f"it records model {HF_MODEL!r}")
                         + ", so its model shape is unknown; keep the checkpoint inside its run's output folder")
    return Source("checkpoint", path, get_model_args(name))


def load_model(source: Source, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model of ``source`` on ``device`` in ``dtype``, weights loaded, in eval mode."""
    args = source.model_args
    args.attention = "sdpa"  # one-token decode steps on any device; the training kernels are not needed
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype).to_empty(device=device)  # allocated once, in the target dtype
    # NOTE: the RoPE tables are non-persistent buffers derived from args (in fp32, as init_weights
    # makes them), and to_empty unties a tied output projection: restore both.
    model.rope_cos, model.rope_sin = rope_tables(args, device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if source.kind == "hf":
        load_hf_weights(model, source.path, args)
    else:
        model.load_state_dict(read_dcp_model_state(source.path, args), strict=True)
    return model.eval()


def _tokenizer(source: Source, override: Optional[str]) -> Optional[Tokenizer]:
    if override:
        return tokenizer_from_file(override)
    if source.kind == "hf":
        return tokenizer_from_file(source.path) if (source.path / "tokenizer.json").is_file() else None
    if source.config is None:
        return None
    from torchtrain.export import recipe_tokenizer
    return tokenizer_from_file(recipe_tokenizer(source.config))


def _eos_ids(source: Source, tokenizer: Optional[Tokenizer]) -> list[int] | None:
    """A Hugging Face folder's generation_config / config eos ids (one or a list), else the tokenizer's."""
    if source.kind == "hf":
        for name in ("generation_config.json", "config.json"):
            file = source.path / name
            eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None if tokenizer is None else [tokenizer.eos_id]


def _prompt_ids(args: argparse.Namespace, source: Source, tokenizer: Optional[Tokenizer]) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids takes integers separated by spaces or commas, got {args.prompt_ids!r}") \
                from None
    if tokenizer is None:
        raise ValueError(f"{source.path} comes with no tokenizer: pass --tokenizer PATH (a tokenizer.json) or "
                         f"--prompt-ids")
    if source.kind == "hf":  # as the model's own tokenizer does it (e.g. a leading <|begin_of_text|>)
        ids = tokenizer.backend.encode(args.prompt).ids
        return ids or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    # A training run saw every document after an end-of-document token (and its BOS, where the tokenizer
    # adds one): start the prompt the same way.
    return tokenizer.document(tokenizer.encode(args.prompt))[:-1] if tokenizer.add_bos else [
        tokenizer.eos_id, *tokenizer.encode(args.prompt)]


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"--device {choice!r} is not a device; valid choices: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: no GPU is visible; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {choice!r}: valid choices are auto, cpu, cuda, cuda:N")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtrain.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help=_SOURCES)
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--prompt-ids", default=None, help='token ids to continue instead of --prompt, e.g. "1 2 3"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 = off")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and activations (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the run's or the folder's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        check_sampling(args.temperature, args.top_p, args.top_k)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device = _device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        source = resolve_source(args.checkpoint)
        tokenizer = _tokenizer(source, args.tokenizer)
        prompt = _prompt_ids(args, source, tokenizer)
        max_len, vocab_size = source.model_args.max_seq_len, source.model_args.vocab_size
        if len(prompt) >= max_len:
            raise ValueError(f"the prompt's {len(prompt)} tokens leave no room in the model's {max_len} positions")
        if len(prompt) + args.max_new_tokens > max_len:
            logger.warning("--max-new-tokens %d cut to %d: the model has %d positions", args.max_new_tokens,
                           max_len - len(prompt), max_len)
            args.max_new_tokens = max_len - len(prompt)
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt ids must be 1 or more ids in 0..{vocab_size - 1}, got {prompt[:20]}")
        logger.info("model %s from %s on %s in %s", source.kind, source.path, device, str(dtype).removeprefix("torch."))
        model = load_model(source, device, dtype)
        generator = torch.Generator(device).manual_seed(args.seed)
        started = time.perf_counter()
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, generator,
                       _eos_ids(source, tokenizer), args.top_k).tolist()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    elapsed = time.perf_counter() - started
    logger.info("%d new tokens in %.2fs (%.1f tokens/s)", len(out) - len(prompt), elapsed,
                (len(out) - len(prompt)) / max(elapsed, 1e-9))
    print(" ".join(map(str, out)) if tokenizer is None else tokenizer.decode(out, skip_special_tokens=True))


if __name__ == "__main__":
    main()
