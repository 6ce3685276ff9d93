"""The plan of every shipped recipe as it is laid out, on A100-80GB and H100.

    python bench/plan_recipes.py [--recipes NAME ...] [--out bench/results/plan_recipes.json]

For each recipe in recipes/ (the debug one aside): ``python -m torchtrain.plan --config
recipes/NAME.toml --gpu a100-80g`` (the recipe's own layout and world size), its peak memory per
GPU and the largest category, and the predicted tokens/s per GPU and MFU on both GPUs (the memory
is measured once; the time model is applied with each GPU's rates). Prints a markdown table, the
one in docs/long_context.md, and writes every figure to the JSON file. The efficiency is
:data:`torchtrain.plan.timing.DEFAULT_EFFICIENCY`, an assumption, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import provenance

sys.path.insert(0, str(provenance.REPO))

import torch  # noqa: E402

from torchtrain.config import load_config  # noqa: E402
from torchtrain.plan.fake_step import gpu_model_args  # noqa: E402
from torchtrain.plan.cli import planning_config, world_size_of  # noqa: E402
from torchtrain.plan.planner import on_gpu, plan_layout  # noqa: E402
from torchtrain.plan.timing import DEFAULT_EFFICIENCY, GPUS  # noqa: E402

RECIPES = sorted(p.stem for p in (provenance.REPO / "recipes").glob("*.toml") if p.stem != "debug")
GIB = 2**30


def plan_recipe(name: str) -> dict:
    started = time.perf_counter()
    config = planning_config(load_config(provenance.REPO / "recipes" / f"{name}.toml", []))
    world_size = world_size_of(config, None)
    a100 = plan_layout(config, gpu_model_args(config), world_size, GPUS["a100-80g"],
                       DEFAULT_EFFICIENCY)
    h100 = on_gpu(a100, GPUS["h100"])  # the same memory: both have 80 GiB
    peak_role = max(a100.roles, key=lambda r: r.peak_bytes)
    return {"recipe": name, "gpus": world_size, "layout": a100.layout(), "seq_len": config.training.seq_len,
            "activation_checkpoint": config.activation_checkpoint.mode, "peak_gib": a100.peak_bytes / GIB,
            "fits_80g": a100.fits, "breakdown_gib": {k: round(v / GIB, 2) for k, v in peak_role.breakdown.items()},
            "a100_tokens_per_s_per_gpu": a100.tokens_per_second_per_gpu, "a100_mfu": a100.mfu,
            "h100_tokens_per_s_per_gpu": h100.tokens_per_second_per_gpu, "h100_mfu": h100.mfu,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=RECIPES, choices=RECIPES, metavar="NAME")
    parser.add_argument("--out", type=Path, default=provenance.RESULTS / "plan_recipes.json")
    opts = parser.parse_args(argv)
    provenance.check_destination(opts.out)
    started = time.perf_counter()
    rows = [plan_recipe(name) for name in opts.recipes]
    print("| recipe | GPUs | layout | AC | planned peak (80 GB) | of which activations | tokens/s/GPU A100 / H100 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['recipe']}` | {r['gpus']} | {r['layout']} | {r['activation_checkpoint']} | {r['peak_gib']:.1f} GiB"
              f"{'' if r['fits_80g'] else ' (does not fit)'} | {r['breakdown_gib'].get('activations', 0):.1f} GiB | "
              f"{r['a100_tokens_per_s_per_gpu']:,.0f} / {r['h100_tokens_per_s_per_gpu']:,.0f} |")
    report = {"benchmark": "plan_recipes", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/plan_recipes.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": provenance.commit(), "working_tree_dirty": provenance.tree_dirty(),
              "machine": {"cpu": provenance.cpu_name()}, "efficiency": DEFAULT_EFFICIENCY,
              "efficiency_note": "an assumption, not calibrated on a GPU", "seconds": time.perf_counter() - started,
              "rows": rows}
    provenance.write_report(opts.out, report)


if __name__ == "__main__":
    main()
