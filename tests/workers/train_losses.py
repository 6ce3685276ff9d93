"""Train with the given --config recipe and overrides and write rank 0's per-step losses and gradient norms as JSON to --out."""

import json
import os
import sys

from torchtrain.config import load_config, parse_args
from torchtrain.train import train

assert sys.argv[1] == "--out"
out, overrides = sys.argv[2], sys.argv[3:]
result = train(load_config(*parse_args(overrides)))
if os.environ.get("RANK", "0") == "0":
    with open(out, "w") as f:
        json.dump({"losses": result.losses, "grad_norms": result.grad_norms, "val_losses": result.val_losses}, f)
