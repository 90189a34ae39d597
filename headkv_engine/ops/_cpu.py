"""Calls into the compiled CPU kernels: tensors become data pointers, sizes and dtype codes.

The dispatchers in this package have checked shapes, dtypes and devices; here tensors are made contiguous
(copies only where they are not already) and the extension (which does not link libtorch) gets their
addresses, sizes and dtype codes. The kernels check what Python cannot see cheaply: that every row they read
or write lies inside the pools, and (prefill) that each row of `positions` is -1 padding followed by
strictly increasing positions; violations raise ValueError before anything is read or written.
"""

from __future__ import annotations

import torch

from headkv_engine.backends import load_cpu_extension

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _ext():
    ext, reason = load_cpu_extension()
    if ext is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: {reason}")
    return ext


@torch.compiler.disable  # raw data pointers: never traced, always run eagerly
def decode_attention(q, k_pool, v_pool, base, length, scale, sink_size=None, q_sink=None, fill=None, stats=None):
    """stats: None, or (pos_pool [N], query_position [B], stat_sink, stat_local); then returns (out, [B, H, 3])."""
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    base, length = base.contiguous(), length.contiguous()
    q_sink = None if q_sink is None else q_sink.contiguous()
    sink_size = None if sink_size is None else sink_size.contiguous()
    fill = None if fill is None else fill.float().contiguous()
    out = torch.empty_like(q)
    batch, heads, head_dim = q.shape
    pos_pool = query_position = stats_out = None
    stat_sink, stat_local = 4, 8
    if stats is not None:
        pos_pool, query_position, stat_sink, stat_local = stats
        pos_pool, query_position = pos_pool.contiguous(), query_position.contiguous()
        stats_out = torch.empty(batch, heads, 3, dtype=torch.float32)
    _ext().decode_attention(
        _ptr(q), _ptr(q_sink), _ptr(k_pool), _ptr(v_pool), _ptr(base), _ptr(length), _ptr(sink_size), _ptr(fill),
        _ptr(out), batch, heads, head_dim, k_pool.shape[0], DTYPE_CODES[q.dtype], DTYPE_CODES[k_pool.dtype],
        float(scale), _ptr(pos_pool), _ptr(query_position), int(stat_sink), int(stat_local), _ptr(stats_out),
    )
    return out if stats is None else (out, stats_out)


@torch.compiler.disable  # raw data pointers: never traced, always run eagerly
def prefill_attention(q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size, scale,
                      q_sink=None, fill=None):
    q, k, v, positions = q.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous()
    k_pool, v_pool, pos_pool = k_pool.contiguous(), v_pool.contiguous(), pos_pool.contiguous()
    base, length = base.contiguous(), length.contiguous()
    sink_size, window_size = sink_size.contiguous(), window_size.contiguous()
    q_sink = None if q_sink is None else q_sink.contiguous()
    fill = None if fill is None else fill.float().contiguous()
    out = torch.empty_like(q)
    batch, heads, tokens, head_dim = q.shape
    _ext().prefill_attention(
        _ptr(q), _ptr(q_sink), _ptr(k), _ptr(v), _ptr(positions), _ptr(k_pool), _ptr(v_pool), _ptr(pos_pool),
        _ptr(base), _ptr(length), _ptr(sink_size), _ptr(window_size), _ptr(fill), _ptr(out),
        batch, heads, tokens, head_dim, k_pool.shape[0], DTYPE_CODES[q.dtype], DTYPE_CODES[k_pool.dtype], float(scale),
    )
    return out


@torch.compiler.disable  # raw data pointers: never traced, always run eagerly
def append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size):
    """In place: the pools must already be contiguous (the dispatcher checks)."""
    k, v, positions = k.contiguous(), v.contiguous(), positions.contiguous()
    base, sink_size, window_size = base.contiguous(), sink_size.contiguous(), window_size.contiguous()
    batch, heads, tokens, head_dim = k.shape
    _ext().append(
        _ptr(k_pool), _ptr(v_pool), _ptr(pos_pool), _ptr(base), _ptr(k), _ptr(v), _ptr(positions), _ptr(sink_size),
        _ptr(window_size), batch, heads, tokens, head_dim, k_pool.shape[0], DTYPE_CODES[k_pool.dtype],
        DTYPE_CODES[k.dtype],
    )


@torch.compiler.disable  # raw data pointers: never traced, always run eagerly
def head_statistics(q, k, q_start, scale, sink_size, local_window, recent_ratio, min_query, bins):
    """Sums of ops.statistics for one sequence block: fp64 rows [H, fields] (layout: ops.statistics)."""
    # the kernel reads q and k in one dtype: the wider of the two (bf16 + fp16: fp32), never a rounding of k to q's
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dtype), k.to(dtype)
    q, k = q.contiguous(), k.contiguous()
    heads, tokens_q, head_dim = q.shape
    ext = _ext()
    buffer = torch.empty(heads, ext.head_statistics_fields(bins), dtype=torch.float64)
    ext.head_statistics(
        _ptr(q), _ptr(k), heads, tokens_q, k.shape[1], head_dim, DTYPE_CODES[q.dtype], q_start, float(scale),
        sink_size, local_window, float(recent_ratio), min_query, bins, _ptr(buffer),
    )
    return buffer
