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
