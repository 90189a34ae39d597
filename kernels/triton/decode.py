"""Triton decode attention over the ragged per-head layout (flash-decoding with split-K).

Work items are (sequence x head, chunk): a long full head is split into chunks of CHUNK rows processed by
separate programs, a window head is one chunk, and a program whose chunk starts past its head's length
exits at once, so no program waits on a longer head. A second kernel merges the chunks of each head with
their log-sum-exp (or, `fused=True`, one launch: the last chunk of a head to finish merges, counted with an
atomic). With WITH_STATS the same pass also yields each head's attention entropy and its mass on the
first positions (sinks) and on the last ones (local): per chunk, sum e*(s - m) and the sums of e over those
rows (e = exp(s - m)), merged like the normaliser.
Semantics: headkv_engine/ops/decode.py (`decode_attention_reference`).
"""

import triton
import triton.language as tl

from headkv_engine.kernel_sources import triton_autotune_enabled


@triton.jit
def _chunk_pass(q_ptr, qs_ptr, k_ptr, v_ptr, sink_ptr, pos_ptr, qpos_ptr, bh, base, start, stop, scale, num_heads,
                stat_sink, stat_local, d, d_ok,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QSINK: tl.constexpr,
                WITH_STATS: tl.constexpr):
    """Online softmax over rows start..stop of head bh: (acc, m, l) and, with WITH_STATS, the sums of
    e * (s - m), of e over the sink rows and of e over the local rows (else zeros)."""
    q = tl.load(q_ptr + bh * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
    qs = q
    sink = 0
    if HAS_QSINK:
        qs = tl.load(qs_ptr + bh * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        sink = tl.load(sink_ptr + bh % num_heads)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t = 0.0  # sum of e * (s - m)
    sink_e = 0.0
    local_e = 0.0
    q_pos = 0
    if WITH_STATS:
        q_pos = tl.load(qpos_ptr + bh // num_heads)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        r_ok = rows < stop
        offs = (base + rows)[:, None] * HEAD_DIM + d[None, :]
        ok = r_ok[:, None] & d_ok[None, :]
        # both tiles are requested before either is used: a short head (or chunk) then waits for memory once
        k = tl.load(k_ptr + offs, mask=ok, other=0.0)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        if HAS_QSINK:
            s_sink = tl.sum(k.to(tl.float32) * qs[None, :], axis=1) * scale
            s = tl.where(rows < sink, s_sink, s)
        s = tl.where(r_ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        if WITH_STATS:
            pos = tl.load(pos_ptr + base + rows, mask=r_ok, other=-1)
            # e * (s - m_new) summed, the running part shifted from m to m_new first (l is its sum of e)
            t = alpha * (t + tl.where(l > 0, m - m_new, 0.0) * l) + tl.sum(p * tl.where(r_ok, s - m_new, 0.0), axis=0)
            sink_e = sink_e * alpha + tl.sum(tl.where(r_ok & (pos < stat_sink), p, 0.0), axis=0)
            local_e = local_e * alpha + tl.sum(tl.where(r_ok & (pos > q_pos - stat_local), p, 0.0), axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    return acc, m, l, t, sink_e, local_e


@triton.jit
def _merge_chunks(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, part_stats_ptr, stats_ptr, bh, num_chunks, live_chunks,
                  d, d_ok, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, WITH_STATS: tl.constexpr):
    """Head bh's output (and statistics) from its first `live_chunks` partials, by their log-sum-exp."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < live_chunks
    m = tl.load(part_m_ptr + bh * num_chunks + c, mask=c_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + bh * num_chunks + c, mask=c_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    # a chunk that read rows has l != 0 (NaN included: a NaN query can leave m at -inf, as maximum skips NaN)
    live = c_ok & (l != 0)
    w = tl.where(live, tl.exp(m - m_max), 0.0)
    o = tl.load(part_o_ptr + (bh * num_chunks + c)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None] & d_ok[None, :],
                other=0.0)
    total = tl.sum(l * w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / total
    tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WITH_STATS:
        stat = part_stats_ptr + (bh * num_chunks + c) * 3
        t = tl.load(stat + 0, mask=live, other=0.0)
        shift = tl.where(live, m - m_max, 0.0) * l  # each chunk's sum of e * (s - m) moved to the common max
        # entropy = -sum p log p with p = e / total and log p = (s - m_max) - log(total)
        entropy = tl.log(total) - tl.sum(w * (t + shift), axis=0) / total
        sink_mass = tl.sum(w * tl.load(stat + 1, mask=live, other=0.0), axis=0) / total
        local_mass = tl.sum(w * tl.load(stat + 2, mask=live, other=0.0), axis=0) / total
        tl.store(stats_ptr + bh * 3 + 0, entropy)
        tl.store(stats_ptr + bh * 3 + 1, sink_mass)
        tl.store(stats_ptr + bh * 3 + 2, local_mass)


@triton.jit
def _store_fill(fill_ptr, out_ptr, stats_ptr, bh, num_heads, d, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_FILL: tl.constexpr, WITH_STATS: tl.constexpr):
    """The output of a head that keeps nothing: its fill (never 0/0); statistics of attention over nothing: 0."""
    if HAS_FILL:
        fill = tl.load(fill_ptr + (bh % num_heads) * HEAD_DIM + d, mask=d_ok, other=0.0)
    else:
        fill = tl.zeros([BLOCK_D], dtype=tl.float32)
    tl.store(out_ptr + bh * HEAD_DIM + d, fill.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WITH_STATS:
        tl.store(stats_ptr + bh * 3 + tl.arange(0, 4), tl.zeros([4], tl.float32), mask=tl.arange(0, 4) < 3)


@triton.jit
def _decode_chunk_kernel(
    q_ptr, qs_ptr, k_ptr, v_ptr, base_ptr, len_ptr, sink_ptr,
    part_o_ptr, part_m_ptr, part_l_ptr,
    pos_ptr, qpos_ptr, part_stats_ptr, stat_sink, stat_local,
    scale, num_heads, num_chunks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_QSINK: tl.constexpr, WITH_STATS: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    length = tl.load(len_ptr + bh)
    start = chunk * CHUNK
    part = bh * num_chunks + chunk
    if start >= length:
        tl.store(part_m_ptr + part, float("-inf"))
        tl.store(part_l_ptr + part, 0.0)
        return
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc, m, l, t, sink_e, local_e = _chunk_pass(
        q_ptr, qs_ptr, k_ptr, v_ptr, sink_ptr, pos_ptr, qpos_ptr, bh, tl.load(base_ptr + bh), start,
        tl.minimum(start + CHUNK, length), scale, num_heads, stat_sink, stat_local, d, d_ok,
        HEAD_DIM, BLOCK_D, BLOCK_N, HAS_QSINK, WITH_STATS)
    if WITH_STATS:
        tl.store(part_stats_ptr + part * 3 + 0, t)
        tl.store(part_stats_ptr + part * 3 + 1, sink_e)
        tl.store(part_stats_ptr + part * 3 + 2, local_e)
    tl.store(part_o_ptr + part * HEAD_DIM + d, acc, mask=d_ok)
    tl.store(part_m_ptr + part, m)
    tl.store(part_l_ptr + part, l)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, fill_ptr, out_ptr, part_stats_ptr, stats_ptr, num_heads, num_chunks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, HAS_FILL: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    bh = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    first_l = tl.load(part_l_ptr + bh * num_chunks)  # chunk 0 is empty only when the head keeps nothing
    if first_l == 0:
        _store_fill(fill_ptr, out_ptr, stats_ptr, bh, num_heads, d, d_ok, HEAD_DIM, BLOCK_D, HAS_FILL, WITH_STATS)
    else:
        _merge_chunks(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, part_stats_ptr, stats_ptr, bh, num_chunks,
                      num_chunks, d, d_ok, HEAD_DIM, BLOCK_C, WITH_STATS)


@triton.jit
def _decode_fused_kernel(
    q_ptr, qs_ptr, k_ptr, v_ptr, base_ptr, len_ptr, sink_ptr, fill_ptr, out_ptr,
    part_o_ptr, part_m_ptr, part_l_ptr, arrived_ptr,
    pos_ptr, qpos_ptr, part_stats_ptr, stats_ptr, stat_sink, stat_local,
    scale, num_heads, num_chunks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_QSINK: tl.constexpr, HAS_FILL: tl.constexpr, WITH_STATS: tl.constexpr,
):
    """One launch: a head of one chunk writes its output (and statistics) at once; the chunks of a longer head
    write partials, count themselves in arrived[bh], and the last to arrive merges them."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    length = tl.load(len_ptr + bh)
    # chunks launched for this head: a max_length below the real length truncates the head (as the two-pass
    # launch does) rather than waiting for chunks that never run, which would leave the counter set
    head_chunks = tl.minimum(tl.cdiv(length, CHUNK), num_chunks)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if length == 0:
        if chunk == 0:
            _store_fill(fill_ptr, out_ptr, stats_ptr, bh, num_heads, d, d_ok, HEAD_DIM, BLOCK_D, HAS_FILL, WITH_STATS)
    elif chunk < head_chunks:
        start = chunk * CHUNK
        acc, m, l, t, sink_e, local_e = _chunk_pass(
            q_ptr, qs_ptr, k_ptr, v_ptr, sink_ptr, pos_ptr, qpos_ptr, bh, tl.load(base_ptr + bh), start,
            tl.minimum(start + CHUNK, length), scale, num_heads, stat_sink, stat_local, d, d_ok,
            HEAD_DIM, BLOCK_D, BLOCK_N, HAS_QSINK, WITH_STATS)
        if head_chunks == 1:
            tl.store(out_ptr + bh * HEAD_DIM + d, (acc / l).to(out_ptr.dtype.element_ty), mask=d_ok)
            if WITH_STATS:  # -sum p log p with p = e / l and log p = (s - m) - log l
                tl.store(stats_ptr + bh * 3 + 0, tl.log(l) - t / l)
                tl.store(stats_ptr + bh * 3 + 1, sink_e / l)
                tl.store(stats_ptr + bh * 3 + 2, local_e / l)
        else:
            part = bh * num_chunks + chunk
            tl.store(part_o_ptr + part * HEAD_DIM + d, acc, mask=d_ok)
            tl.store(part_m_ptr + part, m)
            tl.store(part_l_ptr + part, l)
            if WITH_STATS:
                tl.store(part_stats_ptr + part * 3 + 0, t)
                tl.store(part_stats_ptr + part * 3 + 1, sink_e)
                tl.store(part_stats_ptr + part * 3 + 2, local_e)
            # The partials are stored by all the program's threads, the counter by one: the barrier makes every
            # thread's stores precede the release (older Triton versions insert none themselves), so with acq_rel the
            # program that arrives last sees every chunk's partials.
            tl.debug_barrier()
            if tl.atomic_add(arrived_ptr + bh, 1, sem="acq_rel") == head_chunks - 1:
                _merge_chunks(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, part_stats_ptr, stats_ptr, bh, num_chunks,
                              head_chunks, d, d_ok, HEAD_DIM, BLOCK_C, WITH_STATS)
                # every chunk of this head has counted itself: zero the counter for the next launch, so that no
                # memset launch precedes this kernel
                tl.store(arrived_ptr + bh, 0)


def decode_attention(q, k_pool, v_pool, base, length, scale, sink_size=None, q_sink=None, fill=None,
                     max_length=None, chunk=None, block_n=None, num_warps=None, stats=None, fused=False, autotune=None,
                     counters=None):
    """Launch: q [B, H, D] contiguous, pools [N, D], base/length int64 [B, H]; returns [B, H, D].

    max_length (an upper bound of `length` known on the host) avoids a device synchronisation. stats:
    None, or (pos_pool [N], query_position [B], sink_tokens, local_window); then returns (out, [B, H, 3] fp32
    entropy / sink mass / local mass). fused: one launch (the last chunk of a head merges) instead of a chunk
    pass and a merge pass. autotune: pick the tile rows and warps by timing (default: on CUDA,
    unless block_n or num_warps is given); else block_n (64) and num_warps (Triton's default) as given.
    counters (fused only): zeroed int32 [>= B * H] arrival counters that the launch leaves zero, for a caller that
    captures the launch in a CUDA graph and wants no memset in it; default: `arrival_counters`.
    """
    import torch  # noqa: PLC0415

    batch, heads, head_dim = q.shape
    block_d = triton.next_power_of_2(head_dim)
    if autotune is None:
        autotune = q.device.type == "cuda" and block_n is None and num_warps is None and triton_autotune_enabled()
    if autotune and (block_n is not None or num_warps is not None):
        raise ValueError("autotune=True picks block_n and num_warps itself: pass neither")
    # launch parameters: chosen by the tuner, or fixed here
    tiling = {} if autotune else {"BLOCK_N": block_n or 64, **({"num_warps": num_warps} if num_warps else {})}
    max_len = max_length if max_length is not None else (int(length.max()) if length.numel() else 0)
    if chunk is None:
        # Split the rows of all heads (the pool size, known on the host) into about 8 chunks per SM, so that
        # long heads spread over the whole GPU; window heads stay one chunk.
        programs = 8 * _multiprocessors(q.device)
        chunk = triton.next_power_of_2(max(1, triton.cdiv(k_pool.shape[0], programs)))
        chunk = max(MIN_CHUNK if autotune else tiling["BLOCK_N"], min(chunk, 4096))
    num_chunks = max(1, triton.cdiv(max_len, chunk))
    rows = batch * heads
    part_o = torch.empty(rows, num_chunks, head_dim, device=q.device, dtype=torch.float32)
    part_m = torch.empty(rows, num_chunks, device=q.device, dtype=torch.float32)
    part_l = torch.empty(rows, num_chunks, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    has_qsink = q_sink is not None
    with_stats = stats is not None
    if with_stats:
        pos_pool, query_position, stat_sink, stat_local = stats
        part_stats = torch.empty(rows, num_chunks, 3, device=q.device, dtype=torch.float32)
        stats_out = torch.empty(batch, heads, 3, device=q.device, dtype=torch.float32)
    else:
        pos_pool, query_position, stat_sink, stat_local, part_stats, stats_out = base, base, 0, 1, part_m, part_m
    if fused:
        if counters is not None and (counters.dtype != torch.int32 or counters.numel() < rows
                                     or counters.device != q.device):
            raise ValueError(f"counters: expected zeroed int32 [>= {rows}] on {q.device}, got {counters.dtype} "
                             f"[{counters.numel()}] on {counters.device}")
        kernel = _decode_fused_kernel_tuned if autotune else _decode_fused_kernel
        kernel[(rows, num_chunks)](
            q, q_sink if has_qsink else q, k_pool, v_pool, base, length, sink_size if has_qsink else base,
            fill if fill is not None else q, out, part_o, part_m, part_l,
            counters if counters is not None else arrival_counters(q.device, rows),
            pos_pool, query_position, part_stats, stats_out, stat_sink, stat_local, scale, heads, num_chunks,
            HEAD_DIM=head_dim, BLOCK_D=block_d, CHUNK=chunk, BLOCK_C=triton.next_power_of_2(num_chunks),
            HAS_QSINK=has_qsink, HAS_FILL=fill is not None, WITH_STATS=with_stats, **tiling,
        )
        return (out, stats_out) if with_stats else out
    kernel = _decode_chunk_kernel_tuned if autotune else _decode_chunk_kernel
    kernel[(rows, num_chunks)](
        q, q_sink if has_qsink else q, k_pool, v_pool, base, length, sink_size if has_qsink else base,
        part_o, part_m, part_l, pos_pool, query_position, part_stats, stat_sink, stat_local, scale, heads, num_chunks,
        HEAD_DIM=head_dim, BLOCK_D=block_d, CHUNK=chunk, HAS_QSINK=has_qsink, WITH_STATS=with_stats, **tiling,
    )
    _decode_merge_kernel[(rows,)](
        part_o, part_m, part_l, fill if fill is not None else part_o, out, part_stats, stats_out, heads, num_chunks,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_C=triton.next_power_of_2(num_chunks), HAS_FILL=fill is not None,
        WITH_STATS=with_stats,
    )
    return (out, stats_out) if with_stats else out


# Tile rows and warps, autotuned on CUDA per (head size, chunk rows, variant, dtype): never per context length, so a
# two-pass decode loop tunes once per chunk size (a power of two that changes only as the pool doubles). Every tile
# fits in the smallest chunk the launcher picks (64 rows).
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((16, 1), (32, 2), (64, 2), (64, 4), (32, 4))
]
MIN_CHUNK = 64
_decode_chunk_kernel_tuned = triton.autotune(
    _DECODE_CONFIGS, key=["HEAD_DIM", "CHUNK", "HAS_QSINK", "WITH_STATS"])(_decode_chunk_kernel)
# The fused kernel leaves its counters zero after every run, so the tuner may run it repeatedly. Its key has the
# merge width (BLOCK_C): a tile picked for few chunks may not suit a merge of many. So, unlike the two-pass launch,
# it tunes again each time the context doubles the chunk count: a caller capturing it in a CUDA graph runs it
# eagerly at that width first (tuning cannot run under capture).
_decode_fused_kernel_tuned = triton.autotune(
    _DECODE_CONFIGS, key=["HEAD_DIM", "CHUNK", "BLOCK_C", "HAS_QSINK", "HAS_FILL", "WITH_STATS"])(_decode_fused_kernel)

_ARRIVAL_COUNTERS = {}


def arrival_counters(device, rows):
    """Zeroed int32 counters [>= rows] for the fused launch: eagerly, one buffer per (device, stream), kept between
    calls; under CUDA graph capture, a fresh buffer each call.

    The fused kernel leaves them zero (the merging program resets its head's counter), so an eager decode step is
    one launch, with no memset before it. Launches on one stream are ordered, so they may share the buffer; another
    stream gets its own. A captured graph must own its counters (a cached buffer may be replaced, freed and reused
    while the graph still writes it, and graphs replayed on other streams would share it): there the zeroing is
    part of the graph, unless the caller passes its own buffer (`decode_attention(..., counters=)`).
    """
    import torch  # noqa: PLC0415

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(rows, device=device, dtype=torch.int32)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < rows:
        counters = torch.zeros(triton.next_power_of_2(rows), device=device, dtype=torch.int32)
        _ARRIVAL_COUNTERS[key] = counters
    return counters


def _multiprocessors(device) -> int:
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4

