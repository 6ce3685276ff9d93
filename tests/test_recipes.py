"""Every shipped recipe, the published runs' own layouts (recipes/seed/) included, builds at its real world size.

The dry check (``python -m torchtrain.plan --check``, ``torchtrain.plan.check_recipe``) runs the trainer's own mesh, pipeline split, tensor parallel
and FSDP code for one rank of each pipeline stage under a fake process group, on the meta device.
"""

from pathlib import Path

import pytest

from torchtrain.config import ConfigError, load_config
from torchtrain.plan import check_recipe, world_size_of

RECIPES = sorted(Path(__file__).resolve().parent.parent.glob("recipes/**/*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_layout_builds_at_its_world_size(recipe):
    config = load_config(recipe)
    world_size = world_size_of(config, None if config.parallelism.dp_shard != -1 else 1)
    reports = check_recipe(config, world_size)
    held = sum(r.num_params for r in reports)
    assert held > 0 and len(reports) == config.parallelism.pp


SEED_PIPELINES = sorted(Path(__file__).resolve().parent.parent.glob("recipes/seed/llama_2_70b_*.toml"))


@pytest.mark.parametrize("recipe", SEED_PIPELINES, ids=lambda p: p.stem)
def test_the_published_megatron_layouts_split_llama2_70b_evenly(recipe):
    config = load_config(recipe)
    reports = check_recipe(config, world_size_of(config, None))
    assert len(reports) == 8
    # Every block is on exactly one stage, and the stages hold about the same parameters.
    sizes = [r.num_params for r in reports]
    assert max(sizes) / min(sizes) < 1.1


def test_a_layout_that_does_not_fit_the_world_size_is_refused():
    config = load_config(Path(__file__).resolve().parent.parent / "recipes/llama2_70b_2k.toml")
    with pytest.raises(ConfigError, match=r"multiply to 32, but 24 processes"):
        check_recipe(config, 24)


def test_the_plan_command_prints_each_stage(capsys):
    from torchtrain.plan import main

    main(["--check", "--config", str(Path(__file__).resolve().parent.parent / "recipes/debug.toml"), "--ngpu", "8",
          "--parallelism.pp", "2", "--parallelism.tp", "2", "--parallelism.pp_schedule", "interleaved_1f1b",
          "--parallelism.pp_layers_per_stage", "[1, 1, 1, 1]"])
    out = capsys.readouterr().out
    assert "debug on 8 ranks: pp 2 x dp_shard 2 x tp 2" in out
    assert "pipeline: interleaved_1f1b, 4 stages, 8 microbatches" in out
    assert "rank     0: embed blocks 0-0 + blocks 2-2" in out and "rank     4: blocks 1-1 + blocks 3-3 + output" in out
