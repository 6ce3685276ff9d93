"""Pipeline parallelism: the stage split and placement, stage modules, and every schedule on 2 ranks."""

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from launcher import torchrun
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.pp import (check_schedule, _stage_costs, build_stage, resolve_microbatches,
                                    resolve_stages_per_rank, split_layers, stage_ids_for_rank)

WORKERS = Path(__file__).parent / "workers"


def _sizes(split):
    return [len(stage) for stage in split]


def _bottleneck(args, sizes, seq_len):
    block, first, last = _stage_costs(args, seq_len)
    costs = [block * size for size in sizes]
    costs[0] += first
    costs[-1] += last
    return max(costs)


def test_split_is_contiguous_and_balanced_by_cost():
    args = get_model_args("debug")
    # The output projection + loss (6 * d * V) costs ~2.8 debug blocks at 64 tokens: the last stage gets fewer.
    assert split_layers(args, 2, seq_len=64) == [[0, 1, 2], [3]]
    assert split_layers(args, 1) == [[0, 1, 2, 3]]
    # Llama 2 7B's head (vocab 32k) is small next to 32 blocks: an even split.
    assert _sizes(split_layers(get_model_args("llama2_7b"), 4, seq_len=4096)) == [8, 8, 8, 8]
    for name, stages in (("llama3_8b", 4), ("llama3_70b", 8), ("debug_30m", 3)):
        args = get_model_args(name)
        split = split_layers(args, stages, seq_len=4096)
        assert sum(split, []) == list(range(args.num_layers))


@pytest.mark.parametrize("vocab", [256, 8192, 131072])
def test_split_minimises_the_slowest_stage(vocab):
    args = dataclasses.replace(get_model_args("debug_30m"), vocab_size=vocab)  # 8 blocks
    for stages in (2, 3, 5):
        best = min(
            _bottleneck(args, sizes, 512)
            for sizes in itertools.product(range(args.num_layers + 1), repeat=stages)
            if sum(sizes) == args.num_layers and all(s >= 1 for s in sizes[1:-1])
        )
        assert _bottleneck(args, _sizes(split_layers(args, stages, seq_len=512)), 512) == best


def test_explicit_split_and_its_errors():
    args = get_model_args("debug")
    assert split_layers(args, 2, [1, 3]) == [[0], [1, 2, 3]]
    assert split_layers(args, 3, [2, 2, 0]) == [[0, 1], [2, 3], []]  # a last stage of only the head
    with pytest.raises(ValueError, match=r"pp_layers_per_stage=\[1, 3\] has 2 entries, but there are 3 stages"):
        split_layers(args, 3, [1, 3])
    with pytest.raises(ValueError, match=r"pp_layers_per_stage=\[2, 2, 1\] sums to 5, but the model has 4 blocks"):
        split_layers(args, 3, [2, 2, 1])
    with pytest.raises(ValueError, match=r"pp_layers_per_stage=\[2, 0, 2\]: every stage but the first and last"):
        split_layers(args, 3, [2, 0, 2])
    with pytest.raises(ValueError, match=r"5 pipeline stages .* only 4 blocks"):
        split_layers(args, 5)


def test_stage_placement():
    assert stage_ids_for_rank(1, 4, 0, "1f1b") == [1]
    assert stage_ids_for_rank(1, 4, 0, "interleaved_1f1b") == [1, 5]
    assert stage_ids_for_rank(2, 4, 3, "interleaved_zb") == [2, 6, 10]
    assert [stage_ids_for_rank(r, 4, 0, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    for schedule in ("gpipe", "interleaved_1f1b", "zbv"):  # every stage on exactly one rank
        placed = sorted(sum((stage_ids_for_rank(r, 3, 0, schedule) for r in range(3)), []))
        assert placed == list(range(3 * resolve_stages_per_rank(schedule)))


def test_schedule_settings_are_validated():
    assert [resolve_stages_per_rank(s) for s in ("gpipe", "1f1b", "interleaved_1f1b", "zbv")] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"pp_schedule='1f1b' runs one stage per rank"):
        resolve_stages_per_rank("1f1b", 2)
    with pytest.raises(ValueError, match=r"interleaved_zb' needs parallelism.pp_stages_per_rank >= 2"):
        resolve_stages_per_rank("interleaved_zb", 1)
    with pytest.raises(ValueError, match=r"zbv' needs exactly 2 stages per rank"):
        resolve_stages_per_rank("zbv", 3)
    with pytest.raises(ValueError, match=r"pp_schedule='dualpipe' is not known"):
        resolve_stages_per_rank("dualpipe")
    assert resolve_microbatches(0, 8) == 8
    with pytest.raises(ValueError, match=r"pp_microbatches=3 must divide training.local_batch_size=8"):
        resolve_microbatches(3, 8)
    check_schedule("interleaved_1f1b", 4, 2, 8)
    check_schedule("interleaved_1f1b", 4, 2, 3)  # fewer microbatches than ranks: one round
    with pytest.raises(ValueError, match=r"2 equal rounds .*pp_microbatches=9 must be a multiple of 2"):
        check_schedule("interleaved_zb", 4, 2, 9)
    with pytest.raises(ValueError, match=r"1f1b' needs at least one microbatch per stage"):
        check_schedule("1f1b", 4, 1, 2)


def test_stage_modules_partition_the_model():
    args = get_model_args("debug")
    with torch.device("meta"):
        model = Transformer(args)
    split = split_layers(args, 3, [1, 2, 1])
    stages = [build_stage(model, split[s], s == 0, s == 2) for s in range(3)]
    assert list(stages[1].layers.keys()) == ["1", "2"]  # original keys kept
    assert stages[0].tok_embeddings is not None and stages[0].output is None and stages[0].norm is None
    assert stages[1].tok_embeddings is None and stages[1].output is None
    assert stages[2].tok_embeddings is None and stages[2].norm is not None and stages[2].output is not None
    names = [n for stage in stages for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(model.layers) == 4  # the full model is untouched
    tied = dataclasses.replace(args, tie_embeddings=True)
    with torch.device("meta"):
        tied_model = Transformer(tied)
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_stage(tied_model, [0, 1], True, False)


def test_every_schedule_matches_a_single_process_model():
    """gpipe, 1f1b, interleaved 1F1B / zero bubble and zbv on 2 ranks, against one full model.

    The worker checks the summed loss and every parameter gradient (fp32 tolerance) of a
    forward+backward with packed documents, an evaluation, and a second step after it, including
    uneven splits, 2 samples per microbatch, and activation checkpointing under the schedules that
    split the backward into input and weight passes.
    """
    proc = torchrun(2, WORKERS / "pp_schedules.py", timeout=300)
    assert "PP OK 7 cases" in proc.stdout


def test_gradient_accumulation_under_pp_and_fsdp_gathers_and_reduces_once_per_optimizer_step():
    import json

    proc = torchrun(4, WORKERS / "pp_accumulation.py", timeout=300)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("COUNTS "))
    result = json.loads(line.removeprefix("COUNTS "))
    one, two = result["one_pipeline_step"], result["two_accumulation_steps"]
    assert one and any("reduce_scatter" in op for op in one), one  # FSDP's collectives were seen
    assert two == one
