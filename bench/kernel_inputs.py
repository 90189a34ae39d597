"""Inputs shared by the GPU kernel benchmarks (bench/gpu_kernels.py on CUDA, bench/mps_kernels.py on Apple GPUs):
pythia-2.8b attention (32 heads of 80) under the seed's head mix."""

from __future__ import annotations

import torch

from headkv_engine.quickstart import seed_mix_profile

HEADS, HEAD_DIM = 32, 80


def ragged_cache(batch, context, dtype, device):
    """Pools holding what each head of the seed mix keeps after `context` tokens (random rows):
    (k_pool, v_pool, base, kept, sink, window)."""
    sink, window, _ = seed_mix_profile(1, HEADS, HEAD_DIM).layer_tensors(0, device=device)
    kept = torch.minimum(torch.tensor(context, device=device), sink + window).expand(batch, HEADS).contiguous()
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view(batch, HEADS)
    rows = int(capacity.sum())
    k_pool = torch.randn(rows, HEAD_DIM, dtype=dtype, device=device)
    v_pool = torch.randn(rows, HEAD_DIM, dtype=dtype, device=device)
    return k_pool, v_pool, base, kept, sink, window


def windowed_prefill(context, sink_size, window_size, dtype, device):
    """A `context`-token prompt of one sequence over an empty cache, every head sink S + window W:
    (prefill_attention's positional arguments, q, k, v)."""
    q, k, v = (torch.randn(1, HEADS, context, HEAD_DIM, dtype=dtype, device=device) for _ in range(3))
    positions = torch.arange(context, device=device)[None]
    empty = torch.zeros(0, HEAD_DIM, dtype=dtype, device=device)
    none = torch.zeros(1, HEADS, dtype=torch.long, device=device)
    sink = torch.full((HEADS,), sink_size, device=device)
    window = torch.full((HEADS,), window_size, device=device)
    args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long, device=device), none, none, sink, window)
    return args, q, k, v
