"""Entry point: ``torchrun --nproc_per_node=N -m torchtrain.train --config recipes/X.toml [--section.key value ...]``.

One function per stage, called in order by :func:`train`: config → process group and mesh → data →
model (meta) → parallelize → materialise → optimizer → resume → loop. A batch goes from the loader
to :func:`train_step` to the optimizer without detours.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchtrain.checks import check_run
from torchtrain.checkpoint import (CheckpointManager, IntState, ModelAndOptimizer, RNGState, check_resume, model_record,
                                   run_record)
from torchtrain.config import BlendSource, Config, ConfigError, load_config, parse_args, recipe_help
from torchtrain.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch
from torchtrain.watchdog import StepWatchdog
from torchtrain.data import DEFAULT_TOKENIZER, Batch, TokenLoader, build_datasets
from torchtrain.metrics import (MetricsLogger, StepScalars, ThroughputMeter, device_peak_flops, peak_memory_bytes,
                                rank_step_times)
from torchtrain.models import ModelArgs, Transformer
from torchtrain.models.shape import model_args_for
from torchtrain.loss import IGNORE_INDEX
from torchtrain.optim import LRSchedule, build_optimizer, step_unless_non_finite
from torchtrain.parallel import ParallelDims, build_mesh, init_distributed, parallelize, settle_gradients
from torchtrain.parallel.float8 import after_optimizer_step
from torchtrain.profiling import StepProfiler
from torchtrain.parallel.cp import batch_sharder
from torchtrain.parallel.init import full_parameters
from torchtrain.parallel.pp import Pipeline, build_pipeline, merge_stages, pipeline_settings, split_model

logger = logging.getLogger("torchtrain")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is kept."""


class DataNotReady(RuntimeError):
    """Ranks waited longer than ``data.build_timeout_s`` for the data to be built at the start."""


@dataclass
class TrainResult:
    losses: dict[int, float]  # global mean training loss of every step run
    grad_norms: dict[int, float]  # total gradient norm (before clipping) of every step run
    val_losses: dict[int, float]
    output_dir: Path


USAGE = """\
usage: python -m torchtrain.train --config RECIPE [--section.key value ...]
       torchrun --nproc_per_node=N -m torchtrain.train --config RECIPE [--section.key value ...]

Trains a decoder LLM as the recipe says, on every process torchrun starts. RECIPE is a TOML file, or
the name of a recipe that comes with torchtrain (e.g. debug, llama3_8b_2k); --section.key value
overrides any key of it."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"{USAGE}\n\n{recipe_help()}")
        return
    try:
        path, overrides = parse_args(argv)
        if path is None:
            print(USAGE.split("\n\n")[0], file=sys.stderr)
            raise ConfigError("no recipe given: pass --config RECIPE, e.g. --config recipes/debug.toml (--help lists "
                              "every key)")
        config = load_config(path, overrides)
        train(config)
    except (ConfigError, TrainingDiverged) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same mistake: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataNotReady as e:  # seen by the ranks that waited, each its own: say it on each
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def train(config: Config) -> TrainResult:
    device = pick_device(config)
    created_group = not dist.is_initialized()
    init_distributed(device, config.parallelism.collective_timeout_s)
    try:
        return _train(config, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config: Config, device: torch.device) -> TrainResult:
    rank = dist.get_rank()
    model_args = model_args_for(config, device)
    dims = check_run(config, model_args, dist.get_world_size(), device)  # before anything is written or built
    data_changes = check_resume(config, model_record(config.model.name, model_args))
    output_dir = Path(config.job.output_dir)
    setup_logging(output_dir, rank)
    if rank == 0:
        (output_dir / "config.toml").write_text(config.to_toml())
        logger.info("config (saved to %s):\n%s", output_dir / "config.toml", config.to_toml())
    mesh = build_mesh(dims, device)
    dp_rank, dp_size = mesh.dp.get_local_rank(), mesh.dp.size()
    # The loss and the count of valid tokens are summed over every rank holding different tokens: the
    # data-parallel ranks and, within each, the context-parallel ranks (each a share of the sequence).
    loss_group = mesh.dp_cp.get_group()
    shard_for_cp = batch_sharder(mesh, config.data.document_mask)

    data = build_data(config, model_args, dp_rank, dp_size)
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True)
    param_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[resolve_dtype(config, device)]
    parts = build_model(model_args, config, mesh, dims, device, param_dtype)
    model = parts.model

    optimizer = build_optimizer(model, config.optimizer, device)
    lr_schedule = LRSchedule(optimizer, config.lr_scheduler, config.training.steps)
    state = {"model_and_optimizer": ModelAndOptimizer(model, optimizer), "lr_schedule": IntState(lr_schedule),
             "data": IntState(data.train), "rng": RNGState(device), "step": IntState(StepCounter())}
    checkpoints = None
    if config.checkpoint.enabled:
        checkpoints = CheckpointManager(output_dir / config.checkpoint.folder, config.checkpoint.keep_last,
                                        config.checkpoint.async_mode, model_record(config.model.name, model_args),
                                        optimizer, run_record(config),
                                        start_over=config.checkpoint.resume is False and config.checkpoint.overwrite)
    start_step = 0
    if checkpoints and config.checkpoint.resume is not False:
        if data_changes:  # a new phase of the run: its data start at their beginning
            logger.warning("resuming with other data (%s): the data loader starts at the new data's beginning",
                           "; ".join(data_changes))
        loaded = {key: value for key, value in state.items() if not (data_changes and key == "data")}
        if checkpoints.load_newest_intact(loaded) is not None:
            start_step = state["step"].obj.step
            if start_step >= config.training.steps:
                logger.warning("resumed at step %d of %d: nothing left to train (raise training.steps, or start "
                               "over with --checkpoint.resume false --checkpoint.overwrite true)", start_step,
                               config.training.steps)
    if config.checkpoint.initial_load_path and start_step == 0:  # start from a Hugging Face model's weights
        from torchtrain.hf_checkpoint import load_hf_weights
        try:
            load_hf_weights(model, config.checkpoint.initial_load_path, model_args)
        except ValueError as e:  # a tensor missing, unexpected or of another shape: the folder's, named in e
            raise ConfigError(f"{config.source}: checkpoint.initial_load_path: {e}") from None

    # Mixed precision without FSDP is autocast; with FSDP its MixedPrecisionPolicy casts parameters.
    autocast = (torch.autocast(device.type, dtype=param_dtype)
                if param_dtype != torch.float32 and not uses_fsdp(config, dims) else nullcontext())
    meter = ThroughputMeter(model_args.flops_per_token(config.training.seq_len), device_peak_flops(device),
                            config.training.steps)
    metrics = MetricsLogger(output_dir / "tb", enabled=rank == 0 and config.metrics.tensorboard)
    result = TrainResult({}, {}, {}, output_dir)
    batches = iter(data.train)
    scalars = StepScalars()
    profiler = StepProfiler(config.profiling, output_dir, rank, device)
    profiler.start(start_step + 1)
    preemption = PreemptionWatch(config.job.preemption_signals)
    watchdog = StepWatchdog(config.job.stall_factor, config.job.stall_abort_s, rank)
    try:
        for step in range(start_step + 1, config.training.steps + 1):
            is_last = step == config.training.steps
            logs = step % config.metrics.log_every == 0 or is_last
            validates = config.training.val_every and (step % config.training.val_every == 0 or is_last)
            saves = checkpoints and (is_last or (config.checkpoint.every and step % config.checkpoint.every == 0))
            started = time.perf_counter()
            watchdog.step_started(step)
            with profiler.step(step):
                microbatches = [shard_for_cp(to_device(next(batches), device))
                                for _ in range(config.training.grad_accum_steps)]
                scalars.add(step, *train_step(parts, optimizer, microbatches, config, loss_group, autocast))
                if logs or validates or saves:  # the one wait for the device, inside the timed step
                    record_scalars(scalars.read(), result, checkpoints)
            watchdog.step_finished()
            lr = lr_schedule.last_lr()
            lr_schedule.step()
            state["step"].obj.step = step
            # Tensor and pipeline parallel ranks share their data-parallel rank's tokens; a context
            # parallel rank's microbatches already hold only its 1/cp share of them.
            meter.add(sum(b.tokens.numel() for b in microbatches) / (dims.tp * dims.pp),
                      time.perf_counter() - started)

            figures = {}
            if logs:
                figures = {"loss/train": result.losses[step], "optim/lr": lr,
                           "optim/grad_norm": result.grad_norms[step],
                           "memory/peak_gib": peak_memory_bytes(device) / 2**30, **meter.read(step),
                           **data.figures()}
                figures.update(rank_step_times(figures["perf/step_time_s"], device))
                if checkpoints and checkpoints.last_blocked_s:  # how long the latest save held training up
                    figures["checkpoint/blocked_s"] = checkpoints.last_blocked_s
            if validates:
                val_losses = {name: evaluate(parts, loader(), config.training.val_batches, config, loss_group, device,
                                             autocast, shard_for_cp) for name, loader in data.validation.items()}
                val_loss = sum(val_losses.values()) / len(val_losses)  # each source counts alike
                result.val_losses[step] = val_loss
                figures.update({"loss/val": val_loss, "loss/val_perplexity": math.exp(min(val_loss, 50.0))})
                if len(val_losses) > 1:
                    figures.update({f"loss/val/{name}": loss for name, loss in val_losses.items()})
            if figures:
                metrics.log(step, config.training.steps, figures)
            if saves:
                checkpoints.save(step, state)
            if preemption.requested():  # every rank gets the same answer, after the same step
                saved = None
                if checkpoints:
                    if not saves:
                        checkpoints.save(step, state)
                    checkpoints.close()
                    saved = str(checkpoints.latest()[1])
                logger.warning("%s at step %d: %s", preemption.signal_name, step,
                               f"saved {saved}" if saved else "checkpoints are off, nothing saved")
                raise Preempted(step, preemption.signal_name, saved)
        if checkpoints:
            checkpoints.close()  # commit a background save before reporting the run done
    finally:
        watchdog.close()
        preemption.close()
        profiler.stop()
        metrics.close()
    if rank == 0 and config.metrics.tensorboard:
        logger.info("done. TensorBoard: tensorboard --logdir %s", output_dir / "tb")
    return result


def build_data(config: Config, model_args: ModelArgs, dp_rank: int, dp_size: int) -> TrainingData:
    """The training loader and the validation sources, after checking the data fits the model."""
    tokenizer_spec = config.data.tokenizer
    if tokenizer_spec == DEFAULT_TOKENIZER and config.checkpoint.initial_load_path:
        tokenizer_spec = config.checkpoint.initial_load_path  # continuing a model: its own tokenizer
        if not (Path(tokenizer_spec) / "tokenizer.json").is_file():
            raise ConfigError(f"{config.source}: data.tokenizer = 'default' takes the tokenizer of "
                              f"checkpoint.initial_load_path, but {tokenizer_spec} has no tokenizer.json; set "
                              "data.tokenizer to the model's tokenizer.json")
    blend = config.data.blend or [BlendSource(config.data.dataset)]
    datasets = [source.dataset for source in blend]

    def build():
        try:
            return build_datasets(datasets, config.data.text_field, tokenizer_spec, config.data.vocab_size,
                                  config.data.cache_dir, config.data.val_fraction, validation=config.data.validation)
        except (FileNotFoundError, ValueError) as e:  # unusable data settings: one message, no traceback
            raise ConfigError(f"{config.source}: [data] {e}") from e

    tokenizer, train_streams, val_streams = build_once_per_node(build, config.data.build_timeout_s)
    if tokenizer.vocab_size > model_args.vocab_size:
        raise ConfigError(
            f"{config.source}: the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the "
            f"{model_args.vocab_size} embeddings of model {config.model.name!r}; use a model with a larger vocab_size "
            f"(model.name) or a smaller tokenizer (data.tokenizer / data.vocab_size)"
        )
    train_names = source_names(datasets, [source.name for source in blend])
    val_names = source_names(config.data.validation) if config.data.validation else train_names
    if config.data.blend:  # named in messages by source
        for name, stream in zip(train_names, train_streams):
            stream.name = f"{name} train"
    if config.data.blend or config.data.validation:
        for name, stream in zip(val_names, val_streams):
            stream.name = f"{name} validation"
    # Validation reads the same first batches of each held-out split every time, from a fresh loader.
    validation = {name: partial(TokenLoader, stream, config.training.seq_len, config.training.local_batch_size,
                                dp_rank, dp_size, seed=config.job.seed, shuffle=False, infinite=False)
                  for name, stream in zip(val_names, val_streams)}
    key = "data.blend" if config.data.blend else f"data.dataset = {config.data.dataset!r}"
    try:
        train_loader = TokenLoader(train_streams, config.training.seq_len, config.training.local_batch_size,
                                   dp_rank, dp_size, seed=config.job.seed, weights=[s.weight for s in blend])
        if config.training.val_every:
            key = "data.validation" if config.data.validation else key
            for loader in validation.values():
                loader()  # a split too small for one global batch fails now, not at the first validation
    except ValueError as e:  # too little data (an empty file, say): named, no traceback
        raise ConfigError(f"{config.source}: {key}: {e}") from None
    return TrainingData(train_loader, train_names, validation)


def build_once_per_node(build: Callable, timeout_s: int):
    """``build()`` on every rank, run first by each node's first rank while the others wait.

    What the data need built at a first start (a tokenizer, token shards) is built under file locks in
    the cache: once per node, or once for all when the cache is on shared storage. Waiting for that in
    the first collective of the run would fail it after ``parallelism.collective_timeout_s``; here the
    ranks wait on a gloo barrier of its own timeout, ``data.build_timeout_s``, then every rank builds
    (finding the cache done) or raises the same error the builder raised.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return build()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first_on_node:
        try:
            build()
        except ConfigError:
            pass  # raised again below, by every rank alike
    try:
        dist.barrier(group=group)
    except RuntimeError as e:  # a node still building, or a rank gone
        raise DataNotReady(
            f"rank {dist.get_rank()}: the data were not built on every node within data.build_timeout_s = "
            f"{timeout_s} s ({str(e).splitlines()[0]}); tokenise a large corpus ahead with python -m "
            "torchtrain.data.prepare, or raise data.build_timeout_s") from None
    finally:
        dist.destroy_process_group(group)
    return build()


@dataclass
class TrainingData:
    """The training loader over the training sources (named), and a fresh loader per validation source."""

    train: TokenLoader
    train_names: list[str]
    validation: dict[str, Callable[[], TokenLoader]]

    def figures(self) -> dict[str, float]:
        """Tokens drawn from each training source so far, over all ranks, for the metrics."""
        return {f"data/tokens/{name}": tokens for name, tokens in zip(self.train_names, self.train.tokens_drawn())}


def source_names(datasets: list[str], names: list[str] | None = None) -> list[str]:
    """A metric name per source: its given name, else the last part of its path (numbered when two agree)."""
    names = [given or Path(dataset.rstrip("/")).name.split("*")[0].rstrip(".") or dataset
             for dataset, given in zip(datasets, names or [""] * len(datasets))]
    return [f"{name}.{names[:i].count(name)}" if names.count(name) > 1 else name for i, name in enumerate(names)]


@dataclass
class ModelParts:
    """This rank's share of the model.

    ``stages`` are what run: the whole model, or this rank's pipeline stages (then ``pipeline``
    runs them), with their stage ids in ``stage_ids``. ``model`` holds every parameter of this rank under the whole model's names: the
    optimizer, the gradient norm and checkpoints use it.
    """

    model: nn.Module
    stages: list[nn.Module]
    stage_ids: list[int]
    pipeline: Optional[Pipeline] = None


def build_model(model_args: ModelArgs, config: Config, mesh, dims: ParallelDims, device: torch.device,
                param_dtype: torch.dtype, materialize: bool = True) -> ModelParts:
    """Build on the meta device, split into pipeline stages, parallelize, then allocate and initialise.

    Every layout draws the same initial values as one process (see ``Transformer.init_weights``).
    With ``materialize=False`` the parallelized model stays on the meta device (a dry check).
    """
    with torch.device("meta"):
        whole = Transformer(model_args)
    stage_ids, stages = split_model(whole, config, dims.pp, mesh["pp"].get_local_rank())
    for stage in stages:
        parallelize(stage, config, mesh, dims, device, param_dtype)
    if materialize:
        for stage in stages:
            stage.to_empty(device=device)
            stage.init_weights(seed=config.job.seed, unit_scope=full_parameters)
    parts = ModelParts(model=merge_stages(stages) if dims.pp > 1 else whole, stages=stages, stage_ids=stage_ids)
    if dims.pp > 1 and materialize:
        pipe = pipeline_settings(config, dims.pp)
        parts.pipeline = build_pipeline(stages, stage_ids, pipe.num_stages, mesh["pp"], device, pipe.schedule,
                                        pipe.num_microbatches)
    logger.info("model %s: %.1fM parameters (%.1fM without embeddings)", config.model.name,
                model_args.num_params(exclude_embedding=False) / 1e6,
                model_args.num_params(exclude_embedding=True) / 1e6)
    return parts


def uses_fsdp(config: Config, dims: ParallelDims) -> bool:
    return dims.dp_cp > 1 or config.parallelism.fsdp_cpu_offload


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``; to a GPU from page-locked memory, so the copy does not wait for the host."""
    return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)


def record_scalars(values: dict[int, tuple[float, float]], result: TrainResult, checkpoints) -> None:
    """Store the steps' losses and gradient norms; raise TrainingDiverged at the first that is not finite.

    A step with a non-finite loss or gradient norm was never applied (``optim.step_unless_non_finite``),
    and every checkpoint is saved after this check, so the last one saved is still good.
    """
    for step, (loss, norm) in values.items():
        if not (math.isfinite(loss) and math.isfinite(norm)):
            if checkpoints:
                checkpoints.wait()  # a background save of an earlier, finite step is still good
            last = checkpoints.latest() if checkpoints else None
            raise TrainingDiverged(
                f"step {step}: loss {loss} / gradient norm {norm} is not finite, so the optimizer did not apply "
                f"it and training stopped. The last good checkpoint is {last[1] if last else '(none saved yet)'}; "
                "try a lower optimizer.lr or more lr_scheduler.warmup_steps and run again: it resumes from there "
                "(checkpoint.resume = \"auto\").")
        result.losses[step], result.grad_norms[step] = loss, norm


def train_step(parts: ModelParts, optimizer: torch.optim.Optimizer, microbatches: list[Batch], config: Config,
               loss_group: dist.ProcessGroup, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward every microbatch, clip, and step. Returns (global loss, grad norm) as 0-d
    tensors on the device: nothing here waits for the device (see ``optim.step_unless_non_finite``).

    The loss is the sum of token losses divided by the number of valid tokens in the whole global
    batch (all microbatches on all data-parallel ranks, and context-parallel ranks: ``loss_group``),
    so accumulation and data parallelism give exactly the gradient of one big batch, however the
    valid tokens are spread. A step whose loss or gradient norm is not finite is not applied.
    """
    num_valid = sum(valid_tokens(b) for b in microbatches).float()
    dist.all_reduce(num_valid, group=loss_group)
    total = torch.zeros((), device=num_valid.device)
    for i, batch in enumerate(microbatches):
        with autocast:
            if parts.pipeline is not None:
                # The schedule runs forward and backward of its own microbatches; only the ranks
                # holding the last stage see the loss (others get None). FSDP reduces the gradients
                # of all accumulation steps once, in the last.
                loss_sum = parts.pipeline.step(batch.tokens, batch.labels, num_valid, **attention_inputs(batch, config),
                                               reduce_gradients=i == len(microbatches) - 1)
            else:
                # With labels the model returns the summed token loss, computed chunk by chunk so the
                # [tokens x vocab] logits and their gradient never exist at once.
                loss_sum = parts.stages[0](batch.tokens, labels=batch.labels, **attention_inputs(batch, config))
                (loss_sum / num_valid).backward()
        if loss_sum is not None:
            total += loss_sum.detach()
    params = [p for p in parts.model.parameters() if p.grad is not None]
    grad_norm = clip_grad_norm(params, config.training.max_norm, pipeline_group(parts))
    dist.all_reduce(total, group=loss_group)
    if parts.pipeline is not None:  # the last stage's ranks hold the loss; give it to every rank
        dist.all_reduce(total, group=pipeline_group(parts))
    loss = total / num_valid
    step_unless_non_finite(optimizer, torch.isfinite(loss) & torch.isfinite(grad_norm))
    after_optimizer_step(parts.model, config.float8)
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def valid_tokens(batch: Batch) -> torch.Tensor:
    """The batch's tokens that count in the loss, as a tensor where the labels are (no host sync)."""
    return (batch.labels != IGNORE_INDEX).sum()


def pipeline_group(parts: ModelParts) -> Optional[dist.ProcessGroup]:
    return None if parts.pipeline is None else parts.pipeline.stages[0].group


def attention_inputs(batch: Batch, config: Config) -> dict[str, torch.Tensor]:
    """With document masking, tokens see only their own document and RoPE restarts at each one.

    Under context parallelism a rank's tokens are not a prefix of the sequence, so their global
    positions (see ``parallel/cp.py: shard_batch``) are passed with or without document masking.
    """
    inputs = {}
    if config.data.document_mask or config.parallelism.cp > 1:
        inputs["positions"] = batch.positions
    if config.data.document_mask:
        inputs["document_ids"] = batch.document_ids
    return inputs


def clip_grad_norm(params: list[torch.Tensor], max_norm: float,
                   pipeline_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Total gradient norm over all ranks (as one process would compute it), clipped to ``max_norm``.

    Sharded (DTensor) gradients first take their parameters' placements (``settle_gradients``: this is
    the first reader of the step's finished gradients), then reduce their partial norms over the mesh
    they live on; pipeline stages hold disjoint parameters, so their squared norms are summed over
    ``pipeline_group``.
    """
    settle_gradients(params)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):  # sharded gradients: the partial norms are reduced here
        norm = norm.full_tensor()
    if pipeline_group is not None:
        squared = norm**2
        dist.all_reduce(squared, group=pipeline_group)
        norm = squared.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


@torch.no_grad()
def evaluate(parts: ModelParts, loader: TokenLoader, num_batches: int, config: Config, loss_group: dist.ProcessGroup,
             device: torch.device, autocast, shard_for_cp: Callable[[Batch], Batch] = lambda batch: batch) -> float:
    """Mean token loss over the first ``num_batches`` global batches of ``loader``, on all dp (x cp) ranks.

    ``loss_group`` and ``shard_for_cp`` as in training: the ranks holding different tokens, and
    what cuts this rank's share of the sequence out of a batch.
    """
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i == num_batches:
            break
        batch = shard_for_cp(batch.to(device))
        with autocast:
            if parts.pipeline is not None:
                loss_sum = parts.pipeline.eval_step(batch.tokens, batch.labels, **attention_inputs(batch, config))
            else:
                loss_sum = parts.stages[0](batch.tokens, labels=batch.labels, **attention_inputs(batch, config))
        if loss_sum is not None:
            totals[0] += loss_sum
        totals[1] += valid_tokens(batch)
    dist.all_reduce(totals, group=loss_group)
    if parts.pipeline is not None:  # only the last stage's ranks summed losses; counts are the same everywhere
        losses = totals[:1].clone()
        dist.all_reduce(losses, group=pipeline_group(parts))
        totals[0] = losses[0]
    return (totals[0] / totals[1]).item()


class StepCounter:
    """The number of the last completed optimizer step, for the checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def pick_device(config: Config) -> torch.device:
    choice = config.training.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{config.source}: training.device = 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_dtype(config: Config, device: torch.device) -> str:
    dtype = config.training.dtype
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "bfloat16" and device.type == "cpu":
        logger.warning("bfloat16 on CPU is much slower than float32 on most CPUs")
    return dtype


def setup_logging(output_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console and to output_dir/train.log; other ranks only warn."""
    output_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_torchtrain", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(output_dir / "train.log"))
    for handler in handlers:
        handler._torchtrain = True
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


if __name__ == "__main__":
    main()
