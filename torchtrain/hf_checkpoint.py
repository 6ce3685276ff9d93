"""Hugging Face checkpoints: load a local HF model folder into our model, and export ours as one.

``load_hf_weights(model, folder, model_args)`` reads ``model.safetensors`` or the sharded
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, opening only the
shard files that hold a tensor this rank's ``model`` has, and reading tensor by tensor. Each
tensor is renamed, unpacked if packed, cast to the parameter's dtype and copied in. A sharded
(DTensor) parameter reads only its own block (``safe_open(...).get_slice(key)[rows, cols]``, at the
offset and shape of its local shard), so no rank holds a whole tensor of a FSDP or TP layout; Qwen
1's packed ``c_attn`` is a stack of q, k and v rows, so each part's block is one slice too, while
InternLM2's ``wqkv`` interleaves them per key/value group and is read whole, then unpacked and cut.
A pipeline rank's ``model`` simply has fewer parameters to fill.

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
``transformers.AutoModelForCausalLM.from_pretrained`` loads (the families of ``HF_ARCHITECTURES``;
``qwen`` and ``internlm2`` are written in their own packed layouts, for their own modeling code), with the
tokenizer if given. ``export_checkpoint`` does it for a training checkpoint (a DCP folder), streaming:
one tensor is read at a time and written into its safetensors shard at once, the shards split among
the processes of a process group. ``python -m torchtrain.export`` is its command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from torchtrain.config import Config, invalid
from torchtrain.models.hf import (SCHEMES, PackedShapeError, export_config, export_scheme, hf_source,
                                  model_args_from_hf_config, pack_qkv, scheme_of, unpack_qkv)
from torchtrain.models.llama import ModelArgs, Transformer

logger = logging.getLogger(__name__)

__all__ = ["load_hf_weights", "export_hf", "export_checkpoint", "export_layout", "hf_weight_files",
           "read_dcp_model_state", "EXPORT_DTYPES"]

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


def _read_slice(f: Any, key: str, index: tuple[slice, ...]) -> Tensor:
    """The block ``index`` (one slice per dimension) of tensor ``key`` of the open safetensors file ``f``;
    only those bytes are read from the file."""
    return f.get_slice(key)[index]


def _local_block(param: Tensor) -> tuple[Tensor, tuple[slice, ...]]:
    """This rank's local tensor of ``param`` and where it lies in the whole parameter, one slice per dimension.

    NOTE: a DTensor's local shard is the block at ``compute_local_shape_and_global_offset`` (FSDP x TP's
    strided shards included, the pair of shardings giving a contiguous block of rows); DCP locates the
    shards it saves the same way.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, tuple(slice(0, n) for n in param.shape)
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(local.shape):
        raise AssertionError(f"local shard of shape {tuple(local.shape)}, placements say {tuple(shape)}")
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _part_rows(where: str, stored: tuple[int, ...], part: Optional[str], name: str, scheme: str,
               args: ModelArgs) -> Optional[tuple[int, int]]:
    """The rows [start, stop) of ``part`` in a Qwen-1 packed c_attn tensor (q, k and v stacked), None if not packed."""
    if part is None:
        return None
    sizes = [args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.num_kv_heads * args.head_dim]
    if not stored or stored[0] != sum(sizes):
        raise ValueError(f"{where} has shape {stored}, but packed q/k/v rows {sum(sizes)} are expected for {name!r}")
    start = sum(sizes[:"qkv".index(part)])
    return start, start + sizes["qkv".index(part)]


def _check_shape(where: str, shape: tuple[int, ...], name: str, param: Tensor) -> None:
    if tuple(shape) != tuple(param.shape):
        raise ValueError(f"{where} gives shape {tuple(shape)} for parameter {name!r} of shape {tuple(param.shape)}")


# Modules that wrap a block and add their attribute to its parameters' names: torch.compile's and activation
# checkpointing's. The whole model's names (what Hugging Face's are mapped to) are those without them.
_WRAPPER_NAMES = ("_orig_mod", "_checkpoint_wrapped_module")


def _model_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


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
        name = _model_name(name)
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
                whole_tensor = None  # an interleaved packed tensor (internlm2), read once for its q, k and v
                stored = tuple(f.get_slice(key).get_shape())
                for name, param, part in uses:
                    where = f"{folder}: tensor {key!r} in {file}"
                    local, index = _local_block(param)
                    if part is not None and scheme == "internlm2":
                        if whole_tensor is None:
                            whole_tensor = _read_slice(f, key, tuple(slice(0, n) for n in stored))
                        try:
                            value = unpack_qkv(whole_tensor, part, scheme, model_args)
                        except PackedShapeError as e:
                            raise ValueError(f"{where} has shape {stored}, but {e.expected} are expected "
                                             f"for {name!r}") from None
                        _check_shape(where, tuple(value.shape), name, param)
                        value = value[index]
                    else:
                        rows = _part_rows(where, stored, part, name, scheme, model_args)
                        shape = stored if rows is None else (rows[1] - rows[0], *stored[1:])
                        _check_shape(where, shape, name, param)
                        if rows is not None:  # qwen: the part is a block of rows, so its slice is one too
                            index = (slice(index[0].start + rows[0], index[0].stop + rows[0]), *index[1:])
                        value = _read_slice(f, key, index) if local.numel() else local
                    local.copy_(value)
                del whole_tensor
    logger.info("loaded Hugging Face weights from %s (%d file(s), naming scheme %r)", folder, len(plan), scheme)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EXPORT_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}  # --dtype choices
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class ExportTensor:
    """One tensor of an exported folder: its HF name, our tensor(s) it is made of (one, or the q, k and v
    of a packed q/k/v tensor) and its shape."""
    key: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]


def export_layout(shapes: dict[str, tuple[int, ...]], model_args: ModelArgs, family: str, dtype: torch.dtype,
                  max_shard_bytes: int) -> list[list[ExportTensor]]:
    """The exported tensors, in shards of at most ``max_shard_bytes`` (a bigger tensor gets one of its own).

    ``shapes`` are our tensors' shapes in the model's order. The result depends on nothing else, so every
    process of a split export computes the same shards, and the files are the same whatever the split.
    """
    scheme = export_scheme(family)
    uses: dict[str, list[tuple[str, Optional[str]]]] = {}
    for name in shapes:
        src = hf_source(name, scheme, model_args)
        uses.setdefault(src.key, []).append((name, src.part))
    shards: list[list[ExportTensor]] = [[]]
    shard_bytes = 0
    for key, parts in uses.items():
        if parts[0][1] is None:
            sources, shape = (parts[0][0],), shapes[parts[0][0]]
        else:
            sources = tuple(name for name, _ in sorted(parts, key=lambda p: "qkv".index(p[1])))
            rest = shapes[sources[0]][1:]
            shape = (sum(shapes[s][0] for s in sources), *rest)
        size = math.prod(shape) * dtype.itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(ExportTensor(key, sources, tuple(shape)))
        shard_bytes += size
    return shards


def _shard_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_shard(path: Path, tensors: list[ExportTensor], dtype: torch.dtype,
                 read: Callable[[tuple[str, ...]], list[Tensor]], scheme: str, model_args: ModelArgs) -> None:
    """Write one safetensors file, tensor by tensor as ``read`` returns them, under a hidden temporary name
    renamed to ``path`` once complete (a killed export leaves no cut file under a final name).

    NOTE: the header (names, dtypes, shapes, offsets) is known before any tensor is read, so each tensor is
    written as soon as it is read and then dropped: the file is never held in memory. The layout is the
    safetensors format: 8-byte little-endian header length, the JSON header padded with spaces to a
    multiple of 8 bytes, then the tensors' bytes back to back in header order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = math.prod(t.shape) * dtype.itemsize
        header[t.key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            parts = read(t.sources)
            value = parts[0] if len(parts) == 1 else pack_qkv(*parts, scheme, model_args)
            if isinstance(value, DTensor):
                raise ValueError(f"export needs full tensors, but {t.sources[0]!r} is a DTensor; "
                                 "call .full_tensor() first")
            value = value.detach().to("cpu", dtype).contiguous()
            if tuple(value.shape) != t.shape:
                raise ValueError(f"{t.sources} give {t.key!r} the shape {tuple(value.shape)}, expected {t.shape}")
            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            del parts, value
    os.replace(partial, path)


def _export(shapes: dict[str, tuple[int, ...]], read: Callable[[tuple[str, ...]], list[Tensor]], model_args: ModelArgs,
            out_dir: str | Path, family: str, dtype: torch.dtype, tokenizer_path: str | Path | None,
            max_shard_bytes: int, generation_config: bool, rank: int = 0, world: int = 1,
            gather: Callable[[Optional[str]], list[Optional[str]]] = lambda problem: [problem]) -> Path:
    """Write the folder: shards ``rank``, ``rank + world``, ... from this process, the rest by rank 0.

    ``gather`` collects one value from every process (a barrier that carries each one's error, if any):
    a process that fails makes all of them stop with its message instead of waiting for it.
    """
    config = export_config(model_args, family)  # validates the family first
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot export dtype {dtype}; valid choices: {list(EXPORT_DTYPES)}")
    tokenizer = _read_tokenizer(Path(tokenizer_path), model_args) if tokenizer_path is not None else None
    shards = export_layout(shapes, model_args, family, dtype, max_shard_bytes)
    names = _shard_names(len(shards))
    out_dir = Path(out_dir)
    if rank == 0:
        # What an earlier export left (other shard counts, a cut temporary file): gone before anything is
        # written, and config.json last to be written, so an interrupted export is not a loadable folder.
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("model*.safetensors"), *out_dir.glob(".model*.safetensors.partial"),
                      out_dir / INDEX_FILE, out_dir / "config.json"]:
            stale.unlink(missing_ok=True)
    gather(None)
    scheme = export_scheme(family)
    problem = None
    try:
        for i in range(rank, len(shards), world):
            _write_shard(out_dir / names[i], shards[i], dtype, read, scheme, model_args)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: DCP's read errors
        if world == 1:
            raise
        problem = f"rank {rank}: {e}"
    problems = [p for p in gather(problem) if p is not None]
    if problems:
        raise ValueError("; ".join(problems))
    total = sum(math.prod(t.shape) * dtype.itemsize for shard in shards for t in shard)
    if rank == 0:
        if len(shards) > 1:
            weight_map = {t.key: name for name, shard in zip(names, shards) for t in shard}
            (out_dir / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        special = _write_tokenizer(tokenizer, out_dir, model_args) if tokenizer is not None else {}
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
        for which in ("bos", "eos"):
            if f"{which}_token_id" in special:
                config[f"{which}_token_id"] = special[f"{which}_token_id"]
        if generation_config:
            gen = {k: special[k] for k in ("bos_token_id", "eos_token_id") if k in special}
            (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        logger.info("exported %s model (%d shard(s), %.1f MB, %s) to %s", family, len(shards), total / 1e6,
                    _DTYPE_NAMES[dtype], out_dir)
    return out_dir


def export_hf(model_state: dict[str, Tensor], model_args: ModelArgs, out_dir: str | Path, family: str = "llama",
              tokenizer_path: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
              dtype: Optional[torch.dtype] = None, generation_config: bool = True) -> Path:
    """Write ``model_state`` (our names, full tensors) as a Hugging Face model folder ``out_dir``.

    Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` each, bigger single tensors get a shard of their own, plus
    ``model.safetensors.index.json``, as ``save_pretrained`` does), ``config.json``
    (``export_config(model_args, family)`` + ``torch_dtype`` and the tokenizer's bos/eos ids),
    ``generation_config.json`` and, with ``tokenizer_path`` (a ``tokenizer.json`` or a folder
    holding one), ``tokenizer.json`` + a ``tokenizer_config.json`` that makes ``AutoTokenizer``
    load it as a ``PreTrainedTokenizerFast``. ``dtype`` casts every tensor (default: as given).
    ``family`` is one of ``export_families()``: Qwen (1) and InternLM2 pack q, k and v into one tensor.
    """
    shapes = {name: tuple(t.shape) for name, t in _whole_meta(model_args).state_dict().items()}
    if model_args.tie_embeddings:
        shapes.pop("output.weight")
    got = set(model_state) - ({"output.weight"} if model_args.tie_embeddings else set())
    if got != set(shapes):
        raise ValueError(f"model_state does not match the model: missing {sorted(set(shapes) - got)[:10]}, "
                         f"unexpected {sorted(got - set(shapes))[:10]}")
    if dtype is None:
        dtypes = {model_state[name].dtype for name in shapes}
        if len(dtypes) != 1:
            raise ValueError(f"model_state mixes dtypes {sorted(map(str, dtypes))}; pass dtype= to export one")
        dtype = dtypes.pop()
    return _export(shapes, lambda names: [model_state[n] for n in names], model_args, out_dir, family, dtype,
                   tokenizer_path, max_shard_bytes, generation_config)


def export_checkpoint(checkpoint: str | Path, model_args: ModelArgs, out_dir: str | Path, family: str,
                      dtype: torch.dtype, tokenizer_path: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
                      prefix: str = "model_and_optimizer.model.") -> Path:
    """Export the model of a training checkpoint (a DCP folder) as ``export_hf`` does, streaming.

    The checkpoint is read tensor by tensor (a DCP load of just that tensor, ``no_dist``) and each
    tensor is written to its shard at once, so the process holds the tensor being read (in the
    checkpoint's dtype, plus DCP's copy of its stored chunk and the cast) and never the model.
    Inside an initialised process group (``torchrun``), the shards are split among the ranks (shard
    ``i`` by rank ``i % world``), each rank verifies its share of the checkpoint's checksums, and rank 0
    writes the index, ``config.json`` and the tokenizer after all shards are written; the files are the
    same whatever the number of processes.
    """
    import torch.distributed as dist

    from torchtrain.checkpoint import DamagedCheckpointError, SafeFileSystemReader, verify_files

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    checkpoint = Path(checkpoint)
    stored = _stored_model_tensors(checkpoint, model_args, prefix)

    def gather(problem: Optional[str]) -> list[Optional[str]]:
        if not distributed:
            return [problem]
        everyone: list[Optional[str]] = [None] * world
        dist.all_gather_object(everyone, problem)
        return everyone

    problems = [p for p in gather("; ".join(verify_files(checkpoint, rank, world)) or None) if p is not None]
    if problems:
        raise DamagedCheckpointError(f"checkpoint {checkpoint}: " + "; ".join(problems))
    if model_args.tie_embeddings:
        stored.pop("output.weight", None)
    reader = SafeFileSystemReader(checkpoint)
    outer, inner = prefix.rstrip(".").split(".")

    def read(names: tuple[str, ...]) -> list[Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        state = {name: torch.empty(stored[name][0], dtype=stored[name][1]) for name in names}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process's own read is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load({outer: {inner: state}}, storage_reader=reader, no_dist=True)
            except CheckpointException as e:  # a BaseException: a cut or changed file of a checkpoint without checksums
                failures = "; ".join(f"{type(f).__name__}: {f}" for f in getattr(e, "failures", {}).values())
                raise ValueError(f"checkpoint {checkpoint}: cannot read {', '.join(prefix + n for n in names)} "
                                 f"({failures or e})") from None
        return [state[name] for name in names]

    return _export({name: shape for name, (shape, _) in stored.items()}, read, model_args, out_dir, family, dtype,
                   tokenizer_path, max_shard_bytes, True, rank, world, gather)


def _whole_meta(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _read_tokenizer(path: Path, args: ModelArgs) -> tuple[Path, Any]:
    """``tokenizer.json`` (or the one in the folder ``path``) and its parsed tokenizer, checked against the model."""
    import tokenizers

    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist")
    backend = tokenizers.Tokenizer.from_file(str(path))
    if backend.get_vocab_size() > args.vocab_size:
        raise ValueError(f"tokenizer {path} has {backend.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {args.vocab_size}")
    return path, backend


def _write_tokenizer(tokenizer: tuple[Path, Any], out_dir: Path, args: ModelArgs) -> dict[str, Any]:
    """Copy ``tokenizer.json`` and write a ``tokenizer_config.json``; the bos/eos tokens and ids found."""
    from torchtrain.data.tokenizer import _BOS_CANDIDATES, _EOS_CANDIDATES

    path, backend = tokenizer
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


def _stored_model_tensors(checkpoint: Path, model_args: ModelArgs,
                          prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our tensor name -> (shape, dtype) as stored in the DCP checkpoint, in the model's order, from its
    ``.metadata`` (read through the allow-list reader); every model tensor must be there, of the model's shape."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from torchtrain.checkpoint import SafeFileSystemReader

    if not (checkpoint / ".metadata").is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint folder (no .metadata file)")
    stored = SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata
    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    problems = []
    for name, t in _whole_meta(model_args).state_dict().items():
        meta = stored.get(prefix + name)
        if not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{prefix + name} is missing")
        elif tuple(meta.size) != tuple(t.shape):
            problems.append(f"{prefix + name} has shape {tuple(meta.size)}, the model {tuple(t.shape)}")
        else:
            found[name] = (tuple(t.shape), meta.properties.dtype)
    if problems:
        raise ValueError(f"checkpoint {checkpoint} does not match the model: " + "; ".join(problems[:10]))
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

    from torchtrain.checkpoint import DamagedCheckpointError, SafeFileSystemReader, verify_files

    checkpoint = Path(checkpoint)
    stored = _stored_model_tensors(checkpoint, model_args, prefix)
    problems = verify_files(checkpoint)
    if problems:
        raise DamagedCheckpointError(f"checkpoint {checkpoint}: " + "; ".join(problems))
    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in stored.items()}
    outer, inner = prefix.rstrip(".").split(".")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({outer: {inner: state}}, storage_reader=SafeFileSystemReader(checkpoint), no_dist=True)
    return state
