"""Triton prefill attention: a block of new queries under per-head sink / window masks (block-sparse).

One program per (sequence x head, query block). Keys come from the head's cached rows (positions in
`pos_pool`) and from the block itself. Of the block's keys only the tiles that meet the sink range or the
window of the query block are visited, so a windowed head costs O(T * (S + W)) instead of O(T^2).
Semantics: headkv_engine/ops/prefill.py (`prefill_attention_reference`).
"""

import triton
import triton.language as tl

from headkv_engine.kernel_sources import triton_autotune_enabled


@triton.jit
def _tile(acc, m, l, q, qs, k_tile_ptr, v_tile_ptr, kp, q_pos, sink, window, scale, ok_k, d_ok,
          HAS_QSINK: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.load(k_tile_ptr, mask=ok_k[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    if HAS_QSINK:
        s_sink = tl.dot(qs, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where((kp < sink)[None, :], s_sink, s)
    seen = ok_k[None, :] & (kp[None, :] >= 0) & (q_pos[:, None] >= 0) & (kp[None, :] <= q_pos[:, None])
    seen = seen & ((kp[None, :] < sink) | (kp[None, :] > q_pos[:, None] - window))
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at zero
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    v = tl.load(v_tile_ptr, mask=ok_k[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    l = l * alpha + tl.sum(p, axis=1)
    return acc, m_new, l


@triton.jit
def _prefill_kernel(
    q_ptr, qs_ptr, k_ptr, v_ptr, pos_ptr, kpool_ptr, vpool_ptr, ppool_ptr, base_ptr, len_ptr,
    sink_ptr, window_ptr, fill_ptr, out_ptr,
    scale, num_heads, tokens, tokens_class,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QSINK: tl.constexpr, HAS_FILL: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a block may hold more than 2**31 values
    m0 = tl.program_id(1) * BLOCK_M
    b = bh // num_heads
    h = bh % num_heads
    sink = tl.load(sink_ptr + h)
    window = tl.load(window_ptr + h)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows = m0 + tl.arange(0, BLOCK_M)
    r_ok = rows < tokens
    q_pos = tl.load(pos_ptr + b * tokens + rows, mask=r_ok, other=-1)
    seq = bh * tokens * HEAD_DIM
    q = tl.load(q_ptr + seq + rows[:, None] * HEAD_DIM + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    qs = q
    if HAS_QSINK:
        qs = tl.load(qs_ptr + seq + rows[:, None] * HEAD_DIM + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. the rows kept in the cache (at most S + W for windowed heads)
    base = tl.load(base_ptr + bh)
    length = tl.load(len_ptr + bh)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok_k = cols < length
        kp = tl.load(ppool_ptr + base + cols, mask=ok_k, other=-1)
        offs = (base + cols)[:, None] * HEAD_DIM + d[None, :]
        acc, m, l = _tile(acc, m, l, q, qs, kpool_ptr + offs, vpool_ptr + offs, kp, q_pos, sink, window, scale,
                          ok_k, d_ok, HAS_QSINK, PRECISION)

    # 2. the block's own keys: real columns map linearly to positions, column = position - offset
    last_pos = tl.load(pos_ptr + b * tokens + tokens - 1)
    offset = last_pos - (tokens - 1)
    hi = tl.minimum(m0 + BLOCK_M, tokens)
    win_lo = tl.maximum(m0 - window + 1, 0)
    win_lo = (win_lo // BLOCK_N) * BLOCK_N
    sink_hi = tl.minimum(tl.maximum(sink - offset, 0), win_lo)
    for n0 in range(0, sink_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok_k = cols < sink_hi
        kp = tl.load(pos_ptr + b * tokens + cols, mask=ok_k, other=-1)
        offs = seq + cols[:, None] * HEAD_DIM + d[None, :]
        acc, m, l = _tile(acc, m, l, q, qs, k_ptr + offs, v_ptr + offs, kp, q_pos, sink, window, scale,
                          ok_k, d_ok, HAS_QSINK, PRECISION)
    for n0 in range(win_lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok_k = cols < hi
        kp = tl.load(pos_ptr + b * tokens + cols, mask=ok_k, other=-1)
        offs = seq + cols[:, None] * HEAD_DIM + d[None, :]
        acc, m, l = _tile(acc, m, l, q, qs, k_ptr + offs, v_ptr + offs, kp, q_pos, sink, window, scale,
                          ok_k, d_ok, HAS_QSINK, PRECISION)

    # only a row with no visible key (l == 0) gets the fill; a NaN score leaves l NaN, and the output NaN
    out = acc / tl.where(l == 0, 1.0, l)[:, None]
    if HAS_FILL:
        fill = tl.load(fill_ptr + h * HEAD_DIM + d, mask=d_ok, other=0.0)
    else:
        fill = tl.zeros([BLOCK_D], tl.float32)
    out = tl.where((l == 0)[:, None], fill[None, :], out)
    tl.store(out_ptr + seq + rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


# Tiles autotuned on CUDA per (head size, power of two above the block's length, variant, dtype): prompts of
# nearby lengths share a tuning. The 16-key tiles serve launches whose heads keep few keys (sink + window <= 16):
# a window head visits a sink tile and one or two window tiles, so narrower tiles read less.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 4, 2), (64, 64, 8, 3),
                          (128, 32, 4, 2), (64, 16, 4, 2), (128, 16, 4, 2)]
]
_prefill_kernel_tuned = triton.autotune(
    PREFILL_CONFIGS, key=["HEAD_DIM", "tokens_class", "HAS_QSINK", "PRECISION"])(_prefill_kernel)


def prefill_attention(q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size, scale,
                      q_sink=None, fill=None, block_m=None, block_n=None, autotune=None):
    """Launch: q, k, v [B, H, T, D] contiguous; returns [B, H, T, D].

    autotune: pick the query / key tile sizes by timing (default: on CUDA, unless block_m or block_n is given);
    else block_m and block_n (64 each) as given.
    """
    import torch  # noqa: PLC0415

    batch, heads, tokens, head_dim = q.shape
    dtype = q.dtype
    block_d = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty_like(q)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes tl.dot of bf16 tiles wrongly (numpy has no bf16); there, and only
        # there, the tiles are fed as fp32. On CUDA the kernel always runs on the native dtype.
        q, k, v = q.float(), k.float(), v.float()
        q_sink = None if q_sink is None else q_sink.float()
        out = torch.empty_like(q)
    # Pools of another dtype than the block (never in the engine) would break tl.dot: cast them.
    k_pool = k_pool if k_pool.dtype == q.dtype else k_pool.to(q.dtype)
    v_pool = v_pool if v_pool.dtype == q.dtype else v_pool.to(q.dtype)
    args = (
        q, q_sink if q_sink is not None else q, k, v, positions, k_pool, v_pool, pos_pool, base, length,
        sink_size, window_size, fill if fill is not None else q, out, scale, heads, tokens,
        triton.next_power_of_2(tokens),
    )
    # fp32 inputs keep fp32 products (no TF32), so the fp32 tolerance of the references holds.
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_QSINK=q_sink is not None, HAS_FILL=fill is not None,
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if autotune is None:
        autotune = q.device.type == "cuda" and block_m is None and block_n is None and triton_autotune_enabled()
    if autotune and (block_m is not None or block_n is not None):
        raise ValueError("autotune=True picks block_m and block_n itself: pass neither")
    if autotune:
        grid = lambda meta: (batch * heads, triton.cdiv(tokens, meta["BLOCK_M"]))  # noqa: E731
        _prefill_kernel_tuned[grid](*args, **flags)
    else:
        _prefill_kernel[(batch * heads, triton.cdiv(tokens, block_m or 64))](
            *args, BLOCK_M=block_m or 64, BLOCK_N=block_n or 64, **flags)
    return out.to(dtype)

