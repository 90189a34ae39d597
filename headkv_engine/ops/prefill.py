"""prefill_attention: causal attention of a block of new queries under each head's sink / window mask.

A query at position t of head h sees the key at position j when

    0 <= j <= t  and  (j < sink_size[h]  or  j > t - window_size[h])

(full heads have an unbounded window, pruned heads sink 0 and window 0, so they see nothing and output
their fill). Keys come from two places: the rows already kept in the ragged cache for (b, h) (rows
`base .. base + length`, their positions in `pos_pool`) and the block's own keys (positions `positions`).
Padding tokens have position -1: they are never keys, and as queries they output the fill.
In `shifted` mode keys at positions < sink_size are scored with `q_sink` instead of `q`.
"""

from __future__ import annotations

import torch

from headkv_engine.backends import resolve_backend
from headkv_engine.kernel_sources import triton_launcher
from headkv_engine.ops import _cpu, _metal
from headkv_engine.ops._checks import (
    FLOAT_DTYPES,
    check_block_positions,
    check_fill,
    check_index,
    check_kernel_inputs,
    check_pools,
    check_rows_in_pools,
    check_tensor,
    gather_slots,
    rows_checked_here,
)


def visible(q_pos, k_pos, sink_size, window_size):
    """Mask of keys each query sees; q_pos [..., Tq, 1], k_pos [..., 1, Tk], sizes broadcastable."""
    causal = (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos)
    return causal & ((k_pos < sink_size) | (k_pos > q_pos - window_size))


def prefill_attention_reference(
    q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size,
    *, scale, q_sink=None, fill=None, query_block=256,
):
    """The definition in plain PyTorch (fp32 math, fp64 for fp64 inputs), a block of queries at a time."""
    math = torch.promote_types(q.dtype, torch.float32)
    batch, heads, _, _ = q.shape
    cached_k, cached_valid = gather_slots(k_pool, base, length)
    cached_v, _ = gather_slots(v_pool, base, length)
    cached_pos, _ = gather_slots(pos_pool, base, length)
    cached_pos = torch.where(cached_valid, cached_pos.long(), -1)
    # each source to the math dtype from its own dtype, as the kernels read it (pools may be wider than q)
    keys = torch.cat([cached_k.to(math), k.to(math)], dim=2)
    values = torch.cat([cached_v.to(math), v.to(math)], dim=2)
    key_pos = torch.cat([cached_pos, positions[:, None, :].expand(batch, heads, -1)], dim=2)  # [B, H, Tk]
    sinks = sink_size.view(1, heads, 1, 1)
    windows = window_size.view(1, heads, 1, 1)
    is_sink_key = (key_pos < sinks[..., 0]).unsqueeze(2)  # [B, H, 1, Tk]
    outs = []
    for start in range(0, q.shape[2], query_block):
        stop = start + query_block
        q_pos = positions[:, None, start:stop, None]
        mask = visible(q_pos, key_pos[:, :, None, :], sinks, windows)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].to(math), keys) * scale
        if q_sink is not None:
            sink_scores = torch.einsum("bhqd,bhkd->bhqk", q_sink[:, :, start:stop].to(math), keys) * scale
            scores = torch.where(is_sink_key, sink_scores, scores)
        # rows with no visible key are all -inf (softmax NaN): zeros, then the fill; a NaN input stays NaN
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, values)
        no_key = ~mask.any(-1, keepdim=True)
        fill_rows = torch.zeros_like(out) if fill is None else fill.to(math)[None, :, None, :].expand_as(out)
        outs.append(torch.where(no_key, fill_rows, out))
    return torch.cat(outs, dim=2).to(q.dtype)


def prefill_attention(
    q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size,
    *, scale, q_sink=None, fill=None, backend="auto",
):
    """Masked attention of q, k, v [B, H, T, D] (the new block) over cached rows plus the block itself.

    positions: int64 [B, T], the absolute position of each new token: per row -1 (left padding), then
    consecutive positions;
    pos_pool: int64 [N] positions of the cached rows; base, length: int64 [B, H];
    sink_size, window_size: int64 [H]. Returns [B, H, T, D] in q's dtype.
    """
    check_tensor("q", q, dim=4, dtypes=FLOAT_DTYPES)
    batch, heads, tokens, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dim=4, dtypes=(q.dtype,), device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    check_index("positions", positions, (batch, tokens), q.device)
    check_pools(k_pool, v_pool, head_dim, q.device)
    check_index("pos_pool", pos_pool, (k_pool.shape[0],), q.device)
    check_index("base", base, (batch, heads), q.device)
    check_index("length", length, (batch, heads), q.device)
    check_index("sink_size", sink_size, (heads,), q.device)
    check_index("window_size", window_size, (heads,), q.device)
    if q_sink is not None:
        check_tensor("q_sink", q_sink, dim=4, dtypes=(q.dtype,), device=q.device)
        if q_sink.shape != q.shape:
            raise ValueError(f"q_sink must have q's shape {tuple(q.shape)}, got {tuple(q_sink.shape)}")
    check_fill(fill, heads, head_dim, q.device)
    check_block_positions(positions)
    kind = resolve_backend(backend, q.device)
    check_kernel_inputs(kind, q, k, v, k_pool, v_pool, q_sink)
    if rows_checked_here(kind, q.device):
        check_rows_in_pools(base, length, k_pool.shape[0])
    if tokens == 0:
        return torch.empty_like(q)
    if kind == "torch":
        return prefill_attention_reference(
            q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size,
            scale=scale, q_sink=q_sink, fill=fill,
        )
    if kind == "triton":
        return triton_launcher("prefill", "prefill_attention")(
            q.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous(), k_pool.contiguous(),
            v_pool.contiguous(), pos_pool.contiguous(), base.contiguous(), length.contiguous(),
            sink_size.contiguous(), window_size.contiguous(), scale,
            q_sink=None if q_sink is None else q_sink.contiguous(),
            fill=None if fill is None else fill.float().contiguous(),
        )
    if kind == "metal":
        return _metal.prefill_attention(
            q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size, scale,
            q_sink=q_sink, fill=fill,
        )
    return _cpu.prefill_attention(
        q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size, scale,
        q_sink=q_sink, fill=fill,
    )
