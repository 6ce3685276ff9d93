"""Compiled blocks compile during the first step only: no graph breaks (blocks are compiled with
fullgraph=True, so a break is an error) and no compilation in later steps, whatever the documents,
checkpointing mode or layout.

(Validation, under ``torch.no_grad``, compiles the blocks once more: grad mode is part of a graph's
guards; only training steps are run here. Under tensor parallelism the first block compiles a graph of
its own: its input's local tensor is still the embedding's pending collective, the others' a plain one.)"""

import json

import pytest

from launcher import REPO, torchrun
from test_train import tiny

STEPS = 3


def graphs_after_each_step(tmp_path, nproc: int, *extra: str) -> list[int]:
    graphs = tmp_path / "graphs.json"
    torchrun(nproc, REPO / "tests/workers/train_no_recompile.py", "--graphs-out", graphs,
             "--out", tmp_path / "losses.json", "--config", REPO / "recipes/debug.toml",
             *tiny(tmp_path / "run", "--compile.enabled", "true", "--compile.backend", "aot_eager",
                   "--training.steps", str(STEPS), "--training.val_every", "0",
                   "--checkpoint.enabled", "false", "--data.document_mask", "true", *extra))
    return json.loads(graphs.read_text())["graphs_after_step"]


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_one_process_compiles_in_the_first_step_only(tmp_path, mode, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    import torchtrain.train
    from test_train import run

    torch._dynamo.reset()
    counters.clear()
    graphs, train_step = [], torchtrain.train.train_step

    def counted_train_step(*args, **kwargs):
        result = train_step(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    monkeypatch.setattr(torchtrain.train, "train_step", counted_train_step)
    run(tmp_path, "--compile.enabled", "true", "--compile.backend", "aot_eager", "--training.steps", str(STEPS),
        "--training.val_every", "0", "--checkpoint.enabled", "false", "--data.document_mask", "true",
        "--activation_checkpoint.mode", mode)
    # Every step ran, each batch with its own document boundaries; only the first compiled.
    assert len(graphs) == STEPS and graphs[0] > 0 and graphs[-1] == graphs[0], graphs


def test_fsdp_and_tensor_parallel_compile_in_the_first_step_only(tmp_path):
    graphs = graphs_after_each_step(tmp_path, 4, "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                                    "--training.local_batch_size", "2", "--activation_checkpoint.mode", "selective")
    assert len(graphs) == STEPS and graphs[0] > 0 and graphs[-1] == graphs[0], graphs
