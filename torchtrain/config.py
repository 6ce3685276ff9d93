"""Run configuration: one dataclass per recipe section, TOML loading, CLI overrides, validation.

A recipe is a TOML file whose tables are the sections below. Anything a recipe leaves out keeps
its default. Command-line overrides take the form ``--section.key value`` or
``--section.key=value`` and are converted to the field's type. Every problem (an unknown
section or key, a wrong type, an invalid value) raises :class:`ConfigError` naming the file, the
key and what is allowed, before any model is built.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import io
import json
import math
import textwrap
import tokenize
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says where and what is allowed."""


@dataclass
class Job:
    name: str = "run"  # a label for logs
    output_dir: str = "outputs/run"  # config, logs, TensorBoard events and checkpoints of the run
    seed: int = 0  # seeds weight init, data shuffling and every RNG
    # Signals that stop the run after the current step with a checkpoint of it, exit status 75 (a
    # scheduler's warning before preemption or the end of its time limit; see docs/cluster.md). [] keeps
    # Python's defaults.
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # A training step that runs this many times the median step logs every thread's stack, once; 0: never.
    stall_factor: float = 10.0
    # A training step that runs this long ends the process (exit status 124) so that torchrun's restarts or
    # the scheduler start the job again from its newest checkpoint; 0: never.
    stall_abort_s: float = 1800.0


@dataclass
class Model:
    # A named size from torchtrain.models.registry, or "hf": the shape in the config.json of
    # checkpoint.initial_load_path (the Hugging Face model the run starts from).
    name: str = "debug"
    # Attention backend: "sdpa" (PyTorch's), "flex" (PyTorch's FlexAttention; trains on CUDA only), "triton"
    # (our kernels), "reference" (plain PyTorch, the test oracle), or "auto": on CUDA sdpa for plain causal
    # attention and flex with document or window masks; sdpa elsewhere.
    attention: str = "auto"
    # Longest sequence the RoPE table covers; 0: the model's own (its released context). Raise it to
    # continue pre-training at a longer context than the release's, usually with a larger rope_theta.
    max_seq_len: int = 0
    rope_theta: float = 0.0  # RoPE base; 0: the model's own
    # Sliding-window attention: the keys each token attends to, itself included; 0: the model's own
    # (the window of a Mistral config.json; none for the named sizes).
    sliding_window: int = 0


@dataclass
class BlendSource:
    """One training source of ``data.blend``."""

    dataset: str = ""  # what data.dataset takes: files, a folder, a glob, or a prepared folder
    weight: float = 1.0  # its share of the training samples, relative to the other sources' weights
    name: str = ""  # its name in the metrics (data/tokens/<name>, loss/val/<name>); "" = dataset's last part


@dataclass
class Data:
    # "stdlib" (the Python standard library's sources), a .txt/.jsonl/.json/.parquet file (plain or compressed), a
    # folder or glob of them, or a Hugging Face datasets folder (tokenised at the first start and cached), or a
    # folder written by `python -m torchtrain.data.prepare` (tokenised ahead, in parallel). See docs/data.md.
    dataset: str = "stdlib"
    text_field: str = "text"  # field (.jsonl/.json records) or column (.parquet) holding the text
    # A tokenizer.json, or a folder holding one (a Hugging Face model folder), or "default": the tokenizer of
    # checkpoint.initial_load_path's model when the run starts from one, else a prepared data.dataset's own,
    # else a byte-level BPE of data.vocab_size trained once on the standard library's sources and cached.
    tokenizer: str = "default"
    vocab_size: int = 8192  # vocabulary size of the default tokenizer
    cache_dir: str = ""  # tokenizer and token shard cache; "" = $TORCHTRAIN_CACHE or ~/.cache/torchtrain
    val_fraction: float = 0.02  # fraction of documents held out for validation
    # Several training sources, e.g. [{dataset = "/tokens/web", weight = 0.7}, {dataset = "/tokens/code", weight =
    # 0.3}]: samples are drawn from them in these proportions (data.dataset is then not read). Empty: data.dataset.
    blend: list[BlendSource] = field(default_factory=list)
    # Held-out sources validated on instead of the training sources' validation splits, each reported as
    # loss/val/<name> (loss/val is their mean): all of each file source; a prepared folder's validation split
    # (all of it when prepared with --val-fraction 1).
    validation: list[str] = field(default_factory=list)
    # How long ranks wait, at a start that tokenises data.dataset into the cache, for each node's first rank
    # to build it (a pre-training corpus is prepared ahead instead, with python -m torchtrain.data.prepare).
    build_timeout_s: int = 3600
    document_mask: bool = True  # packed documents neither attend to each other nor share RoPE positions


@dataclass
class Training:
    steps: int = 100  # optimizer steps
    seq_len: int = 256  # tokens per sample
    local_batch_size: int = 8  # samples per microbatch on each data-parallel rank
    grad_accum_steps: int = 1  # microbatches accumulated into one optimizer step
    max_norm: float = 1.0  # gradient clipping threshold on the total norm; 0 disables clipping
    dtype: str = "auto"  # compute dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float32"
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cuda" or "cpu"
    val_every: int = 50  # run validation every N steps (and at the end); 0 disables
    val_batches: int = 8  # batches per validation run
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise reproducible GPU runs


@dataclass
class Optimizer:
    name: str = "adamw"  # only AdamW for now
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's moment decay rates
    eps: float = 1e-8  # added to AdamW's denominator
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    fused: str = "auto"  # "auto" (fused kernel where the device has one), "yes", "no"


@dataclass
class LRScheduler:
    name: str = "cosine"  # "cosine", "linear" or "wsd" (warmup-stable-decay); all start with a linear warmup
    warmup_steps: int = 10  # steps of linear warmup from 0 to optimizer.lr
    decay_fraction: float = 0.2  # wsd only: the final fraction of steps that decays
    min_lr_ratio: float = 0.1  # the LR at the end, as a fraction of the peak


@dataclass
class Checkpoint:
    enabled: bool = True  # save checkpoints
    folder: str = "checkpoints"  # under job.output_dir
    every: int = 500  # save every N steps (and at the end); 0 saves only at the end
    keep_last: int = 2  # older checkpoints are deleted; 0 keeps all
    # "auto": continue from this run's newest intact checkpoint in the folder, or start at step 0 when
    # there is none; a folder holding another run's checkpoints (another model, data.dataset, data.blend,
    # data.tokenizer or training.seq_len) is refused. true: continue from the newest checkpoint even if the
    # recipe's data differ (a new phase of the same run, its data read from their beginning); an error when
    # there is none. false: start at step 0; an error when the folder holds checkpoints, unless
    # checkpoint.overwrite is true.
    resume: bool | str = "auto"
    # With resume = false: delete the folder's checkpoints at the start (nothing else ever deletes a
    # checkpoint but pruning, which removes only this run's older ones).
    overwrite: bool = False
    # A Hugging Face model folder (config.json + safetensors) to start from when there is nothing
    # to resume; empty: initialise from job.seed.
    initial_load_path: str = ""
    async_mode: str = "disabled"  # "disabled" or "async": write the checkpoint while training continues


@dataclass
class Metrics:
    log_every: int = 10  # console and TensorBoard every N steps
    tensorboard: bool = True  # events under job.output_dir/tb


@dataclass
class Compile:
    enabled: bool = True  # torch.compile each transformer block
    backend: str = "inductor"  # "inductor" (generated kernels), "aot_eager" or "eager" (for debugging compile)


@dataclass
class Parallelism:
    """Device mesh sizes; their product must equal the world size."""

    dp_replicate: int = 1  # replicated data-parallel groups (HSDP's outer dimension)
    dp_shard: int = -1  # sharded data-parallel degree (FSDP); -1 = whatever the others leave
    tp: int = 1  # tensor parallel, with sequence parallel and loss parallel (must divide the head counts)
    pp: int = 1  # pipeline parallel ranks; each holds pp_stages_per_rank stages of consecutive blocks
    # Context parallel ranks: each sequence is split across them (load-balanced causal chunks) and
    # attention gathers the keys/values of the others; the sequence length must be divisible by 2 * cp
    # (2 * cp * tp with tensor parallelism). See docs/parallelism.md.
    cp: int = 1
    # How context parallel attention gets the other ranks' keys/values: "allgather" (one all-gather
    # of K/V per block, gradients reduce-scattered: holds the whole sequence's K/V) or "ring" (each
    # rank's K/V passed around the cp ring, partial results merged by log-sum-exp: holds two shares,
    # for sequences whose gathered K/V would not fit). See docs/parallelism.md.
    cp_rotate: str = "allgather"
    # What FSDP does with a block's gathered parameters after its forward. "always" frees them and
    # gathers again for the backward: parameters, gradients and optimizer state all sharded, like
    # DeepSpeed ZeRO-3. "never" keeps them until the backward: one all-gather less per block, the
    # memory of ZeRO-2 (sharded gradients and optimizer state). "default": "always", except for the
    # last block (which the backward needs at once) and under pipeline parallelism ("never", since
    # each microbatch would otherwise gather again).
    fsdp_reshard_after_forward: str = "default"
    fsdp_cpu_offload: bool = False  # sharded parameters, gradients and optimizer step on the CPU
    pp_schedule: str = "1f1b"  # gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv
    pp_stages_per_rank: int = 0  # 0: 1 for gpipe/1f1b, 2 for the interleaved and zbv schedules
    pp_microbatches: int = 0  # microbatches per pipeline step, split from local_batch_size; 0: one per sample
    pp_layers_per_stage: list[int] = field(default_factory=list)  # explicit split; empty: balanced by cost
    # The process group's timeout: a collective still waiting after this long fails the job (NCCL's watchdog
    # aborts it), so that torchrun or the scheduler can restart it; see docs/cluster.md.
    collective_timeout_s: int = 600


@dataclass
class ActivationCheckpoint:
    """Which blocks recompute their activations in the backward (see torchtrain/parallel/ac.py)."""

    # "none"; "full": every block keeps only its input and reruns its forward in the backward;
    # "selective": every block keeps its matmul, attention and collective outputs and recomputes only
    # element-wise work; "layers": num_layers blocks are fully checkpointed, the others keep everything.
    mode: str = "none"
    # "layers" only: how many of the model's blocks to checkpoint, 0 .. model layers. They are spread
    # evenly over the depth by block index (one in the middle of each of num_layers equal runs: k = L/2
    # picks the odd blocks) so that each pipeline stage checkpoints its share, the same blocks the whole
    # model would, and stages stay balanced in memory and recompute.
    num_layers: int = 0
    # Keep each checkpointed block's input in pinned CPU memory between forward and backward, copied on
    # a side stream while compute goes on. GPU only; needs a checkpointing mode.
    offload: bool = False


@dataclass
class Float8:
    """Float8 matmuls in the blocks' linear layers (torchao); GPUs of compute capability >= 8.9 only."""

    enabled: bool = False  # use float8 matmuls
    # "tensorwise" (one scale per tensor, fastest), "rowwise" (one per row, more accurate) or
    # "rowwise_with_gw_hp" (rowwise, with the weight gradient in high precision).
    recipe: str = "tensorwise"
    # tensorwise only: FSDP all-gathers the weights in float8 (half the bytes of bf16).
    fsdp_float8_all_gather: bool = True


@dataclass
class Profiling:
    """Traces and memory snapshots of chosen steps, under job.output_dir/profiling (see torchtrain/profiling.py)."""

    trace_steps: list[int] = field(default_factory=list)  # steps traced by torch.profiler (Perfetto JSON)
    memory_snapshot_steps: list[int] = field(default_factory=list)  # CUDA memory snapshots after these steps
    memory_snapshot_on_oom: bool = False  # a CUDA memory snapshot when a step runs out of memory


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    compile: Compile = field(default_factory=Compile)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    float8: Float8 = field(default_factory=Float8)
    profiling: Profiling = field(default_factory=Profiling)
    source: str = field(default="<defaults>", compare=False)  # the recipe file, for messages

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections()}

    def to_toml(self) -> str:
        lines = [f"# resolved from {self.source}"]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


HF_MODEL = "hf"  # model.name that takes the shape from a Hugging Face config.json
# The values of training.device and training.dtype (read by train.pick_device and train.resolve_dtype).
# Every other key with a fixed set of values is checked by the module that implements it, against its
# own list, in the one pass of torchtrain.checks.check_run.
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float32")


def invalid(config: Config, section: str, key: str, allowed: str) -> ConfigError:
    """The error for ``section.key``: the recipe, the key, its value and what is allowed."""
    value = getattr(getattr(config, section), key)
    return ConfigError(f"{config.source}: {section}.{key} = {value!r} is invalid; {allowed}")


def check_choice(config: Config, section: str, key: str, choices: typing.Iterable[str]) -> None:
    """Raise :func:`invalid` listing ``choices`` unless ``section.key`` is one of them."""
    if getattr(getattr(config, section), key) not in choices:
        raise invalid(config, section, key, f"valid choices: {', '.join(map(repr, choices))}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a recipe, apply ``--section.key value`` overrides, validate, and return the Config."""
    config = Config()
    if path is not None:
        path = find_recipe(path)
        config.source = str(path)
        try:
            tables = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section_name, table in tables.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section_name!r} must be a [section] table")
            section = _section(config, section_name, str(path))
            for key, value in table.items():
                _set(section, section_name, key, value, str(path), from_text=False)
    for section_name, key, text in _parse_overrides(overrides):
        where = f"command line (--{section_name}.{key})"
        _set(_section(config, section_name, where), section_name, key, text, where, from_text=True)
    validate(config)
    return config


# The recipes/ folder, installed with the package (a link to it in a checkout).
PACKAGED_RECIPES = Path(__file__).parent / "recipes"


def find_recipe(path: str | Path) -> Path:
    """The recipe file ``path``, or else the packaged recipe of that name: ``recipes/debug.toml``,
    ``debug.toml`` and ``debug`` all find the recipes that come with torchtrain from any directory."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not path.is_absolute() and path.parent in (Path("."), Path("recipes")) and packaged.is_file():
        return packaged
    names = sorted(p.stem for p in PACKAGED_RECIPES.glob("*.toml"))
    raise ConfigError(f"recipe {str(path)!r} does not exist. Pass --config with a TOML recipe file, or the name of "
                      f"a recipe that comes with torchtrain: {', '.join(names)}")


def recipe_help() -> str:
    """Every section and key with its default and the comment that documents it in this file, for ``--help``.

    Read from this module's source, so the documentation of a key is written once, beside its field."""
    source = Path(__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    defaults = Config()
    out = ["Recipe keys: a recipe sets them in [section] tables, the command line as --section.key value.", ""]
    for section in _sections():
        node = classes[type(getattr(defaults, section.name)).__name__]
        doc = ast.get_docstring(node)
        out.append(f"[{section.name}]" + (f"  {doc}" if doc else ""))
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, row = [], item.lineno - 1  # the comment block right above the field, then the one beside it
            while row >= 1 and lines[row - 1].lstrip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            text = " ".join(above + [comments.get(item.lineno, "")]).strip()
            default = _toml_value(getattr(getattr(defaults, section.name), item.target.id))
            out.append(f"  {item.target.id} = {default}")
            out += textwrap.wrap(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out)


def validate(config: Config) -> None:
    """Check values (not just types) that need nothing but the config; each error names the recipe, the
    key and what is allowed. What needs the model, the world size or the device, and every key whose
    values a module defines, is checked by :func:`torchtrain.checks.check_run`."""

    def fail(section: str, key: str, allowed: str) -> None:
        raise invalid(config, section, key, allowed)

    check_choice(config, "training", "device", DEVICES)
    check_choice(config, "training", "dtype", DTYPES)

    positive = [
        ("training", "steps"), ("training", "seq_len"), ("training", "local_batch_size"),
        ("training", "grad_accum_steps"), ("training", "val_batches"), ("metrics", "log_every"),
        ("data", "vocab_size"), ("parallelism", "dp_replicate"), ("parallelism", "tp"),
        ("parallelism", "pp"), ("parallelism", "cp"), ("parallelism", "collective_timeout_s"),
        ("data", "build_timeout_s"),
    ]
    for section, key in positive:
        if getattr(getattr(config, section), key) < 1:
            fail(section, key, "it must be a positive integer")
    for section, key in [("training", "val_every"), ("checkpoint", "every"), ("checkpoint", "keep_last"),
                         ("lr_scheduler", "warmup_steps"), ("training", "max_norm"), ("optimizer", "weight_decay"),
                         ("job", "stall_factor"), ("job", "stall_abort_s")]:
        if getattr(getattr(config, section), key) < 0:
            fail(section, key, "it must be zero or positive")
    if config.parallelism.dp_shard < 1 and config.parallelism.dp_shard != -1:
        fail("parallelism", "dp_shard", "it must be a positive integer, or -1 for whatever the other sizes leave")
    if not 0 <= config.data.val_fraction < 1:
        fail("data", "val_fraction", "it must be in [0, 1)")
    if not 0 <= config.lr_scheduler.min_lr_ratio <= 1:
        fail("lr_scheduler", "min_lr_ratio", "it must be in [0, 1]")
    if not 0 < config.lr_scheduler.decay_fraction <= 1:
        fail("lr_scheduler", "decay_fraction", "it must be in (0, 1]")
    if config.optimizer.lr <= 0:
        fail("optimizer", "lr", "it must be positive")
    if len(config.optimizer.betas) != 2 or not all(0 <= b < 1 for b in config.optimizer.betas):
        fail("optimizer", "betas", "it must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    for source in config.data.blend:
        if not source.dataset:
            fail("data", "blend", "every source needs its dataset, e.g. {dataset = \"/tokens/web\", weight = 0.7}")
        if source.weight <= 0:
            fail("data", "blend", f"the weight of {source.dataset!r} is {source.weight}; weights must be positive")
    if config.data.val_fraction == 0 and config.training.val_every > 0 and not config.data.validation:
        fail("training", "val_every", "validation needs held-out data: set data.val_fraction > 0, name held-out "
                                      "sources in data.validation, or set val_every = 0")
    if not config.job.output_dir:
        fail("job", "output_dir", "it must name a folder")

    from torchtrain.models.registry import MODELS  # registry import is cheap: plain dataclasses

    for key in ("trace_steps", "memory_snapshot_steps"):
        if any(step < 1 or step > config.training.steps for step in getattr(config.profiling, key)):
            fail("profiling", key, f"steps must be between 1 and training.steps ({config.training.steps})")
    if config.model.max_seq_len < 0 or 0 < config.model.max_seq_len < config.training.seq_len:
        fail("model", "max_seq_len", f"it must be 0 (the model's own) or at least training.seq_len "
                                     f"({config.training.seq_len})")
    if config.model.rope_theta < 0:
        fail("model", "rope_theta", "it must be 0 (the model's own) or a positive RoPE base")
    if config.model.sliding_window < 0:
        fail("model", "sliding_window", "it must be 0 (the model's own) or the number of keys each token sees")
    if config.model.name == HF_MODEL:
        if not config.checkpoint.initial_load_path:  # its config.json is read by models.shape.model_args_for
            fail("model", "name", f"{HF_MODEL!r} takes the model's shape from the config.json of "
                                  "checkpoint.initial_load_path; set that key to a Hugging Face model folder")
    elif config.model.name not in MODELS:
        close = difflib.get_close_matches(config.model.name, MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        fail("model", "name", f"valid choices: {', '.join(MODELS)}, or {HF_MODEL!r} for the shape in "
                              f"checkpoint.initial_load_path's config.json.{hint}")
    elif config.training.seq_len > (config.model.max_seq_len or MODELS[config.model.name].max_seq_len):
        fail("training", "seq_len",
             f"model {config.model.name!r} supports at most {MODELS[config.model.name].max_seq_len} tokens; "
             "to train longer sequences set model.max_seq_len (and usually a larger model.rope_theta)")


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--config PATH`` from the ``--section.key value`` overrides."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                path, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a recipe path, e.g. --config recipes/debug.toml")
        else:
            rest.append(arg)
        i += 1
    return path, rest


def _parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    parsed, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: cannot read {arg!r}; overrides look like --section.key value "
                              "or --section.key=value, e.g. --training.steps 10")
        name, value = (arg[2:].split("=", 1) + [None])[:2]
        if value is None:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{name} needs a value")
            value, i = args[i + 1], i + 1
        section, key = name.split(".", 1)
        parsed.append((section, key, value))
        i += 1
    return parsed


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name != "source"]


def _section(config: Config, name: str, where: str) -> Any:
    names = [f.name for f in _sections()]
    if name not in names:
        raise ConfigError(f"{where}: unknown section [{name}]{_closest(name, names)}; sections: {', '.join(names)}")
    return getattr(config, name)


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def _set(section: Any, section_name: str, key: str, value: Any, where: str, from_text: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown key {section_name}.{key}{_closest(key, list(fields))}; "
                          f"keys of [{section_name}]: {', '.join(fields)}")
    hint = typing.get_type_hints(type(section))[key]
    try:
        converted = _convert(json_or_text(value, hint) if from_text else value, hint)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {section_name}.{key} = {value!r} is not a valid {_type_name(hint)}") from None
    setattr(section, key, converted)


def json_or_text(text: str, hint: Any) -> Any:
    """Interpret a command-line string for a field of type ``hint``."""
    if hint is str:
        return text
    if typing.get_origin(hint) is types.UnionType:
        try:
            return json_or_text(text, bool)
        except ValueError:
            return text
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    return json.loads(text)


def _convert(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is types.UnionType:  # bool | str: a flag that also takes a word ("auto")
        for option in typing.get_args(hint):
            try:
                return _convert(value, option)
            except TypeError:
                pass
        raise TypeError
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError
        return [_convert(v, item) for v in value]
    if dataclasses.is_dataclass(hint):  # a table: {dataset = "...", weight = 0.5}
        if not isinstance(value, dict) or not set(value) <= {f.name for f in dataclasses.fields(hint)}:
            raise TypeError
        return hint(**{key: _convert(item, typing.get_type_hints(hint)[key]) for key, item in value.items()})
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if hint is float:
        # NOTE: TOML and JSON both spell nan and inf, and every range check is false for NaN
        # (``lr <= 0`` let a NaN learning rate through to AdamW).
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError(hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return "list of tables with the keys " + ", ".join(f.name for f in dataclasses.fields(item))
        return f"list of {_type_name(item)}"
    if typing.get_origin(hint) is types.UnionType:
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "table with the keys " + ", ".join(f.name for f in dataclasses.fields(hint))
    return {bool: "boolean (true/false)", int: "integer", float: "finite number", str: "string"}.get(hint, str(hint))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # a BlendSource, as dataclasses.asdict gives it
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return repr(value)
