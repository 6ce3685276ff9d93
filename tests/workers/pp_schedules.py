"""Run every pipeline schedule on 2 ranks and compare loss and gradients with one full model.

Each rank builds the same full model (same seed) as the reference, runs its forward+backward on
the whole batch, then for each schedule builds this rank's stages from a meta-device model, copies
the reference weights in, and runs ``Pipeline.step``, ``Pipeline.eval_step`` and ``step`` again
(the second exercises torch's re-initialisation after a switch from eval). Any mismatch is
collected, not raised at once, so a failing rank does not leave its peer waiting in a send.
Prints "PP OK <n> cases" on rank 0 when every case matched.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

from torchtrain.loss import IGNORE_INDEX
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.pp import (build_pipeline, build_stage, resolve_stages_per_rank, split_layers,
                                    stage_ids_for_rank)

BATCH, SEQ = 4, 64
# (schedule, microbatches, explicit layers per stage or None, activation checkpointing)
CASES = [
    ("gpipe", 2, [1, 3], False),  # 2 samples per microbatch, the lighter stage first
    ("1f1b", 4, None, False),  # balanced: [3, 1]
    ("interleaved_1f1b", 4, None, False),  # balanced: [1, 1, 2, 0], a last stage of only the head
    ("interleaved_zb", 4, None, False),
    ("interleaved_zb", 4, [1, 1, 1, 1], True),
    ("zbv", 4, None, False),
    ("zbv", 2, [1, 1, 1, 1], True),
]


def make_batch(vocab: int) -> dict:
    """Two packed documents per row: positions restart and no token attends across the boundary."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    cuts = torch.randint(8, SEQ - 8, (BATCH,), generator=g)
    index = torch.arange(SEQ).expand(BATCH, SEQ)
    document_ids = (index >= cuts[:, None]).long()
    positions = torch.where(document_ids == 0, index, index - cuts[:, None])
    labels = tokens[:, 1:].clone()
    labels[torch.arange(BATCH), cuts - 1] = IGNORE_INDEX  # a document's last token predicts nothing
    labels[:, -1] = IGNORE_INDEX
    return dict(tokens=tokens[:, :-1], labels=labels, positions=positions, document_ids=document_ids)


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, pp_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    args = get_model_args("debug")
    torch.manual_seed(0)
    full = Transformer(args)
    full.init_weights()
    batch = make_batch(args.vocab_size)
    num_valid = (batch["labels"] != IGNORE_INDEX).sum()
    ref_loss = full(**batch)
    (ref_loss / num_valid).backward()
    ref_grads = {name: p.grad for name, p in full.named_parameters()}
    with torch.no_grad():
        ref_eval = full(**batch)
    full_state = full.state_dict()
    with torch.device("meta"):
        meta_model = Transformer(args)

    errors: list[str] = []

    def close(what: str, actual, expected) -> None:
        try:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
        except AssertionError as e:
            errors.append(f"rank {rank} {what}: {str(e).splitlines()[0:4]}")

    for schedule, microbatches, layers_per_stage, checkpoint in CASES:
        case = f"{schedule} mb={microbatches} split={layers_per_stage} ac={checkpoint}"
        per_rank = resolve_stages_per_rank(schedule, 0)
        num_stages = pp_size * per_rank
        layers = split_layers(args, num_stages, layers_per_stage, seq_len=SEQ)
        stage_ids = stage_ids_for_rank(rank, pp_size, per_rank, schedule)
        modules = []
        for s in stage_ids:
            module = build_stage(meta_model, layers[s], s == 0, s == num_stages - 1)
            apply_activation_checkpointing(module, "full" if checkpoint else "none")
            module.to_empty(device="cpu")
            module.init_weights()
            # Checkpoint wrappers add "_checkpoint_wrapped_module." to names; the state dict strips it.
            module.load_state_dict({k: full_state[k] for k in module.state_dict()})
            modules.append(module)

        # The stages' parameters partition the full model's: each name exactly once across ranks.
        names = [k for m in modules for k in m.state_dict()]
        gathered: list = [None] * pp_size
        dist.all_gather_object(gathered, names)
        everyone = [k for part in gathered for k in part]
        if sorted(everyone) != sorted(full_state):
            errors.append(f"{case}: stage parameters do not partition the model: "
                          f"{sorted(set(full_state) ^ set(everyone))} / duplicates "
                          f"{sorted({k for k in everyone if everyone.count(k) > 1})}")

        pipeline = build_pipeline(modules, stage_ids, num_stages, dist.group.WORLD, torch.device("cpu"),
                                  schedule, microbatches)
        for attempt in ("train", "eval", "train again"):
            for m in modules:
                m.zero_grad(set_to_none=True)
            if attempt == "eval":
                loss = pipeline.eval_step(batch["tokens"], batch["labels"], batch["positions"], batch["document_ids"])
                if pipeline.has_last_stage:
                    close(f"{case} eval loss", loss, ref_eval)
                if any(p.grad is not None for m in modules for p in m.parameters()):
                    errors.append(f"rank {rank} {case}: eval_step produced gradients")
                continue
            loss = pipeline.step(batch["tokens"], batch["labels"], num_valid, batch["positions"],
                                 batch["document_ids"])
            if pipeline.has_last_stage:
                close(f"{case} {attempt} loss", loss, ref_loss.detach())
            elif loss is not None:
                errors.append(f"rank {rank} {case}: a rank without the last stage returned a loss")
            for m in modules:
                for name, p in m.named_parameters():
                    name = name.replace("_checkpoint_wrapped_module.", "")
                    if p.grad is None:
                        errors.append(f"rank {rank} {case} {attempt}: no gradient for {name}")
                    else:
                        close(f"{case} {attempt} grad {name}", p.grad, ref_grads[name])

    gathered_errors: list = [None] * pp_size
    dist.all_gather_object(gathered_errors, errors)
    all_errors = [e for part in gathered_errors for e in part]
    dist.destroy_process_group()
    if all_errors:
        print("\n".join(all_errors[:40]), file=sys.stderr)
        sys.exit(1)
    if rank == 0:
        print(f"PP OK {len(CASES)} cases")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
