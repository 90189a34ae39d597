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
