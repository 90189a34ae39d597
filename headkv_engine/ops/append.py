"""append: write a block of new keys / values into the ragged per-head layout, in place.

Row layout of head (b, h) with sink S and window W (full heads: W unbounded; pruned: nothing kept):

    slot(p) = p                  for p < S         (sinks, pinned)
    slot(p) = S + (p - S) mod W  for p >= S        (the window, a ring written in place)

Of the block only the tokens still visible from its last position are written (a token the ring would
overwrite within the same block is skipped), so the slots written are distinct. The caller guarantees
capacity >= min(tokens seen, S + W).
"""

from __future__ import annotations

import torch

from headkv_engine.backends import resolve_backend
from headkv_engine.kernel_sources import triton_launcher
from headkv_engine.ops import _cpu, _metal
from headkv_engine.ops._checks import (
    FLOAT_DTYPES,
    check_block_positions,
    check_index,
    check_kernel_inputs,
    check_pools,
    check_tensor,
    rows_checked_here,
)


def slot_of(positions, sink_size, window_size):
    """Slot of each position in its head's rows; positions [..., T], sizes broadcastable."""
    ring = sink_size + torch.remainder(positions - sink_size, window_size.clamp(min=1))
    return torch.where(positions < sink_size, positions, ring)


def kept_after(positions, sink_size, window_size):
    """Which tokens of the block are still kept once the whole block is in: [B, H, T] bool."""
    last = positions.max(dim=-1, keepdim=True).values  # [B, 1]
    pos = positions[:, None, :]
    keep = (pos < sink_size[None, :, None]) | (pos > last[:, None, :] - window_size[None, :, None])
    return keep & (pos >= 0)


def check_rows_written(base, positions, sink_size, window_size, num_rows: int) -> None:
    """The rows the block is written to lie inside the pools (the C++ kernel checks this itself)."""
    keep = kept_after(positions, sink_size, window_size)
    rows = base[..., None] + slot_of(positions[:, None, :], sink_size[None, :, None], window_size[None, :, None])
    bad = keep & ((base[..., None] < 0) | (rows < 0) | (rows >= num_rows))  # a negative base is wrong even when
    # its slot brings the row back into the pools
    if bool(bad.any()):
        b, h, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"base: token {t} of (sequence {b}, head {h}) goes to row {int(rows[b, h, t])} from base "
            f"{int(base[b, h])}, outside the pools' {num_rows} rows (expected a base >= 0; the caller reserves "
            "min(tokens seen, S + W) rows per head)"
        )


def append_reference(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size):
    keep = kept_after(positions, sink_size, window_size)
    rows = base[..., None] + slot_of(positions[:, None, :], sink_size[None, :, None], window_size[None, :, None])
    rows = rows[keep]
    k_pool[rows] = k[keep].to(k_pool.dtype)
    v_pool[rows] = v[keep].to(v_pool.dtype)
    pos_pool[rows] = positions[:, None, :].expand_as(keep)[keep]


def append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size, *, backend="auto"):
    """Write k, v [B, H, T, D] at positions [B, T] into the pools (rows [N, D], pos_pool [N]).

    positions: per row -1 (left padding), then consecutive positions, as in `prefill_attention`.
    """
    check_tensor("k", k, dim=4, dtypes=FLOAT_DTYPES)
    batch, heads, tokens, head_dim = k.shape
    check_tensor("v", v, dim=4, dtypes=(k.dtype,), device=k.device)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_pools(k_pool, v_pool, head_dim, k.device)
    check_index("pos_pool", pos_pool, (k_pool.shape[0],), k.device)
    check_index("base", base, (batch, heads), k.device)
    check_index("positions", positions, (batch, tokens), k.device)
    check_index("sink_size", sink_size, (heads,), k.device)
    check_index("window_size", window_size, (heads,), k.device)
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool), ("pos_pool", pos_pool)):
        if not pool.is_contiguous():
            raise ValueError(f"{name} must be contiguous: append writes it in place")
    check_block_positions(positions)
    kind = resolve_backend(backend, k.device)
    check_kernel_inputs(kind, k, v, k_pool, v_pool)
    if tokens == 0:
        return
    if rows_checked_here(kind, k.device):
        check_rows_written(base, positions, sink_size, window_size, k_pool.shape[0])
    if kind == "torch":
        append_reference(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size)
        return
    if kind == "triton":
        triton_launcher("append", "append")(
            k_pool, v_pool, pos_pool, base.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous(),
            sink_size.contiguous(), window_size.contiguous(),
        )
        return
    if kind == "metal":
        _metal.append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size)
        return
    _cpu.append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size)
