"""The head mix every kernel is checked on, and ragged pools filled by the reference append."""

import torch

from headkv_engine import ops
from headkv_engine.profile import UNBOUNDED_WINDOW

# heads: full, sink 2 + window 3, window 1, pruned, sink 0 + window 5, sink 4 + window 100 (> sequence)
SINKS = [0, 2, 0, 0, 0, 4]
WINDOWS = [UNBOUNDED_WINDOW, 3, 1, 0, 5, 100]


def policy(device="cpu"):
    return (torch.tensor(SINKS, device=device), torch.tensor(WINDOWS, device=device))


def filled_cache(batch, head_dim, seen, dtype, seed=0, device="cpu"):
    """Pools holding what each head keeps after `seen[b]` tokens, written by the reference append:
    ([k_pool, v_pool, pos_pool], base, length)."""
    gen = torch.Generator().manual_seed(seed)
    sink, window = policy("cpu")
    seen_t = torch.tensor(seen)
    kept = torch.minimum(seen_t[:, None], (sink + window)[None, :])
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view_as(kept)
    rows = int(capacity.sum())
    pools = [torch.zeros(rows, head_dim, dtype=dtype), torch.zeros(rows, head_dim, dtype=dtype),
             torch.full((rows,), -1, dtype=torch.long)]
    longest = max(seen)
    positions = torch.stack([torch.cat([torch.full((longest - n,), -1), torch.arange(n)]) for n in seen])
    k = torch.randn(batch, len(SINKS), longest, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, len(SINKS), longest, head_dim, generator=gen).to(dtype)
    ops.append_reference(*pools, base, k, v, positions, sink, window)
    return [p.to(device) for p in pools], base.to(device), kept.to(device)


def decode_case(batch, head_dim, dtype, with_sink_query, device="cpu"):
    """One decode step over the pools after 150 / 9 tokens: (decode args, keyword arguments with sink_size, q_sink
    (or None) and fill, fill)."""
    (k_pool, v_pool, _), base, length = filled_cache(batch, head_dim, seen=[150, 9], dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, len(SINKS), head_dim, generator=gen).to(dtype).to(device)
    q_sink = torch.randn_like(q) if with_sink_query else None
    sink, _ = policy(device)
    fill = torch.randn(len(SINKS), head_dim, generator=gen).to(device)
    kwargs = dict(scale=head_dim**-0.5, sink_size=sink, q_sink=q_sink, fill=fill)
    return (q, k_pool, v_pool, base, length), kwargs, fill


def prefill_case(batch, head_dim, tokens, cached, dtype, device="cpu"):
    """A block of `tokens` new tokens per sequence, the second left-padded by 6, over an empty cache or one that
    holds 20 / 13 earlier tokens: (prefill args, q_sink, fill)."""
    seen = [20, 13] if cached else [0, 0]
    if cached:
        (k_pool, v_pool, pos_pool), base, length = filled_cache(batch, head_dim, seen=seen, dtype=dtype, device=device)
    else:
        k_pool = v_pool = torch.zeros(0, head_dim, dtype=dtype, device=device)
        pos_pool = torch.zeros(0, dtype=torch.long, device=device)
        base = length = torch.zeros(batch, len(SINKS), dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(2)
    q, k, v, q_sink = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(dtype).to(device)
                       for _ in range(4))
    pad = 6
    positions = torch.stack([
        torch.arange(seen[0], seen[0] + tokens),
        torch.cat([torch.full((pad,), -1), torch.arange(seen[1], seen[1] + tokens - pad)]),
    ]).to(device)
    sink, window = policy(device)
    fill = torch.randn(len(SINKS), head_dim, generator=gen).to(device)
    return (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink, window), q_sink, fill


def check_head_statistics(backend, device, dtype, q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio):
    """head_statistics of `backend` on `device` against the fp64 reference (computed on the CPU: MPS has no fp64)
    for 3 heads, one of them with heavy first keys."""
    gen = torch.Generator().manual_seed(tokens_q)
    heads = 3
    q = (torch.randn(heads, tokens_q, head_dim, generator=gen) * 2).to(dtype)
    k = (torch.randn(heads, q_start + tokens_q, head_dim, generator=gen) * 2).to(dtype)
    k[1, :2] *= 4
    kwargs = dict(scale=head_dim**-0.5, sink_size=sink_size, local_window=local_window, recent_ratio=recent_ratio)
    want = ops.head_statistics(q.float(), k.float(), q_start, backend="torch", **kwargs)
    got = ops.head_statistics(q.to(device), k.to(device), q_start, backend=backend, **kwargs)
    got = {key: value.cpu() for key, value in got.items()}
    assert set(got) == set(want)
    assert torch.equal(got["count"], want["count"])
    for key in want:
        assert got[key].dtype == torch.float64 and got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], atol=2e-4 * max(1.0, float(want["count"][0])), rtol=1e-4,
                                   msg=key)
