"""Triton head statistics: per-head attention statistic sums of a block of queries, two passes over the keys.

One program per (head, query block). Pass 1 streams the causal key tiles once for every query's running max and
normaliser; pass 2 streams them again, turns scores into probabilities and adds each statistic as a masked sum
over the tile. No score matrix larger than one [BLOCK_Q, BLOCK_K] tile exists. Each program writes its partial
sums (fp32, over its <= BLOCK_Q queries) to its own row; the launcher adds the rows in fp64, so the result does
not depend on scheduling. Semantics and output layout: headkv_engine/ops/statistics.py.
"""

import triton
import triton.language as tl

RELATIVE_BINS = 64
SINK_SIZES = (1, 2, 4, 8, 16)
# Offsets of the fields in an output row: count, entropy, entropy_sq, max_prob, uniformity, 4 regions,
# 64 relative bins, 5 sink sizes, then the log2 bins (the layout of the CPU kernel).
REGIONS_AT = 5
RELATIVE_AT = REGIONS_AT + 4
SINKS_AT = RELATIVE_AT + RELATIVE_BINS
LOG2_AT = SINKS_AT + len(SINK_SIZES)


@triton.jit
def _scores(q, k_ptr, head_k, k0, tokens_k, scale, d, d_ok,
            HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    j = k0 + tl.arange(0, BLOCK_K)
    k = tl.load(k_ptr + head_k + j[:, None] * HEAD_DIM + d[None, :], mask=(j < tokens_k)[:, None] & d_ok[None, :],
                other=0.0)
    return j, tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale


@triton.jit
def _log2_bin(distance):
    """0 for distance 0, floor(log2(distance)) + 1 above: the exponent field of the exact fp32 value."""
    bits = distance.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.where(distance > 0, ((bits >> 23) & 0xFF) - 126, 0)


@triton.jit
def _head_statistics_kernel(
    q_ptr, k_ptr, recent_start_ptr, out_ptr,
    tokens_q, tokens_k, q_start, scale, sink_size, local_window, min_query, log2_bins, num_blocks, fields,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    LOG2_PAD: tl.constexpr, PRECISION: tl.constexpr, RELATIVE_BINS: tl.constexpr, REGIONS_AT: tl.constexpr,
    RELATIVE_AT: tl.constexpr, SINKS_AT: tl.constexpr, LOG2_AT: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)  # 64-bit offsets: long sequences of many heads pass 2**31 values
    blk = tl.program_id(1)
    i = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pos = q_start + i
    take = (i < tokens_q) & (pos >= min_query)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (h * tokens_q + i)[:, None] * HEAD_DIM + d[None, :],
                mask=(i < tokens_q)[:, None] & d_ok[None, :], other=0.0)
    head_k = h * tokens_k * HEAD_DIM
    last = tl.minimum(q_start + blk * BLOCK_Q + BLOCK_Q, tokens_k)  # keys past the block's last query are masked

    # Pass 1: every query's max score and normaliser.
    m = tl.full([BLOCK_Q], -1e30, tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    for k0 in range(0, last, BLOCK_K):
        j, s = _scores(q, k_ptr, head_k, k0, tokens_k, scale, d, d_ok, HEAD_DIM, BLOCK_K, PRECISION)
        s = tl.where(j[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    log_l = tl.log(tl.where(take, l, 1.0))

    # Pass 2: probabilities, and every statistic as a masked sum.
    recent_start = tl.load(recent_start_ptr + i, mask=i < tokens_q, other=0)
    entropy = tl.zeros([BLOCK_Q], tl.float32)
    sink_mass = tl.zeros([BLOCK_Q], tl.float32)
    local_mass = tl.zeros([BLOCK_Q], tl.float32)
    recent_mass = tl.zeros([BLOCK_Q], tl.float32)
    global_mass = tl.zeros([BLOCK_Q], tl.float32)
    rel_index = tl.arange(0, RELATIVE_BINS)
    relative = tl.zeros([RELATIVE_BINS], tl.float32)
    log2_index = tl.arange(0, LOG2_PAD)
    log2 = tl.zeros([LOG2_PAD], tl.float32)
    sink_index = tl.arange(0, 8)
    sinks = tl.zeros([8], tl.float32)
    for k0 in range(0, last, BLOCK_K):
        j, s = _scores(q, k_ptr, head_k, k0, tokens_k, scale, d, d_ok, HEAD_DIM, BLOCK_K, PRECISION)
        seen = take[:, None] & (j[None, :] <= pos[:, None])
        log_p = s - m[:, None] - log_l[:, None]
        p = tl.where(seen, tl.exp(log_p), 0.0)
        entropy -= tl.sum(tl.where(seen, p * log_p, 0.0), axis=1)
        distance = pos[:, None] - j[None, :]
        is_sink = j[None, :] < sink_size
        is_local = ~is_sink & (distance < local_window)
        is_recent = ~is_sink & ~is_local & (j[None, :] >= recent_start[:, None])
        sink_mass += tl.sum(tl.where(is_sink, p, 0.0), axis=1)
        local_mass += tl.sum(tl.where(is_local, p, 0.0), axis=1)
        recent_mass += tl.sum(tl.where(is_recent, p, 0.0), axis=1)
        global_mass += tl.sum(tl.where(~is_sink & ~is_local & ~is_recent, p, 0.0), axis=1)
        # Histograms: loop only over the bins this tile's seen distances fall in (one bin for far tiles).
        rel_bin = tl.minimum(tl.maximum(distance, 0), RELATIVE_BINS - 1)
        lo = tl.min(tl.where(seen, rel_bin, RELATIVE_BINS), axis=None)
        hi = tl.max(tl.where(seen, rel_bin, -1), axis=None)
        for b in range(lo, hi + 1):
            relative = tl.where(rel_index == b, relative + tl.sum(tl.where(rel_bin == b, p, 0.0), axis=None), relative)
        log_bin = tl.minimum(_log2_bin(tl.maximum(distance, 0)), log2_bins - 1)
        lo = tl.min(tl.where(seen, log_bin, LOG2_PAD), axis=None)
        hi = tl.max(tl.where(seen, log_bin, -1), axis=None)
        for b in range(lo, hi + 1):
            log2 = tl.where(log2_index == b, log2 + tl.sum(tl.where(log_bin == b, p, 0.0), axis=None), log2)
        if k0 < 16:
            for n in tl.static_range(5):
                part = tl.sum(tl.where(j[None, :] < (1 << n), p, 0.0), axis=None)
                sinks = tl.where(sink_index == n, sinks + part, sinks)

    row = out_ptr + (h * num_blocks + blk) * fields
    entropy = tl.where(take, entropy, 0.0)
    tl.store(row + 0, tl.sum(take.to(tl.float32), axis=0))
    tl.store(row + 1, tl.sum(entropy, axis=0))
    tl.store(row + 2, tl.sum(entropy * entropy, axis=0))
    tl.store(row + 3, tl.sum(tl.where(take, 1.0 / l, 0.0), axis=0))  # the largest probability is exp(m - m) / l
    uniformity = tl.log((pos + 1).to(tl.float32)) - entropy
    tl.store(row + 4, tl.sum(tl.where(take, uniformity, 0.0), axis=0))
    tl.store(row + REGIONS_AT + 0, tl.sum(sink_mass, axis=0))
    tl.store(row + REGIONS_AT + 1, tl.sum(local_mass, axis=0))
    tl.store(row + REGIONS_AT + 2, tl.sum(recent_mass, axis=0))
    tl.store(row + REGIONS_AT + 3, tl.sum(global_mass, axis=0))
    tl.store(row + RELATIVE_AT + rel_index, relative)
    tl.store(row + SINKS_AT + sink_index, sinks, mask=sink_index < 5)
    tl.store(row + LOG2_AT + log2_index, log2, mask=log2_index < log2_bins)


def head_statistics(q, k, recent_start, q_start, scale, sink_size, local_window, min_query, log2_bins,
                    block_q=None, block_k=None):
    """Launch: q [H, Tq, D], k [H, Tk, D] contiguous, recent_start int64 [Tq] (first key of each query's recent
    region). Returns the fp64 sums [H, LOG2_AT + log2_bins] in the layout above."""
    import torch  # noqa: PLC0415

    heads, tokens_q, head_dim = q.shape
    tokens_k = k.shape[1]
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # Triton's CPU interpreter computes tl.dot of bf16 tiles wrongly (numpy has no bf16): fp32 there only.
        q, k = q.float(), k.float()
    k = k if k.dtype == q.dtype else k.to(q.dtype)
    block_q = block_q or (64 if q.device.type == "cuda" else 16)
    block_k = block_k or (64 if q.device.type == "cuda" else 16)
    num_blocks = triton.cdiv(tokens_q, block_q)
    fields = LOG2_AT + log2_bins
    partial = torch.empty(heads, num_blocks, fields, device=q.device, dtype=torch.float32)
    _head_statistics_kernel[(heads, num_blocks)](
        q, k, recent_start, partial, tokens_q, tokens_k, q_start, scale, sink_size, local_window, min_query,
        log2_bins, num_blocks, fields,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_Q=block_q, BLOCK_K=block_k,
        LOG2_PAD=max(16, triton.next_power_of_2(log2_bins)),
        # fp32 inputs keep fp32 products (no TF32): the statistics are compared with an fp64 definition.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # the layout, as constexpr arguments (compiled kernels may not read module globals)
        RELATIVE_BINS=RELATIVE_BINS, REGIONS_AT=REGIONS_AT, RELATIVE_AT=RELATIVE_AT, SINKS_AT=SINKS_AT, LOG2_AT=LOG2_AT,
    )
    return partial.double().sum(1)
