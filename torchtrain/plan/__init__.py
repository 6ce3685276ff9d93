"""The planner: memory, FLOPs, traffic and step time of a recipe at any scale, measured on a CPU.

    python -m torchtrain.plan --config recipes/X.toml [--ngpu N] [--gpu NAME] [--search] [--section.key value ...]

Modules: ``fake_step`` (one rank's real step under a fake process group and FakeTensorMode),
``tracker`` (memory by category), ``gpu_ops`` (what the GPU's kernels save for the backward, and how a
GPU plan's fake step on a CPU saves the same), ``counters`` (FLOPs and collectives), ``schedule`` (microbatches a
pipeline keeps in flight), ``planner`` (a whole step from one microbatch), ``timing`` (the
step-time model and the GPU table), ``estimate`` and ``search`` (ranking layouts), ``layout``
(the dry meta-device check), ``cli``.
"""

from torchtrain.plan.layout import RankReport, check_recipe, world_size_of


def main(argv=None) -> None:
    from torchtrain.plan.cli import main as cli_main

    cli_main(argv)


__all__ = ["RankReport", "check_recipe", "main", "world_size_of"]
