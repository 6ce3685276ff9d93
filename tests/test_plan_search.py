"""``python -m torchtrain.plan --search`` on every shipped recipe: candidates that fit or one plain error, overrides
that reproduce what was measured, and every pipeline rank planned."""

import shlex
from pathlib import Path

import pytest
import torch

from torchtrain.checks import check_run
from torchtrain.config import ConfigError, load_config
from torchtrain.plan.cli import planning_config
from torchtrain.plan.depth import measure_rank_by_depth
from torchtrain.plan.fake_step import Target, gpu_model_args
from torchtrain.plan.layout import world_size_of
from torchtrain.plan.planner import plan_layout, role_plan
from torchtrain.plan.search import candidate_config, chosen_keys, layouts, overrides_of, print_search, search
from torchtrain.plan.timing import GPUS

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(REPO.glob("recipes/*.toml"))
GPU = GPUS["h100"]

# The messages a search may end with instead of candidates: nothing factors, nothing fits by the estimate,
# nothing fits when measured. Anything else (another ConfigError, any other exception) is a failure.
NO_LAYOUT = ("do not factor into any layout", "does not fit on")


# The search runs at 8 GPUs (one node) but for the 70B long-context recipes, at the 128 GPUs their own command
# in docs/long_context.md searches; its printed overrides are planned again for the recipes of REPLAYED (a long
# context "layers" recipe and the default one: a second plan each), read back as configs for the others.
SEARCH_GPUS = {"llama2_70b_32k": 128, "llama2_70b_64k": 128}
REPLAYED = ("debug", "internlm_7b_32k")


def recipe_gpus(config) -> int:
    """The recipe's own world size (8 where it takes whatever the launch gives)."""
    return world_size_of(config, 8 if config.parallelism.dp_shard == -1 else None)


def checked_layouts(layouts_found: list, per_kind: bool) -> list:
    """``layouts_found``, or with ``per_kind`` one of each kind whose overrides differ in which keys they print."""
    if not per_kind:
        return layouts_found
    kinds = {}
    for layout in layouts_found:
        kind = (layout.schedule, layout.ac_mode, layout.reshard, layout.dp_replicate > 1, layout.cp > 1, layout.tp > 1)
        kinds.setdefault(kind, layout)
    return list(kinds.values())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_candidate_of_every_recipe_passes_the_checks_and_its_overrides_reproduce_it(recipe):
    # No step is measured: every candidate passes the trainer's checks (none inherits a key of the recipe's
    # own layout that contradicts it), and its overrides turn the recipe file into exactly the run planned
    # (read back for one layout of each kind above 8 GPUs, where reading them all would take 10 s a recipe).
    config = planning_config(load_config(recipe))
    gpus = recipe_gpus(config)
    args = gpu_model_args(config)
    found = layouts(config, args, gpus)
    assert found
    candidates = {layout: candidate_config(config, layout, args.num_layers // 2) for layout in found}
    for candidate in candidates.values():
        check_run(candidate, args, gpus, torch.device("cuda"))
    for layout in checked_layouts(found, per_kind=gpus > 8):
        overrides = overrides_of(config, candidates[layout], chosen_keys(layout))
        assert overrides[:2] == ["--training.seq_len", str(config.training.seq_len)]
        assert ("--model.max_seq_len" in overrides) == bool(config.model.max_seq_len)
        assert planning_config(load_config(recipe, overrides)) == candidates[layout], overrides


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_search_on_every_recipe_fits_or_ends_in_one_plain_error(recipe, capsys):
    config = planning_config(load_config(recipe))
    gpus = SEARCH_GPUS.get(recipe.stem, 8)
    try:
        found = search(config, gpus, GPU, 0.5, top=1, max_measured=1)
    except ConfigError as e:
        assert any(m in str(e) for m in NO_LAYOUT) and "\n" not in str(e), str(e)
        return
    assert len(found) == 1 and found[0].plan.fits
    # Every pipeline rank is in the plan, not only the ends.
    assert [r.pp_rank for r in found[0].plan.roles] == list(range(found[0].layout.pp))
    print_search(config, found, GPU)
    printed = capsys.readouterr().out.splitlines()
    replayed = planning_config(load_config(recipe, shlex.split(printed[2])))
    assert replayed == found[0].config
    if recipe.stem in REPLAYED:  # the printed overrides, read back from the recipe file, plan the same
        plan = plan_layout(replayed, gpu_model_args(replayed), gpus, GPU, 0.5)
        assert plan.dims == found[0].plan.dims and plan.peak_bytes == found[0].plan.peak_bytes
        assert plan.step_seconds == found[0].plan.step_seconds


def test_a_recipe_layout_key_does_not_leak_into_candidates():
    # llama2_70b_32k checkpoints 40 blocks in "layers" mode; a "full" candidate must not keep num_layers 40,
    # and must print the reset so that the recipe file plus the overrides is that candidate.
    config = planning_config(load_config(REPO / "recipes/llama2_70b_32k.toml"))
    args = gpu_model_args(config)
    layout = next(l for l in layouts(config, args, 128) if l.ac_mode == "full" and l.pp == 1)
    candidate = candidate_config(config, layout, args.num_layers // 2)
    assert candidate.activation_checkpoint.num_layers == 0
    overrides = overrides_of(config, candidate, chosen_keys(layout))
    assert " ".join(overrides).count("--activation_checkpoint.num_layers 0") == 1


@pytest.mark.parametrize("pp,extra", [
    (5, ["--parallelism.pp_schedule", "1f1b", "--parallelism.pp_layers_per_stage", "[1,2,2,2,1]",
         "--activation_checkpoint.mode", "layers", "--activation_checkpoint.num_layers", "4"]),
    (4, ["--parallelism.pp_schedule", "interleaved_1f1b", "--parallelism.pp_layers_per_stage", "[1,1,1,1,1,1,1,1]"]),
], ids=["1f1b_layers", "interleaved"])
def test_middle_pipeline_ranks_measured_once_plan_as_if_each_were_measured(pp, extra):
    # Ranks whose stages hold alike blocks share one measurement (planner.measure_pipeline_ranks); each must
    # plan exactly as its own measurement would.
    config = planning_config(load_config(REPO / "recipes/debug.toml", [
        "--model.name", "debug_30m", "--training.seq_len", "128", "--training.local_batch_size", "8",
        "--parallelism.pp", str(pp), "--parallelism.dp_shard", "1", *extra]))
    args = gpu_model_args(config)
    plan = plan_layout(config, args, pp, GPU, 0.5)
    assert [r.pp_rank for r in plan.roles] == list(range(pp))
    for role in plan.roles[1:-1]:
        own = role_plan(measure_rank_by_depth(config, args, plan.dims, role.rank, Target()), config, args,
                        plan.dims, Target())
        assert (role.stages, role.peak_bytes, role.breakdown, role.flops_per_step, role.num_params) == (
            own.stages, own.peak_bytes, own.breakdown, own.flops_per_step, own.num_params)
