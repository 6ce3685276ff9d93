"""Train with the given --config recipe and overrides and write rank 0's per-step losses and gradient norms as JSON to --out.

With ``--hf-reads DIR`` (after ``--out``), each rank also writes ``DIR/rank<R>.json``: every block it read from the
safetensors files of ``checkpoint.initial_load_path``, as ``[key, block shape, whole tensor's shape]``.
"""

import json
import os
import sys
from pathlib import Path

from torchtrain.config import load_config, parse_args
from torchtrain.train import train

assert sys.argv[1] == "--out"
out, overrides = sys.argv[2], sys.argv[3:]
reads_dir, reads = None, []
if overrides[:1] == ["--hf-reads"]:
    from torchtrain import hf_checkpoint

    reads_dir, overrides = Path(overrides[1]), overrides[2:]
    read_slice = hf_checkpoint._read_slice

    def counting_read_slice(f, key, index):
        value = read_slice(f, key, index)
        reads.append([key, list(value.shape), list(f.get_slice(key).get_shape())])
        return value

    hf_checkpoint._read_slice = counting_read_slice
result = train(load_config(*parse_args(overrides)))
if reads_dir is not None:
    reads_dir.mkdir(parents=True, exist_ok=True)
    (reads_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(reads))
if os.environ.get("RANK", "0") == "0":
    with open(out, "w") as f:
        json.dump({"losses": result.losses, "grad_norms": result.grad_norms, "val_losses": result.val_losses}, f)
