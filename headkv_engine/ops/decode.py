"""decode_attention: one new query per (sequence, head) over that head's kept keys.

The kept keys of head (b, h) are the rows `base[b, h] .. base[b, h] + length[b, h]` of the ragged pools
(see `HeadKVCache`). Every row there was written, so every row is attended to; a head with no kept rows
(pruned) outputs its fill vector. In `shifted` position mode the sink rows (slots < sink_size[h]) are
scored with `q_sink`, the query rotated by the rank it takes relative to the sinks.

With `return_stats=True` the op also returns, per (sequence, head), three statistics of this step's attention,
computed in the same pass over the keys: its entropy -sum p log p (nats), its mass on the keys at positions
< `stat_sink` (the sink region of the analysis) and its mass on the keys at positions > query_position -
`stat_local` (the local region). A head with no kept rows gets zeros. The keys' positions come from `pos_pool`.
"""

from __future__ import annotations

import torch

from headkv_engine.backends import resolve_backend
from headkv_engine.kernel_sources import triton_launcher
from headkv_engine.ops import _cpu, _metal
from headkv_engine.ops._checks import (
    FLOAT_DTYPES,
    check_fill,
    check_index,
    check_kernel_inputs,
    check_pools,
    check_rows_in_pools,
    check_tensor,
    gather_slots,
    rows_checked_here,
)

STAT_FIELDS = ("entropy", "sink_mass", "local_mass")


def decode_attention_reference(q, k_pool, v_pool, base, length, *, scale, sink_size=None, q_sink=None, fill=None,
                               return_stats=False, pos_pool=None, query_position=None, stat_sink=4, stat_local=8):
    """The definition in plain PyTorch (fp32 math, fp64 for fp64 inputs)."""
    math = torch.promote_types(q.dtype, torch.float32)
    keys, valid = gather_slots(k_pool, base, length)  # [B, H, L, D]
    values, _ = gather_slots(v_pool, base, length)
    scores = torch.einsum("bhd,bhld->bhl", q.to(math), keys.to(math)) * scale
    if q_sink is not None:
        sink_scores = torch.einsum("bhd,bhld->bhl", q_sink.to(math), keys.to(math)) * scale
        is_sink = torch.arange(keys.shape[2], device=q.device) < sink_size[:, None]  # [H, L]
        scores = torch.where(is_sink, sink_scores, scores)
    scores = scores.masked_fill(~valid, float("-inf"))
    # rows with no key are all -inf (softmax NaN): zeros, then the fill; a NaN input stays NaN
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid, 0.0)
    out = torch.einsum("bhl,bhld->bhd", probs, values.to(math))
    empty = length == 0
    if empty.any():
        fill_rows = torch.zeros_like(out) if fill is None else fill.to(math).expand_as(out)
        out = torch.where(empty[..., None], fill_rows, out)
    if not return_stats:
        return out.to(q.dtype)
    positions, _ = gather_slots(pos_pool, base, length)
    log_p = torch.log_softmax(scores, dim=-1)
    entropy = -torch.where(valid, probs * log_p, torch.zeros_like(probs)).sum(-1)
    sink_mass = torch.where(valid & (positions < stat_sink), probs, 0).sum(-1)
    local_mass = torch.where(valid & (positions > query_position[:, None, None] - stat_local), probs, 0).sum(-1)
    return out.to(q.dtype), torch.stack([entropy, sink_mass, local_mass], dim=-1).float()  # fp32, as the kernels


def decode_attention(
    q, k_pool, v_pool, base, length, *, scale, sink_size=None, q_sink=None, fill=None, backend="auto", max_length=None,
    return_stats=False, pos_pool=None, query_position=None, stat_sink=4, stat_local=8,
):
    """Attention of q [B, H, D] over each head's kept rows of k_pool / v_pool [N, D]; returns [B, H, D].

    base, length: int64 [B, H]; sink_size: int64 [H] (needed with q_sink); q_sink: [B, H, D] or None;
    fill: [H, D] output of heads with no kept rows (zeros when None); max_length: an upper bound of `length`
    known on the host, which spares GPU backends a device synchronisation.
    return_stats: also return fp32 [B, H, 3] (STAT_FIELDS: entropy, sink mass, local mass); needs pos_pool
    (int64 [N], each row's position) and query_position (int64 [B]).
    """
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    batch, heads, head_dim = q.shape
    check_pools(k_pool, v_pool, head_dim, q.device)
    check_index("base", base, (batch, heads), q.device)
    check_index("length", length, (batch, heads), q.device)
    if q_sink is not None:
        check_tensor("q_sink", q_sink, dim=3, dtypes=(q.dtype,), device=q.device)
        if q_sink.shape != q.shape:
            raise ValueError(f"q_sink must have q's shape {tuple(q.shape)}, got {tuple(q_sink.shape)}")
        if sink_size is None:
            raise ValueError("sink_size [H] is required with q_sink")
        check_index("sink_size", sink_size, (heads,), q.device)
    check_fill(fill, heads, head_dim, q.device)
    kind = resolve_backend(backend, q.device)
    check_kernel_inputs(kind, q, k_pool, v_pool, q_sink)
    if rows_checked_here(kind, q.device):
        check_rows_in_pools(base, length, k_pool.shape[0])
    if max_length is not None and q.device.type == "cpu" and length.numel() and int(length.max()) > max_length:
        # (on a GPU the hint is trusted: reading the lengths is what it spares)
        raise ValueError(f"max_length: expected an upper bound of length, got {max_length} < {int(length.max())}")
    if return_stats:
        check_index("pos_pool", pos_pool, (k_pool.shape[0],), q.device)
        check_index("query_position", query_position, (batch,), q.device)
        if stat_sink < 0 or stat_local < 1:
            raise ValueError(f"stat_sink must be >= 0 and stat_local >= 1, got {stat_sink} and {stat_local}")
    if kind == "torch":
        return decode_attention_reference(
            q, k_pool, v_pool, base, length, scale=scale, sink_size=sink_size, q_sink=q_sink, fill=fill,
            return_stats=return_stats, pos_pool=pos_pool, query_position=query_position, stat_sink=stat_sink,
            stat_local=stat_local,
        )
    if kind == "triton":
        stats = (pos_pool.contiguous(), query_position.contiguous(), stat_sink, stat_local) if return_stats else None
        return triton_launcher("decode", "decode_attention")(
            q.contiguous(), k_pool.contiguous(), v_pool.contiguous(), base.contiguous(), length.contiguous(), scale,
            sink_size=None if sink_size is None else sink_size.contiguous(),
            q_sink=None if q_sink is None else q_sink.contiguous(),
            fill=None if fill is None else fill.float().contiguous(), max_length=max_length, stats=stats,
        )
    stats = (pos_pool, query_position, stat_sink, stat_local) if return_stats else None
    if kind == "metal":
        return _metal.decode_attention(q, k_pool, v_pool, base, length, scale, sink_size=sink_size, q_sink=q_sink,
                                       fill=fill, stats=stats, max_length=max_length)
    return _cpu.decode_attention(q, k_pool, v_pool, base, length, scale, sink_size=sink_size, q_sink=q_sink, fill=fill,
                                 stats=stats)
