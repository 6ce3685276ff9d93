"""Context parallelism: the load-balanced sharding, the layout checks, and parity with one process.

The parity cases run in two torchrun launches (process start-up is the expensive part); the worker,
tests/workers/cp_parity.py, says what each case compares. Each case prints ``ok CASE`` on rank 0
only after its loss, logits and every gradient matched the single-process model.
"""

import torch
import pytest

from launcher import REPO, run_cases
from torchtrain.config import Config, ConfigError, Parallelism, Training, validate
from torchtrain.data import Batch
from torchtrain.models import get_model_args
from torchtrain.kernels.attention.reference import reference_attention
from torchtrain.parallel.cp import (apply_cp, chunk_indices, merge_attention, shard_batch, shard_sequence,
                                    unshard_sequence)
from torchtrain.parallel.mesh import ParallelDims, check_layout

WORKER = REPO / "tests" / "workers" / "cp_parity.py"


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_shard_then_unshard_is_the_identity(cp):
    x = torch.arange(3 * 24 * 2).view(3, 24, 2)
    shards = [shard_sequence(x, cp, rank) for rank in range(cp)]
    assert all(s.shape == (3, 24 // cp, 2) for s in shards)
    assert torch.equal(unshard_sequence(shards), x)
    assert torch.equal(unshard_sequence([s.transpose(0, 1) for s in shards], dim=0), x.transpose(0, 1))


def test_each_rank_holds_a_chunk_from_each_end():
    # 2 * cp = 8 chunks of 2 positions: rank r holds chunks r and 7 - r, so every rank's causal
    # attention work (keys up to the end of each of its chunks) is the same: (r + 1) + (8 - r) chunks.
    positions = torch.arange(16)[None]
    held = [shard_sequence(positions, 4, rank)[0].tolist() for rank in range(4)]
    assert held == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert {sum(i + 1 for i in chunk_indices(4, rank)) for rank in range(4)} == {9}


def test_a_length_not_divisible_by_two_cp_is_refused():
    with pytest.raises(ValueError, match=r"2 \* cp = 4 equal chunks, but its length is 10"):
        shard_sequence(torch.zeros(1, 10), 2, 0)


class _Mesh:
    """What shard_batch asks of a 1-D cp mesh."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def get_local_rank(self):
        return self._rank


@pytest.mark.parametrize("document_mask", [True, False])
def test_shard_batch_cuts_every_tensor_alike_with_global_positions(document_mask):
    tokens = torch.arange(2 * 8).view(2, 8)
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    batch = Batch(tokens=tokens, labels=tokens + 100, document_ids=document_ids, positions=positions)
    got = shard_batch(batch, _Mesh(2, 1), document_mask=document_mask)
    held = [2, 3, 4, 5]  # rank 1 of 2: chunks 1 and 2 of 4
    assert torch.equal(got.tokens, tokens[:, held]) and torch.equal(got.labels, tokens[:, held] + 100)
    assert torch.equal(got.document_ids, document_ids[:, held])
    # Restarting at each document with document masking; else the global positions 0 .. S-1.
    expected = positions[:, held] if document_mask else torch.tensor([held] * 2)
    assert torch.equal(got.positions, expected)


def _layout(world_size: int, seq_len: int = 64, **settings) -> None:
    config = Config(parallelism=Parallelism(**settings), training=Training(seq_len=seq_len))
    config.source = "recipes/x.toml"
    validate(config)
    check_layout(ParallelDims.resolve(config.parallelism, world_size), config, get_model_args("debug"))


def test_good_cp_layouts_are_accepted():
    _layout(2, cp=2, dp_shard=1)
    _layout(8, cp=2, tp=2, dp_shard=2)
    _layout(8, cp=4, dp_replicate=2, dp_shard=1, seq_len=8)


@pytest.mark.parametrize("world_size, settings, message", [
    (2, dict(cp=2, seq_len=66), r"parallelism.cp = 2 is invalid with training.seq_len = 66: context parallelism "
                                r"cuts each sequence into 2 \* cp = 4 equal chunks.*valid cp: \[1, 3, 11, 33\]"),
    (4, dict(cp=2, tp=2, seq_len=36), r"parallelism.cp = 2 with parallelism.tp = 2 is invalid with "
                                      r"training.seq_len = 36.*2 \* cp \* tp = 8.*valid cp with tp = 2: \[1, 3, 9\]"),
    (2, dict(cp=2, cp_rotate="ring_attention"), r"parallelism.cp_rotate = 'ring_attention' is invalid; valid "
                                                r"choices: 'allgather', 'ring'"),
])
def test_bad_cp_layouts_name_the_key_and_the_valid_choices(world_size, settings, message):
    with pytest.raises(ConfigError, match=message):
        _layout(world_size, **settings)


def test_apply_cp_names_the_valid_rotate_methods():
    with pytest.raises(ValueError, match=r"parallelism.cp_rotate = 'pass_q'.*valid choices: \('allgather', 'ring'\)"):
        apply_cp(torch.nn.Module(), None, rotate="pass_q")


def test_merging_partial_attention_over_disjoint_keys_is_attention_over_all():
    # What the ring does: attention to the keys in pieces, merged by the log-sum-exp rule. Row 0 of
    # the queries sees no key at all (out 0, lse -inf, no NaN); row 1 sees keys of the second piece only.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    visible = torch.rand(2, 4, 6, 12, generator=g) < 0.6
    visible[:, :, 0] = False
    visible[:, :, 1, :5] = False
    visible[:, :, 1, 7] = True
    expected_out, expected_lse = reference_attention(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), causal=False,
                                                     mask=visible)
    pieces = [reference_attention(q, k[:, :, keys], v[:, :, keys], causal=False, mask=visible[..., cut])
              for keys, cut in ((slice(0, 5), slice(0, 5)), (slice(5, 6), slice(5, 6)), (slice(0, 6), slice(6, 12)))]
    out, lse = pieces[0]
    for piece in pieces[1:]:
        out, lse = merge_attention(out, lse, *piece)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and bool((lse[:, :, 0] == float("-inf")).all())
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_a_block_backward_through_autograd_gives_the_gradients_of_attention_over_all_keys():
    """The block backward the ring uses for a backend without one of its own (flex, on GPUs): each block's
    forward recomputed and differentiated with the merge's weights, summed over blocks, is the gradient of
    attention over all keys, the log-sum-exp's included. Checked here with the differentiable reference
    forward (FlexAttention has no CPU backward): grouped-query heads, documents that leave rows without a key
    in some blocks and one query row without any key."""
    from torchtrain.models.attention import _autograd_block_backward, _reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    q_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 9]] * 2)  # document 9 has no key
    kv_ids = torch.tensor([[0] * 4 + [1] * 6 + [2] * 6] * 2)
    dout = torch.randn(2, 4, 8, 16, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    out, lse = reference_attention(q, k, v, causal=False, document_ids=q_ids, kv_document_ids=kv_ids)
    seen = torch.isfinite(lse)
    loss = (out * dout).sum() + torch.where(seen, lse * dlse, 0.0).sum()
    expected = torch.autograd.grad(loss, (q, k, v))

    block_backward = _autograd_block_backward(_reference)
    dq, dks, dvs = torch.zeros_like(q), [], []
    for keys in (slice(0, 3), slice(3, 9), slice(9, 16)):  # blocks cut across documents
        dq_b, dk_b, dv_b = block_backward(dout, torch.where(seen, dlse, 0.0), q, k[:, :, keys], v[:, :, keys],
                                          out.detach(), lse.detach(), q_ids, kv_ids[:, keys], False, 0, None)
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    for got, want in zip((dq, torch.cat(dks, 2), torch.cat(dvs, 2)), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_ring_blocks_window_is_the_sequences_window():
    """Each (query chunk, earlier key chunk) block of the ring: its rows and shifted window, through the kernels'
    bottom-right-aligned mask, see exactly the keys the sequence's sliding window gives those queries."""
    from torchtrain.kernels.attention.reference import visibility_mask
    from torchtrain.parallel.cp import _block_window

    for chunk in (4, 8):
        for window in range(1, 5 * chunk):
            for q_chunk in range(1, 5):
                for k_chunk in range(q_chunk):
                    q_pos = q_chunk * chunk + torch.arange(chunk)[:, None]
                    k_pos = k_chunk * chunk + torch.arange(chunk)[None, :]
                    expected = (q_pos - k_pos) < window  # (all causal: the key chunk is earlier)
                    rows, block_window = _block_window(q_chunk, k_chunk, chunk, window)
                    got = torch.zeros(chunk, chunk, dtype=torch.bool)
                    if rows:
                        mask = visibility_mask(rows, chunk, causal=False, window=block_window)
                        got[:rows] = True if mask is None else mask
                    assert torch.equal(got, expected), (chunk, window, q_chunk, k_chunk)
                    assert rows == int(expected.any(1).sum()), "a block's rows are the queries that see a key"


CP2_CASES = ("causal", "docs", "mha_docs", "op_docs", "window_docs", "compile", "ring_causal", "ring_docs",
             "ring_compile", "ring_reference_docs", "ring_qk_norm_docs")
CP4_CASES = ("causal", "docs", "window_docs", "fsdp", "tp", "ring_causal", "ring_docs", "ring_window_docs",
             "ring_fsdp")  # cp 2 x (dp 2 | tp 2) and cp 4


@pytest.fixture(scope="module")
def cp2_run():
    return run_cases(2, WORKER, CP2_CASES)


@pytest.fixture(scope="module")
def cp4_run():
    return run_cases(4, WORKER, CP4_CASES)


@pytest.mark.parametrize("case", CP2_CASES)
def test_cp2_matches_one_process(cp2_run, case):
    passed, output = cp2_run
    assert case in passed, output


@pytest.mark.parametrize("case", CP4_CASES)
def test_cp4_and_cp2_with_fsdp_and_tp_match_one_process(cp4_run, case):
    passed, output = cp4_run
    assert case in passed, output
