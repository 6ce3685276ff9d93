"""Does fusing the projections that read the same input into one wide GEMM speed up a CPU block?

    python bench/linear_fusion.py [--model debug_30m] [--tokens 4096] [--rounds 10]

Inductor has a pre-grad pass (``batch_linear_lhs``) that rewrites ``linear(x, w1), linear(x, w2),
...`` into one ``mm(x, cat(w1, w2, ...).T)``: q/k/v and the SwiGLU gate/up projections become two
wide GEMMs, in the forward and (because the rewrite happens before autograd) in the backward. The
pass only matches 2-D inputs, so the variant flattens the block's input to ``[tokens, dim]``. One
process compiles three versions of the same block (as is, flattened, flattened + fused) and times
forward + backward interleaved, round by round, so machine noise hits all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F

from torchtrain.models import get_model_args, llama
from torchtrain.models.attention import attention
from torchtrain.parallel.compile import inductor_recomputing_pointwise


def flat_attention_forward(self, x, rope_cos, rope_sin, document_ids=None):
    bsz, seq_len, dim = x.shape
    x2 = x.reshape(-1, dim)
    q, k, v = (proj(x2).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
    q, k = llama.apply_rope(q, rope_cos, rope_sin), llama.apply_rope(k, rope_cos, rope_sin)
    out = attention(q, k, v, backend=self.backend, causal=True, document_ids=document_ids)
    return self.wo(out.transpose(1, 2).reshape(bsz, seq_len, -1))


def flat_feed_forward(self, x):
    x2 = x.reshape(-1, x.shape[-1])
    return self.w2(F.silu(self.w1(x2)) * self.w3(x2)).view(x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="debug_30m")
    parser.add_argument("--tokens", type=int, default=4096, help="batch x sequence (sequence 512)")
    parser.add_argument("--rounds", type=int, default=10)
    opts = parser.parse_args()
    args = get_model_args(opts.model)
    seq_len = 512
    cos, sin = (t[:seq_len] for t in llama.rope_tables(args))
    x = torch.randn(opts.tokens // seq_len, seq_len, args.dim, requires_grad=True)

    def build(flat: bool, fuse: bool):
        block = llama.TransformerBlock(args)
        block.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
        if flat:
            block.attention.forward = types.MethodType(flat_attention_forward, block.attention)
            block.feed_forward.forward = types.MethodType(flat_feed_forward, block.feed_forward)
        compiled = torch.compile(block, backend=inductor_recomputing_pointwise, fullgraph=True)
        options = {"batch_linear_lhs": {"min_fuse_set_size": 2}} if fuse else {}
        with torch._inductor.config.patch(pre_grad_fusion_options=options):
            for _ in range(2):  # compile forward and backward under the option
                compiled(x, cos, sin).sum().backward()
        return compiled

    variants = {"as is": build(False, False), "flattened": build(True, False), "flattened + fused": build(True, True)}
    fused = torch._dynamo.utils.counters["inductor"].get("batch_linear_lhs", 0)
    times = {name: [] for name in variants}
    for _ in range(opts.rounds):
        for name, block in variants.items():
            start = time.perf_counter()
            block(x, cos, sin).sum().backward()
            times[name].append(time.perf_counter() - start)
    print(f"{opts.model}, {opts.tokens} tokens, fp32, {torch.get_num_threads()} threads; "
          f"linears fused by the pass: {fused} groups")
    for name, ts in times.items():
        print(f"  {name:<18} forward+backward per block: median {1000 * statistics.median(ts):6.0f} ms, "
              f"min {1000 * min(ts):6.0f} ms")


if __name__ == "__main__":
    main()
