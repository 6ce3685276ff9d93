"""Compiled blocks compile during the first step only: no graph breaks (blocks are compiled with
fullgraph=True, so a break is an error) and no compilation in later steps, whatever the documents or
checkpointing mode (and layout: tests/test_layouts.py counts the graphs of every compiled layout).

(Validation, under ``torch.no_grad``, compiles the blocks once more: grad mode is part of a graph's
guards; only training steps are run here. Under tensor parallelism the first block compiles a graph of
its own: its input's local tensor is still the embedding's pending collective, the others' a plain one.)"""

import pytest

STEPS = 3


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
