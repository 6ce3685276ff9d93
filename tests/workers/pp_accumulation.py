"""Count FSDP's collectives in one optimizer step of PP 2 x FSDP 2, with and without accumulation.

Run as ``torchrun --nproc_per_node=4 tests/workers/pp_accumulation.py``. Each rank builds the
debug recipe's model with the trainer's ``build_model`` (pipeline stages, FSDP over dp_shard) and its
optimizer, and runs the trainer's ``train_step`` on 4 samples per data-parallel rank: once as one
pipeline step of 4 microbatches, once as 2 accumulation steps of 2. torch's ``CommDebugMode`` (not
the trainer's or the planner's code) counts the collectives each makes. FSDP gathers the stage's
parameters once and reduce-scatters its gradients once per optimizer step, however the step is
split into pipeline steps. Rank 0 prints ``COUNTS {json}`` with both runs' counts per op.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))

from plan_memory import synthetic_batch  # noqa: E402
from torchtrain.config import load_config  # noqa: E402
from torchtrain.models.shape import model_args_for  # noqa: E402
from torchtrain.optim import build_optimizer  # noqa: E402
from torchtrain.parallel import ParallelDims, build_mesh, init_distributed  # noqa: E402
from torchtrain.train import build_model, train_step  # noqa: E402

SAMPLES = 4  # per data-parallel rank and optimizer step
FSDP_OPS = ("_allgather_base_", "_reduce_scatter_base_", "allgather_into_tensor_coalesced_",
            "reduce_scatter_tensor_coalesced_")


class CollectiveCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname in FSDP_OPS:
            self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))


def counts(accumulation: int) -> dict[str, int]:
    cpu = torch.device("cpu")
    config = load_config("recipes/debug.toml", [
        "--compile.enabled=false", "--training.seq_len=64", "--parallelism.pp=2", "--parallelism.dp_shard=2",
        f"--training.local_batch_size={SAMPLES // accumulation}", f"--training.grad_accum_steps={accumulation}"])
    dims = ParallelDims.resolve(config.parallelism, dist.get_world_size(), config.source)
    mesh = build_mesh(dims, cpu)
    model_args = model_args_for(config, cpu)
    parts = build_model(model_args, config, mesh, dims, cpu, torch.float32)
    optimizer = build_optimizer(parts.model, config.optimizer, cpu)
    batches = [synthetic_batch(config.training.local_batch_size, config.training.seq_len, model_args.vocab_size,
                               seed=mesh.dp.get_local_rank() * 100 + i) for i in range(accumulation)]
    # The first step infers the stages' shapes (one extra forward and backward): count the second.
    train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    with CollectiveCounter() as counter:
        train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    return counter.counts


def main() -> None:
    init_distributed(torch.device("cpu"))
    result = {"one_pipeline_step": counts(1), "two_accumulation_steps": counts(2)}
    if dist.get_rank() == 0:
        print("COUNTS " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
