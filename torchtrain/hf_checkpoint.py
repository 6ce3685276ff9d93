"""Hugging Face checkpoints: load a local HF model folder into our model, and export ours as one.

``load_hf_weights(model, folder, model_args)`` reads ``model.safetensors`` or the sharded
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, opening only the
shard files that hold a tensor this rank's ``model`` has, and reading tensor by tensor. Each
tensor is renamed, unpacked if packed, cast to the parameter's dtype and copied in; a sharded
(DTensor) parameter receives only its own shard, cut locally as in
``torchtrain.parallel.init.full_parameters`` (every rank reads the same full tensor, so no
communication is needed). A pipeline rank's ``model`` simply has fewer parameters to fill.

Naming schemes (picked from the tensor names in the folder):

* ``llama``: Llama 2/3, Qwen2/2.5 and InternLM (1), the names of ``torchtrain.models.hf``
  (``model.layers.N.self_attn.q_proj`` ...); InternLM 1 and Qwen2 add q/k/v(/o) biases.
* ``qwen`` (Qwen 1): ``transformer.wte``, ``transformer.h.N.{ln_1,ln_2}``,
  ``transformer.h.N.attn.c_attn`` (q, k and v stacked along the output dimension, weight
  ``[3 * dim, dim]`` and bias ``[3 * dim]``), ``attn.c_proj`` (output), ``transformer.ln_f``,
  ``lm_head``. Qwen 1's MLP computes ``c_proj(w1(x) * silu(w2(x)))``: its ``w2`` is the gate
  (our ``w1``), its ``w1`` the up projection (our ``w3``), ``c_proj`` the down projection (our ``w2``).
* ``internlm2``: ``model.tok_embeddings``, ``model.layers.N.attention.wqkv`` (packed, see
  below), ``attention.wo``, ``feed_forward.w1/w3/w2`` (same meaning as ours), ``attention_norm``,
  ``ffn_norm``, ``model.norm``, ``output``.

InternLM2's ``wqkv`` weight is ``[num_kv_heads * (q_per_kv + 2) * head_dim, dim]``; viewed as
``[num_kv_heads, q_per_kv + 2, head_dim, dim]``, group ``h`` holds its ``q_per_kv`` query heads
(query heads ``h * q_per_kv ... h * q_per_kv + q_per_kv - 1``), then its key head, then its value
head. Our ``wq`` is ``[:, :q_per_kv]`` flattened, ``wk`` is ``[:, -2]`` and ``wv`` ``[:, -1]``; a
bias (``bias = true`` configs) has the same layout without the last dimension.

``export_hf(model_state, model_args, out_dir, family)`` writes the inverse: a folder
``transformers.AutoModelForCausalLM.from_pretrained`` loads (family ``llama`` or ``qwen2``),
with the tokenizer if given. ``python -m torchtrain.export`` does it for a training checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from torchtrain.config import Config, invalid
from torchtrain.models.hf import (SCHEMES, PackedShapeError, hf_config, hf_source, model_args_from_hf_config,
                                  scheme_of, to_hf_state_dict, unpack_qkv)
from torchtrain.models.llama import ModelArgs, Transformer
from torchtrain.parallel.init import copy_full_into

logger = logging.getLogger(__name__)

__all__ = ["load_hf_weights", "export_hf", "hf_weight_files", "read_dcp_model_state"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

def hf_weight_files(folder: str | Path) -> dict[str, str]:
    """HF tensor name -> the safetensors file (a name in ``folder``) holding it, from the index
    or from the single file's header (no tensor data is read)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for file in set(weight_map.values()):
            if not (folder / file).is_file():
                raise ValueError(f"{index} lists {file}, which is not in {folder}")
        return dict(weight_map)
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt", device="cpu") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise ValueError(f"{folder} is not a Hugging Face model folder: it has neither {SINGLE_FILE} nor {INDEX_FILE}")


def check_initial_load_path(config: Config) -> None:
    """Refuse a ``checkpoint.initial_load_path`` that is not a Hugging Face model folder, from its index or
    its file's header (no tensor is read)."""
    if not config.checkpoint.initial_load_path:
        return
    try:
        hf_weight_files(config.checkpoint.initial_load_path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: safetensors' header errors
        raise invalid(config, "checkpoint", "initial_load_path", str(e)) from None


def _check_config(folder: Path, args: ModelArgs) -> None:
    """Warn when ``folder/config.json`` describes a different model than ``args`` (shapes are checked per tensor)."""
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        theirs = model_args_from_hf_config(json.loads(path.read_text()))
    except (ValueError, KeyError) as e:
        logger.warning("could not read %s to compare it with the model: %s", path, e)
        return
    differ = [f"{f.name}: ours {getattr(args, f.name)!r}, config.json {getattr(theirs, f.name)!r}"
              for f in fields(ModelArgs) if f.name not in ("attention", "max_seq_len")
              and getattr(args, f.name) != getattr(theirs, f.name)]
    if differ:
        logger.warning("%s describes a different model than the one being loaded: %s", path, "; ".join(differ))


@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: str | Path, model_args: ModelArgs) -> None:
    """Copy the weights of the HF model folder ``folder`` into ``model``'s parameters.

    ``model`` holds this rank's parameters under the whole model's names (plain tensors or
    DTensors; a pipeline rank has only some blocks). Raises ``ValueError`` naming the folder,
    the tensor and the shapes when a tensor is missing, unexpected, or of the wrong shape.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = hf_weight_files(folder)
    scheme = scheme_of(set(files))
    _check_config(folder, model_args)

    # Every tensor the whole model would read: anything else in the folder is unexpected.
    with torch.device("meta"):
        whole = Transformer(model_args)
    expected = {hf_source(name, scheme, model_args).key for name, _ in whole.named_parameters(remove_duplicate=False)}
    ignorable = {k for k in files if k.endswith("rotary_emb.inv_freq")}
    if model_args.tie_embeddings:
        ignorable.add(SCHEMES[scheme][0]["output.weight"])  # some tied checkpoints still store the copy
    unexpected = sorted(set(files) - expected - ignorable)
    if unexpected:
        raise ValueError(f"{folder}: {len(unexpected)} tensor(s) the model has no parameter for "
                         f"(naming scheme {scheme!r}): {unexpected[:10]}")

    # This rank's parameters, grouped by file and by HF tensor (a packed tensor is read once).
    plan: dict[str, dict[str, list[tuple[str, nn.Parameter, Optional[str]]]]] = {}
    missing = []
    for name, param in model.named_parameters():
        src = hf_source(name, scheme, model_args)
        if src.key not in files:
            missing.append(f"{src.key} (for {name})")
            continue
        plan.setdefault(files[src.key], {}).setdefault(src.key, []).append((name, param, src.part))
    if missing:
        raise ValueError(f"{folder}: {len(missing)} tensor(s) missing (naming scheme {scheme!r}): {missing[:10]}")

    for file in sorted(plan):
        with safe_open(folder / file, framework="pt", device="cpu") as f:
            for key, uses in plan[file].items():
                tensor = f.get_tensor(key)
                for name, param, part in uses:
                    try:
                        value = unpack_qkv(tensor, part, scheme, model_args)
                    except PackedShapeError as e:
                        raise ValueError(f"{folder}: tensor {key!r} in {file} has shape {tuple(e.got)}, but "
                                         f"{e.expected} are expected for {name!r}") from None
                    if value.shape != param.shape:
                        raise ValueError(f"{folder}: tensor {key!r} in {file} gives shape {tuple(value.shape)} "
                                         f"for parameter {name!r} of shape {tuple(param.shape)}")
                    copy_full_into(param, value)
                del tensor
    logger.info("loaded Hugging Face weights from %s (%d file(s), naming scheme %r)", folder, len(plan), scheme)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(model_state: dict[str, Tensor], model_args: ModelArgs, out_dir: str | Path, family: str = "llama",
              tokenizer_path: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
              dtype: Optional[torch.dtype] = None, generation_config: bool = True) -> Path:
    """Write ``model_state`` (our names, full tensors) as a Hugging Face model folder ``out_dir``.

    Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` each, bigger single tensors get a shard of their own, plus
    ``model.safetensors.index.json``, as ``save_pretrained`` does), ``config.json``
    (``hf_config(model_args, family)`` + ``torch_dtype`` and the tokenizer's bos/eos ids),
    ``generation_config.json`` and, with ``tokenizer_path`` (a ``tokenizer.json`` or a folder
    holding one), ``tokenizer.json`` + a ``tokenizer_config.json`` that makes ``AutoTokenizer``
    load it as a ``PreTrainedTokenizerFast``. ``dtype`` casts every tensor (default: as given).
    """
    from safetensors.torch import save_file

    config = hf_config(model_args, family)  # validates the family first
    expected = {name for name, _ in _whole_meta(model_args).state_dict().items()}
    got = set(model_state)
    if model_args.tie_embeddings:
        expected.discard("output.weight")
        got.discard("output.weight")
    if got != expected:
        raise ValueError(f"model_state does not match the model: missing {sorted(expected - got)[:10]}, "
                         f"unexpected {sorted(got - expected)[:10]}")
    hf_sd = to_hf_state_dict({k: v for k, v in model_state.items() if k in got}, model_args)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes, total = 0, 0
    for key, value in hf_sd.items():
        if isinstance(value, DTensor):
            raise ValueError(f"export_hf needs full tensors, but {key!r} is a DTensor; call .full_tensor() first")
        value = value.detach().to("cpu", dtype or value.dtype).contiguous().clone()
        size = value.numel() * value.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = value
        shard_bytes += size
        total += size
    dtypes = {v.dtype for shard in shards for v in shard.values()}
    if len(dtypes) != 1:
        raise ValueError(f"model_state mixes dtypes {sorted(map(str, dtypes))}; pass dtype= to export one")
    saved_dtype = dtypes.pop()

    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    special: dict[str, Any] = {}
    if tokenizer_path is not None:
        special = _write_tokenizer(Path(tokenizer_path), out_dir, model_args)
    config["torch_dtype"] = _DTYPE_NAMES.get(saved_dtype, str(saved_dtype).removeprefix("torch."))
    for which in ("bos", "eos"):
        if f"{which}_token_id" in special:
            config[f"{which}_token_id"] = special[f"{which}_token_id"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        gen = {k: special[k] for k in ("bos_token_id", "eos_token_id") if k in special}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    logger.info("exported %s model (%d shard(s), %.1f MB) to %s", family, len(shards), total / 1e6, out_dir)
    return out_dir


def _whole_meta(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _write_tokenizer(path: Path, out_dir: Path, args: ModelArgs) -> dict[str, Any]:
    """Copy ``tokenizer.json`` and write a ``tokenizer_config.json``; the bos/eos tokens and ids found."""
    import tokenizers

    from torchtrain.data.tokenizer import _BOS_CANDIDATES, _EOS_CANDIDATES

    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist")
    backend = tokenizers.Tokenizer.from_file(str(path))
    if backend.get_vocab_size() > args.vocab_size:
        raise ValueError(f"tokenizer {path} has {backend.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {args.vocab_size}")
    if path.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(path, out_dir / "tokenizer.json")
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.max_seq_len,
                                  "clean_up_tokenization_spaces": False}
    found: dict[str, Any] = {}
    for which, candidates in (("bos", _BOS_CANDIDATES), ("eos", _EOS_CANDIDATES)):
        for token in candidates:
            token_id = backend.token_to_id(token)
            if token_id is not None:
                tok_config[f"{which}_token"] = token
                found[f"{which}_token_id"] = token_id
                break
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return found


def read_dcp_model_state(checkpoint: str | Path, model_args: ModelArgs,
                         prefix: str = "model_and_optimizer.model.") -> dict[str, Tensor]:
    """The model tensors of a training checkpoint (a DCP folder), as full CPU tensors, in this process.

    No process group is needed (``dcp.load(..., no_dist=True)``); only the model's tensors are
    read, not the optimizer state. Keys are our parameter names. The ``.metadata`` pickle is read
    through the trainer's allow-list reader (``checkpoint.SafeFileSystemReader``): no code it names runs.
    Every file's size and checksum is verified first, as at resume (``DamagedCheckpointError``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from torchtrain.checkpoint import DamagedCheckpointError, SafeFileSystemReader, verify_files

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint folder (no .metadata file)")
    problems = verify_files(checkpoint)
    if problems:
        raise DamagedCheckpointError(f"checkpoint {checkpoint}: " + "; ".join(problems))
    stored = SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata
    shapes = {name: tuple(t.shape) for name, t in _whole_meta(model_args).state_dict().items()}
    state: dict[str, Tensor] = {}
    problems = []
    for name, shape in shapes.items():
        meta = stored.get(prefix + name)
        if not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{prefix + name} is missing")
        elif tuple(meta.size) != shape:
            problems.append(f"{prefix + name} has shape {tuple(meta.size)}, the model {shape}")
        else:
            state[name] = torch.empty(shape, dtype=meta.properties.dtype)
    if problems:
        raise ValueError(f"checkpoint {checkpoint} does not match the model: " + "; ".join(problems[:10]))
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model_and_optimizer": {"model": state}}, storage_reader=SafeFileSystemReader(checkpoint),
                 no_dist=True)
    return state

