"""Stub of the compiled CPU kernels (csrc/bindings.cpp). Call them through headkv_engine.ops, not directly.

Every tensor argument is a data address (`Tensor.data_ptr()`) of a contiguous CPU tensor, 0 for an absent
optional one; dtype codes: 0 fp32, 1 bf16, 2 fp16; index tensors are int64, `fill` is fp32. The GIL is
released while a kernel runs. Argument errors (dtype codes, sizes, rows outside the pools, positions that do
not increase) raise ValueError before anything is read or written.
"""

def cpu_isa() -> str:
    """'avx2' when the AVX2/FMA/F16C build of the kernels runs, else 'baseline' (HEADKV_CPU_BASELINE=1 forces it)."""

def decode_attention(
    q: int,
    q_sink: int,
    k_pool: int,
    v_pool: int,
    base: int,
    length: int,
    sink_size: int,
    fill: int,
    out: int,
    batch: int,
    heads: int,
    head_dim: int,
    pool_rows: int,
    q_dtype: int,
    kv_dtype: int,
    scale: float,
    pos_pool: int = 0,
    query_position: int = 0,
    stat_sink: int = 4,
    stat_local: int = 8,
    stats: int = 0,
) -> None:
    """out[B, H, D] (q_dtype) = softmax(scale * q . K) V over rows base .. base + length of each head.

    q, q_sink: [B, H, D]; k_pool, v_pool: [pool_rows, D] (kv_dtype); base, length: [B, H]; sink_size: [H]
    (needed with q_sink: rows with slot < sink_size are scored with q_sink); fill: [H, D], the output of heads
    with length 0 (zeros when absent). stats: fp32 [B, H, 3], each head's entropy, mass on positions < stat_sink
    and mass on positions > query_position[b] - stat_local (pos_pool: int64 [pool_rows]; query_position: [B]).
    """

def prefill_attention(
    q: int,
    q_sink: int,
    k: int,
    v: int,
    positions: int,
    k_pool: int,
    v_pool: int,
    pos_pool: int,
    base: int,
    length: int,
    sink_size: int,
    window_size: int,
    fill: int,
    out: int,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    pool_rows: int,
    q_dtype: int,
    kv_dtype: int,
    scale: float,
) -> None:
    """out[B, H, T, D] (q_dtype): the block's queries over the cached rows plus the block's own keys.

    q, q_sink, k, v: [B, H, T, D] (q_dtype); positions: [B, T], -1 padding at the start then strictly increasing;
    k_pool, v_pool: [pool_rows, D] (kv_dtype); pos_pool: [pool_rows]; base, length: [B, H];
    sink_size, window_size: [H]; fill: [H, D].
    """

def append(
    k_pool: int,
    v_pool: int,
    pos_pool: int,
    base: int,
    k: int,
    v: int,
    positions: int,
    sink_size: int,
    window_size: int,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    pool_rows: int,
    kv_dtype: int,
    new_dtype: int,
) -> None:
    """Writes k, v [B, H, T, D] (new_dtype) and their positions [B, T] into the pools, in place."""

def head_statistics_fields(log2_bins: int) -> int:
    """Doubles per head in head_statistics' output."""

def head_statistics(
    q: int,
    k: int,
    heads: int,
    tokens_q: int,
    tokens_k: int,
    head_dim: int,
    dtype: int,
    q_start: int,
    scale: float,
    sink_size: int,
    local_window: int,
    recent_ratio: float,
    min_query: int,
    log2_bins: int,
    sums: int,
    /,
) -> None:
    """Per-head attention statistic sums into sums [heads, head_statistics_fields(log2_bins)] (fp64)."""
