"""Triton append: scatter a block of new keys / values into the ragged layout, all heads in one launch.

Token p of head (b, h) goes to row base[b, h] + slot(p), slot(p) = p for p < S, S + (p - S) mod W otherwise,
if it is still visible from the block's last position. Semantics: headkv_engine/ops/append.py.
"""

import triton
import triton.language as tl


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, pos_ptr, kpool_ptr, vpool_ptr, ppool_ptr, base_ptr, sink_ptr, window_ptr,
    num_heads, tokens, num_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a block may hold more than 2**31 values
    t0 = tl.program_id(1) * BLOCK_T
    b = bh // num_heads
    h = bh % num_heads
    sink = tl.load(sink_ptr + h)
    window = tl.load(window_ptr + h)
    base = tl.load(base_ptr + bh)
    last = tl.load(pos_ptr + b * tokens + tokens - 1)  # positions increase: the last column is the latest
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    p = tl.load(pos_ptr + b * tokens + t, mask=t_ok, other=-1)
    keep = t_ok & (p >= 0) & ((p < sink) | (p > last - window))
    ring = sink + (p - sink) % tl.maximum(window, 1)
    row = base + tl.where(p < sink, p, ring)
    keep = keep & (row >= 0) & (row < num_rows)  # never write outside the pools, whatever base holds
    d = tl.arange(0, BLOCK_D)
    ok = keep[:, None] & (d < HEAD_DIM)[None, :]
    src = (bh * tokens + t)[:, None] * HEAD_DIM + d[None, :]
    dst = row[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + src, mask=ok, other=0.0)
    tl.store(kpool_ptr + dst, k.to(kpool_ptr.dtype.element_ty), mask=ok)
    v = tl.load(v_ptr + src, mask=ok, other=0.0)
    tl.store(vpool_ptr + dst, v.to(vpool_ptr.dtype.element_ty), mask=ok)
    tl.store(ppool_ptr + row, p, mask=keep)


def append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size, block_t=None):
    """Launch: k, v [B, H, T, D] contiguous, positions [B, T]; writes the pools in place."""
    batch, heads, tokens, head_dim = k.shape
    if tokens == 0:
        return
    block_t = block_t or min(64, triton.next_power_of_2(tokens))
    _append_kernel[(batch * heads, triton.cdiv(tokens, block_t))](
        k, v, positions, k_pool, v_pool, pos_pool, base, sink_size, window_size, heads, tokens, k_pool.shape[0],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=block_t,
    )
