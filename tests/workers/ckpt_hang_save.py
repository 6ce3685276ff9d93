"""Train, but hang forever in the middle of writing one checkpoint, so a test can SIGKILL us mid-save.

Usage: ckpt_hang_save.py --hang-step N --ready FILE <train overrides>. When the checkpoint of step N
has written its shard files into its ``.partial`` folder (and before DCP writes ``.metadata`` and
before the commit), FILE is created and the process sleeps until it is killed.
"""

import argparse
import time
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

from torchtrain.config import load_config, parse_args
from torchtrain.train import train

parser = argparse.ArgumentParser()
parser.add_argument("--hang-step", type=int, required=True)
parser.add_argument("--ready", required=True)
args, overrides = parser.parse_known_args()

original_write_data = FileSystemWriter.write_data


def write_data_then_hang(self, plan, planner):
    written = original_write_data(self, plan, planner)
    if Path(self.path).name == f".step-{args.hang_step:08d}.partial":
        written.wait()  # the shards are on disk: now we are really mid-save (no .metadata, no rename)
        Path(args.ready).write_text(str(self.path))
        while True:
            time.sleep(60)
    return written


FileSystemWriter.write_data = write_data_then_hang
train(load_config(*parse_args(overrides)))
raise SystemExit(f"step {args.hang_step} was never saved")
