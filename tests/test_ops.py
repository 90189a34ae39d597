"""The compiled CPU kernels against the PyTorch references, on random shapes and the edge cases.

Heads of every kind in each call: full, sink 2 + window 3, window 1, pruned, sink 0 + window 5, and a window
longer than the sequence; odd head_dim, batch 1 and 3, left padding, a filled cache before a new block, the
sink query of shifted mode, fp32 / bf16 / fp16.
"""

import pytest
import torch

from headkv_engine import ops
from headkv_engine.profile import UNBOUNDED_WINDOW

SINKS = torch.tensor([0, 2, 0, 0, 0, 4])
WINDOWS = torch.tensor([UNBOUNDED_WINDOW, 3, 1, 0, 5, 100])
HEADS = len(SINKS)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def filled_cache(seen, head_dim, dtype, gen):
    """Pools holding what each head keeps after `seen[b]` tokens (left-padded), written by the reference."""
    seen_t = torch.tensor(seen)
    kept = torch.minimum(seen_t[:, None], (SINKS + WINDOWS)[None, :])
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view_as(kept)
    rows = int(capacity.sum())
    pools = [torch.zeros(rows, head_dim, dtype=dtype), torch.zeros(rows, head_dim, dtype=dtype),
             torch.full((rows,), -1, dtype=torch.long)]
    longest = max(seen)
    if longest:
        positions = torch.stack([torch.cat([torch.full((longest - n,), -1), torch.arange(n)]) for n in seen])
        k, v = (torch.randn(len(seen), HEADS, longest, head_dim, generator=gen).to(dtype) for _ in range(2))
        ops.append_reference(*pools, base, k, v, positions, SINKS, WINDOWS)
    return pools, base, kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,head_dim,seen", [(1, 24, [1500]), (3, 33, [40, 7, 1]), (2, 80, [0, 12])])
@pytest.mark.parametrize("with_sink_query", [False, True])
def test_decode_matches_reference(dtype, batch, head_dim, seen, with_sink_query):
    gen = torch.Generator().manual_seed(batch * 100 + head_dim)
    (k_pool, v_pool, _), base, length = filled_cache(seen, head_dim, dtype, gen)
    q = torch.randn(batch, HEADS, head_dim, generator=gen).to(dtype)
    fill = torch.randn(HEADS, head_dim, generator=gen)
    kwargs = dict(scale=head_dim**-0.5, sink_size=SINKS, q_sink=torch.randn_like(q) if with_sink_query else None,
                  fill=fill)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, backend="cpu", **kwargs)
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, **kwargs)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    empty = length == 0  # pruned heads (and sequences with nothing yet) output the fill
    torch.testing.assert_close(got[empty].float(), fill.expand(batch, -1, -1)[empty].to(dtype).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,head_dim,tokens,seen,pad", [
    (1, 16, 70, [0], [0]),          # a prompt from scratch, several query blocks
    (2, 33, 37, [20, 13], [0, 6]),  # a cached prefix, then a left-padded block
    (3, 24, 5, [3, 0, 9], [0, 2, 0]),
])
@pytest.mark.parametrize("with_sink_query", [False, True])
def test_prefill_matches_reference(dtype, batch, head_dim, tokens, seen, pad, with_sink_query):
    gen = torch.Generator().manual_seed(tokens * 10 + head_dim)
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, dtype, gen)
    q, k, v, q_sink = (torch.randn(batch, HEADS, tokens, head_dim, generator=gen).to(dtype) for _ in range(4))
    positions = torch.stack([
        torch.cat([torch.full((p,), -1), torch.arange(n, n + tokens - p)]) for n, p in zip(seen, pad)
    ])
    fill = torch.randn(HEADS, head_dim, generator=gen)
    args = (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS)
    kwargs = dict(scale=head_dim**-0.5, q_sink=q_sink if with_sink_query else None, fill=fill)
    got = ops.prefill_attention(*args, backend="cpu", **kwargs)
    want = ops.prefill_attention_reference(*args, **kwargs)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("pool_dtype,new_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_append_matches_reference(pool_dtype, new_dtype):
    gen = torch.Generator().manual_seed(5)
    batch, head_dim, tokens = 2, 24, 29
    positions = torch.stack([torch.arange(tokens), torch.cat([torch.full((4,), -1), torch.arange(tokens - 4)])])
    seen = (positions >= 0).sum(1)
    kept = torch.minimum(seen[:, None], (SINKS + WINDOWS)[None, :])
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view_as(kept)
    rows = int(capacity.sum())
    k, v = (torch.randn(batch, HEADS, tokens, head_dim, generator=gen).to(new_dtype) for _ in range(2))

    def pools():
        return [torch.zeros(rows, head_dim, dtype=pool_dtype), torch.zeros(rows, head_dim, dtype=pool_dtype),
                torch.full((rows,), -1, dtype=torch.long)]

    want, got = pools(), pools()
    ops.append_reference(*want, base, k, v, positions, SINKS, WINDOWS)
    ops.append(*got, base, k, v, positions, SINKS, WINDOWS, backend="cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # conversions round to nearest even, like torch


def test_decode_after_append_equals_last_prefill_row():
    """The cache a prefill leaves holds exactly what the last position sees."""
    gen = torch.Generator().manual_seed(6)
    batch, head_dim, tokens = 2, 16, 23
    q, k, v = (torch.randn(batch, HEADS, tokens, head_dim, generator=gen) for _ in range(3))
    positions = torch.arange(tokens).expand(batch, tokens).contiguous()
    empty = torch.zeros(0, head_dim)
    none = torch.zeros(batch, HEADS, dtype=torch.long)
    prefill = ops.prefill_attention(q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long), none, none,
                                    SINKS, WINDOWS, scale=0.25, backend="cpu")
    kept = torch.minimum(torch.tensor(tokens), SINKS + WINDOWS).expand(batch, HEADS).contiguous()
    base = (torch.cumsum(kept.flatten(), 0) - kept.flatten()).view_as(kept)
    rows = int(kept.sum())
    k_pool, v_pool, pos_pool = torch.zeros(rows, head_dim), torch.zeros(rows, head_dim), torch.full((rows,), -1)
    ops.append(k_pool, v_pool, pos_pool, base, k, v, positions, SINKS, WINDOWS, backend="cpu")
    decode = ops.decode_attention(q[:, :, -1], k_pool, v_pool, base, kept, scale=0.25, backend="cpu")
    torch.testing.assert_close(decode, prefill[:, :, -1], atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    q = torch.randn(2, HEADS, 8)
    pool = torch.zeros(4, 8)
    index = torch.zeros(2, HEADS, dtype=torch.long)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        ops.decode_attention(q[0], pool, pool, index, index, scale=1.0, backend="cpu")
    with pytest.raises(TypeError, match="base must have dtype"):
        ops.decode_attention(q, pool, pool, index.int(), index, scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="k_pool rows must have head_dim=8"):
        ops.decode_attention(q, torch.zeros(4, 9), torch.zeros(4, 9), index, index, scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.decode_attention(q, pool, pool, index, index, scale=1.0, backend="gpu")
