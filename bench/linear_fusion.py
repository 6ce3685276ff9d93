"""Does fusing the projections that read the same input into one wide GEMM speed up a block on CPU?

    python bench/linear_fusion.py [--model debug_30m] [--tokens 4096] [--rounds 10]

``training_inductor(fuse_projections=True)`` (the trainer's compile backend without tensor
parallelism) runs inductor's pre-grad pass ``batch_linear_lhs``, which rewrites ``linear(x, wq),
linear(x, wk), linear(x, wv)`` into one ``mm(x, cat(wq, wk, wv).T)`` (and the same for the SwiGLU
gate and up projections), in the forward and, because it runs before autograd, in the backward.
One process compiles the same block with and without it and times forward + backward
interleaved, round by round, so machine noise hits both alike. fp32; the FLOPs are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torchtrain.models import get_model_args, llama
from torchtrain.parallel.compile import training_inductor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="debug_30m")
    parser.add_argument("--tokens", type=int, default=4096, help="batch x sequence (sequence 512)")
    parser.add_argument("--rounds", type=int, default=10)
    opts = parser.parse_args()
    # NOTE: both variants trace to the same graph; a cached compilation would skip the pass.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    args = get_model_args(opts.model)
    seq_len = 512
    cos, sin = (t[:seq_len] for t in llama.rope_tables(args))
    x = torch.randn(opts.tokens // seq_len, seq_len, args.dim, requires_grad=True)

    def build(fuse: bool):
        block = llama.TransformerBlock(args)
        block.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
        # A backend object of its own per variant: dynamo compiles each separately.
        compiled = torch.compile(block, backend=training_inductor(fuse), fullgraph=True)
        for _ in range(2):  # compile forward and backward
            compiled(x, cos, sin).sum().backward()
        return compiled

    variants = {"separate GEMMs": build(False), "fused projections": build(True)}
    fused = torch._dynamo.utils.counters["inductor"].get("batch_linear_lhs", 0)
    times = {name: [] for name in variants}
    for _ in range(opts.rounds):
        for name, block in variants.items():
            start = time.perf_counter()
            block(x, cos, sin).sum().backward()
            times[name].append(time.perf_counter() - start)
    print(f"{opts.model}, {opts.tokens} tokens, fp32, {torch.get_num_threads()} threads; "
          f"projection groups fused: {fused}")
    for name, ts in times.items():
        print(f"  {name:<18} forward+backward per block: median {1000 * statistics.median(ts):6.0f} ms, "
              f"min {1000 * min(ts):6.0f} ms")
    base, fused_t = (statistics.median(ts) for ts in times.values())
    print(f"  fused / separate: {fused_t / base:.3f}")


if __name__ == "__main__":
    main()
