"""Train (as tests/workers/train_losses.py) and record how many graphs torch.compile has made after each step.

Writes ``{"graphs_after_step": [...]}`` to the file after ``--graphs-out`` (rank 0); the remaining
arguments are train_losses.py's.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from torch._dynamo.utils import counters

import torchtrain.train

assert sys.argv[1] == "--graphs-out"
graphs_out, graphs = sys.argv[2], []
train_step = torchtrain.train.train_step


def counted_train_step(*args, **kwargs):
    result = train_step(*args, **kwargs)
    graphs.append(counters["stats"]["unique_graphs"])
    return result


torchtrain.train.train_step = counted_train_step  # the training loop looks the function up at each step
sys.argv = [str(Path(__file__).with_name("train_losses.py")), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
if os.environ.get("RANK", "0") == "0":
    Path(graphs_out).write_text(json.dumps({"graphs_after_step": graphs}))
