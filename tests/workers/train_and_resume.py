"""Train, then resume from the checkpoint at --resume-from and train to the end again.

Writes rank 0's per-step losses and gradient norms of both runs as JSON to --out, and how many graphs
torch.compile had made after each training step of the first run. The final checkpoint of the first
run is removed so the second resumes from step --resume-from.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import torchtrain.train

from torchtrain.config import load_config, parse_args
from torchtrain.parallel import init_distributed
from torchtrain.train import train

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--resume-from", type=int, required=True)
args, overrides = parser.parse_known_args()
config = load_config(*parse_args(overrides))
# One process group for both runs (train() leaves a group it did not create in place).
init_distributed(torch.device("cpu"))
rank = dist.get_rank()
graphs, train_step = [], torchtrain.train.train_step


def counted_train_step(*args, **kwargs):
    result = train_step(*args, **kwargs)
    graphs.append(counters["stats"]["unique_graphs"])
    return result


torchtrain.train.train_step = counted_train_step  # the training loop looks the function up at each step
first = train(config)
torchtrain.train.train_step = train_step
if dist.get_rank() == 0:
    shutil.rmtree(Path(config.job.output_dir) / config.checkpoint.folder / f"step-{config.training.steps:08d}")
dist.barrier()
resumed = train(load_config(*parse_args([*overrides, "--checkpoint.resume", "true"])))
dist.destroy_process_group()
if rank == 0:
    Path(args.out).write_text(json.dumps({
        "losses": first.losses, "grad_norms": first.grad_norms, "val_losses": first.val_losses,
        "resumed_losses": resumed.losses, "resumed_grad_norms": resumed.grad_norms,
        "output_dir": str(config.job.output_dir), "graphs_after_step": graphs,
    }))
