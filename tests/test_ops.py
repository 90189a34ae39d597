"""The compiled CPU kernels against the PyTorch references, on random shapes and the edge cases.

Heads of every kind in each call: full, sink 2 + window 3, window 1, pruned, sink 0 + window 5, and a window
longer than the sequence; a second mix with sinks longer than a kernel tile. Odd and common head_dim, batch 1
and 3, left padding, a filled cache before a new block, the sink query of shifted mode, fp32 / bf16 / fp16.
Each kernel test runs both builds of the kernels (AVX2 where the CPU has it, and the baseline ISA). These
tests need the extension: without it they fail (they never skip).
"""

import os

import pytest
import torch

from headkv_engine import ops
from headkv_engine.backends import load_cpu_extension
from headkv_engine.profile import UNBOUNDED_WINDOW

SINKS = torch.tensor([0, 2, 0, 0, 0, 4])
WINDOWS = torch.tensor([UNBOUNDED_WINDOW, 3, 1, 0, 5, 100])
# sinks and windows across tile boundaries (64 rows): sink 70 + window 5, full, sink 3 only, window 130
LONG_SINKS = torch.tensor([70, 0, 3, 0])
LONG_WINDOWS = torch.tensor([5, UNBOUNDED_WINDOW, 0, 130])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


def ext():
    module, reason = load_cpu_extension()
    assert module is not None, reason  # the cpu tests fail, never skip, without the extension
    return module


def layout(seen, sinks, windows):
    """Capacities min(tokens seen, S + W) per (sequence, head), packed: (base, kept, rows)."""
    kept = torch.minimum(torch.as_tensor(seen)[:, None], (sinks + windows)[None, :])
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view_as(kept)
    return base, kept, int(capacity.sum())


def left_padded(seen, pad, tokens):
    """Positions [B, tokens]: `pad[b]` padding slots, then positions seen[b], seen[b] + 1, ..."""
    return torch.stack([torch.cat([torch.full((p,), -1), torch.arange(n, n + tokens - p)]) for n, p in zip(seen, pad)])


def filled_cache(seen, head_dim, dtype, gen, sinks=SINKS, windows=WINDOWS):
    """Pools holding what each head keeps after `seen[b]` tokens (left-padded), written by the reference."""
    base, kept, rows = layout(seen, sinks, windows)
    pools = [torch.zeros(rows, head_dim, dtype=dtype), torch.zeros(rows, head_dim, dtype=dtype),
             torch.full((rows,), -1, dtype=torch.long)]
    longest = max(seen)
    if longest:
        positions = torch.stack([torch.cat([torch.full((longest - n,), -1), torch.arange(n)]) for n in seen])
        k, v = (torch.randn(len(seen), len(sinks), longest, head_dim, generator=gen).to(dtype) for _ in range(2))
        ops.append_reference(*pools, base, k, v, positions, sinks, windows)
    return pools, base, kept


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ---- decode_attention -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,head_dim,seen", [(1, 24, [1500]), (3, 33, [40, 7, 1]), (2, 80, [0, 12])])
@pytest.mark.parametrize("with_sink_query", [False, True])
def test_decode_matches_reference(isa, dtype, batch, head_dim, seen, with_sink_query):
    gen = torch.Generator().manual_seed(batch * 100 + head_dim)
    (k_pool, v_pool, _), base, length = filled_cache(seen, head_dim, dtype, gen)
    q = torch.randn(batch, len(SINKS), head_dim, generator=gen).to(dtype)
    fill = torch.randn(len(SINKS), head_dim, generator=gen)
    kwargs = dict(scale=head_dim**-0.5, sink_size=SINKS, q_sink=torch.randn_like(q) if with_sink_query else None,
                  fill=fill)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, backend="cpu", **kwargs)
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, **kwargs)
    assert_close(got, want, dtype)
    empty = length == 0  # pruned heads (and sequences with nothing yet) output the fill
    torch.testing.assert_close(got[empty].float(), fill.expand(batch, -1, -1)[empty].to(dtype).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])  # the head sizes compiled with a known trip count
def test_decode_long_sinks_and_common_head_dims(isa, dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    seen = [1100, 200]
    (k_pool, v_pool, _), base, length = filled_cache(seen, head_dim, dtype, gen, LONG_SINKS, LONG_WINDOWS)
    q, q_sink = (torch.randn(2, len(LONG_SINKS), head_dim, generator=gen).to(dtype) for _ in range(2))
    kwargs = dict(scale=head_dim**-0.5, sink_size=LONG_SINKS, q_sink=q_sink)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, backend="cpu", **kwargs)
    assert_close(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, **kwargs), dtype)


def test_decode_pruned_heads_without_fill_are_zero(isa):
    gen = torch.Generator().manual_seed(1)
    (k_pool, v_pool, _), base, length = filled_cache([9, 0], 24, torch.float32, gen)
    q = torch.randn(2, len(SINKS), 24, generator=gen)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.2, backend="cpu")
    assert_close(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.2), torch.float32)
    assert torch.equal(got[length == 0], torch.zeros_like(got[length == 0]))
    assert got.isfinite().all()


@pytest.mark.parametrize("q_dtype,pool_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_decode_query_and_pool_dtypes_may_differ(isa, q_dtype, pool_dtype):
    gen = torch.Generator().manual_seed(2)
    (k_pool, v_pool, _), base, length = filled_cache([70, 3], 40, pool_dtype, gen)
    q = torch.randn(2, len(SINKS), 40, generator=gen).to(q_dtype)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.15, backend="cpu")
    assert_close(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.15), torch.bfloat16)


def test_decode_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    (k_pool, v_pool, _), base, length = filled_cache([30, 5], 16, torch.float32, gen)
    q = torch.randn(16, len(SINKS), 2, generator=gen).permute(2, 1, 0)  # [B, H, D] view, not contiguous
    base_t, length_t = base.t().contiguous().t(), length.t().contiguous().t()
    got = ops.decode_attention(q, k_pool, v_pool, base_t, length_t, scale=0.25, backend="cpu")
    assert_close(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.25), torch.float32)


def test_torch_backend_is_the_reference():
    gen = torch.Generator().manual_seed(4)
    (k_pool, v_pool, pos_pool), base, length = filled_cache([20, 9], 24, torch.float32, gen)
    q = torch.randn(2, len(SINKS), 24, generator=gen)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.2, backend="torch")
    assert torch.equal(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.2))
    qb, kb, vb = (torch.randn(2, len(SINKS), 5, 24, generator=gen) for _ in range(3))
    positions = left_padded([20, 9], [0, 2], 5)
    args = (qb, kb, vb, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS)
    got = ops.prefill_attention(*args, scale=0.2, backend="torch")
    assert torch.equal(got, ops.prefill_attention_reference(*args, scale=0.2))
    new_base, _, rows = layout([25, 12], SINKS, WINDOWS)
    got, want = ([torch.zeros(rows, 24), torch.zeros(rows, 24), torch.full((rows,), -1)] for _ in range(2))
    ops.append(*got, new_base, kb, vb, positions, SINKS, WINDOWS, backend="torch")
    ops.append_reference(*want, new_base, kb, vb, positions, SINKS, WINDOWS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- prefill_attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,head_dim,tokens,seen,pad", [
    (1, 16, 70, [0], [0]),          # a prompt from scratch, several query blocks
    (2, 33, 37, [20, 13], [0, 6]),  # a cached prefix, then a left-padded block
    (3, 24, 5, [3, 0, 9], [0, 2, 0]),
    (1, 80, 33, [0], [0]),
    (2, 24, 1, [9, 4], [0, 0]),  # one token over a full ring: its oldest row is out of the window
    (2, 24, 2, [9, 30], [0, 1]),
    (1, 16, 20, [149], [0]),  # a cached tile whose oldest key leaves the window of the block's last query
])
@pytest.mark.parametrize("with_sink_query", [False, True])
def test_prefill_matches_reference(isa, dtype, batch, head_dim, tokens, seen, pad, with_sink_query):
    gen = torch.Generator().manual_seed(tokens * 10 + head_dim)
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, dtype, gen)
    q, k, v, q_sink = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(dtype) for _ in range(4))
    positions = left_padded(seen, pad, tokens)
    fill = torch.randn(len(SINKS), head_dim, generator=gen)
    args = (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS)
    kwargs = dict(scale=head_dim**-0.5, q_sink=q_sink if with_sink_query else None, fill=fill)
    got = ops.prefill_attention(*args, backend="cpu", **kwargs)
    assert_close(got, ops.prefill_attention_reference(*args, **kwargs), dtype)
    no_key = (positions < 0)[:, None, :] | (SINKS + WINDOWS == 0)[None, :, None]  # padding, pruned heads
    torch.testing.assert_close(got[no_key].float(), fill[None, :, None, :].expand_as(got)[no_key].to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_long_block_skips_tiles_correctly(isa, dtype):
    """300 new tokens after 150 cached ones: sinks and windows across many key tiles, left padding."""
    gen = torch.Generator().manual_seed(7)
    seen, pad, tokens, head_dim = [150, 0], [0, 37], 300, 24
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, dtype, gen, LONG_SINKS, LONG_WINDOWS)
    q, k, v, q_sink = (torch.randn(2, len(LONG_SINKS), tokens, head_dim, generator=gen).to(dtype) for _ in range(4))
    positions = left_padded(seen, pad, tokens)
    args = (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, LONG_SINKS, LONG_WINDOWS)
    for q_s in (None, q_sink):
        got = ops.prefill_attention(*args, scale=0.2, q_sink=q_s, backend="cpu")
        assert_close(got, ops.prefill_attention_reference(*args, scale=0.2, q_sink=q_s), dtype)


def test_prefill_pruned_and_padding_without_fill_are_zero(isa):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, len(SINKS), 6, 24, generator=gen) for _ in range(3))
    positions = left_padded([0, 0], [0, 6], 6)  # the second sequence is all padding
    empty, none = torch.zeros(0, 24), torch.zeros(2, len(SINKS), dtype=torch.long)
    args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long), none, none, SINKS, WINDOWS)
    got = ops.prefill_attention(*args, scale=0.2, backend="cpu")
    assert_close(got, ops.prefill_attention_reference(*args, scale=0.2), torch.float32)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[0, 3], torch.zeros_like(got[0, 3]))


# ---- append -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool_dtype,new_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.float16)])
@pytest.mark.parametrize("batch,seen", [(2, [0, 0]), (1, [11]), (3, [5, 0, 130])])
def test_append_matches_reference(pool_dtype, new_dtype, batch, seen):
    gen = torch.Generator().manual_seed(5)
    head_dim, tokens = 24, 29
    pad = [4 * b for b in range(batch)]
    positions = left_padded(seen, pad, tokens)
    base, _, rows = layout([n + tokens - p for n, p in zip(seen, pad)], SINKS, WINDOWS)  # capacity after the block
    k, v = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(new_dtype) for _ in range(2))

    def pools():
        return [torch.zeros(rows, head_dim, dtype=pool_dtype), torch.zeros(rows, head_dim, dtype=pool_dtype),
                torch.full((rows,), -1, dtype=torch.long)]

    want, got = pools(), pools()
    ops.append_reference(*want, base, k, v, positions, SINKS, WINDOWS)
    ops.append(*got, base, k, v, positions, SINKS, WINDOWS, backend="cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # conversions round to nearest even, like torch


def test_conversions_are_exact():
    """Every fp16 and bf16 value widens exactly; fp32 narrows to fp16 / bf16 with torch's rounding."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    extremes = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14,
                             3.0e38, float("inf"), -float("inf")])
    gen = torch.Generator().manual_seed(9)
    narrow = torch.cat([extremes] + [torch.randn(4000, generator=gen) * 10.0**e for e in (-8, -6, -3, 0, 3, 5)])
    cases = [(every.view(torch.float16), torch.float32), (every.view(torch.bfloat16), torch.float32),
             (narrow, torch.float16), (narrow, torch.bfloat16)]
    for values, pool_dtype in cases:
        values = values[~values.isnan()]
        values = values[: values.numel() // 8 * 8].view(1, 1, -1, 8)
        tokens = values.shape[2]
        positions = torch.arange(tokens)[None]
        sink, window, base = torch.tensor([tokens]), torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long)
        got = [torch.zeros(tokens, 8, dtype=pool_dtype) for _ in range(2)] + [torch.full((tokens,), -1)]
        ops.append(*got, base, values, values, positions, sink, window, backend="cpu")
        assert torch.equal(got[0], values[0, 0].to(pool_dtype)), (values.dtype, pool_dtype)


# ---- consistency and errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 9])
def test_decode_after_append_equals_last_prefill_row(isa, prefix):
    """The cache a prefill leaves holds exactly what the last position sees."""
    gen = torch.Generator().manual_seed(6)
    batch, head_dim, tokens = 2, 16, 23
    (k_pool, v_pool, pos_pool), base, length = filled_cache([prefix] * batch, head_dim, torch.float32, gen)
    q, k, v = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen) for _ in range(3))
    positions = left_padded([prefix] * batch, [0] * batch, tokens)
    prefill = ops.prefill_attention(q, k, v, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS,
                                    scale=0.25, backend="cpu")
    new_base, kept, rows = layout([prefix + tokens] * batch, SINKS, WINDOWS)
    pools = [torch.zeros(rows, head_dim), torch.zeros(rows, head_dim), torch.full((rows,), -1)]
    for dst, src in zip(pools, (k_pool, v_pool, pos_pool)):  # move the prefix into the grown layout
        for b in range(batch):
            for h in range(len(SINKS)):
                n = int(length[b, h])
                dst[new_base[b, h] : new_base[b, h] + n] = src[base[b, h] : base[b, h] + n]
    ops.append(*pools, new_base, k, v, positions, SINKS, WINDOWS, backend="cpu")
    decode = ops.decode_attention(q[:, :, -1], pools[0], pools[1], new_base, kept, scale=0.25, backend="cpu")
    torch.testing.assert_close(decode, prefill[:, :, -1], atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    q = torch.randn(2, len(SINKS), 8)
    pool = torch.zeros(4, 8)
    index = torch.zeros(2, len(SINKS), dtype=torch.long)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        ops.decode_attention(q[0], pool, pool, index, index, scale=1.0, backend="cpu")
    with pytest.raises(TypeError, match="base must have dtype"):
        ops.decode_attention(q, pool, pool, index.int(), index, scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="k_pool rows must have head_dim=8"):
        ops.decode_attention(q, torch.zeros(4, 9), torch.zeros(4, 9), index, index, scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.decode_attention(q, pool, pool, index, index, scale=1.0, backend="gpu")


def test_out_of_range_rows_are_refused_by_the_kernels():
    q = torch.randn(1, 2, 8)
    pool = torch.randn(4, 8)
    base = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):
        ops.decode_attention(q, pool, pool, base, torch.tensor([[2, 3]]), scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="length must be >= 0"):
        ops.decode_attention(q, pool, pool, base, torch.tensor([[2, -1]]), scale=1.0, backend="cpu")
    k = torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)[None]
    sink, window = torch.tensor([0, 0]), torch.tensor([2, 3])
    pools = [torch.zeros(4, 8), torch.zeros(4, 8), torch.full((4,), -1)]
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):  # head 1 needs rows 2..4
        ops.append(*pools, base, k, k, positions, sink, window, backend="cpu")
    assert torch.equal(pools[0], torch.zeros(4, 8)) and (pools[2] == -1).all()  # checked before any write
    pos_pool = torch.zeros(4, dtype=torch.long)
    args = (k, k, k, positions, pool, pool, pos_pool, base, torch.tensor([[2, 2]]), sink, window)
    with pytest.raises(ValueError, match="sink_size and window_size must be >= 0"):
        ops.prefill_attention(*args[:9], sink, -window, scale=1.0, backend="cpu")


VALIDATED_BACKENDS = ["torch", "cpu", "triton", "metal"]


@pytest.fixture(autouse=True)
def _triton_available(request):
    """Triton is an optional extra: its cases skip where it is not installed, except in CI."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "triton" and os.environ.get("CI") != "true":
        pytest.importorskip("triton")


@pytest.mark.parametrize("backend", VALIDATED_BACKENDS)
def test_block_positions_must_be_padding_then_consecutive(backend):
    """Every backend refuses what the Triton kernels cannot compute (they derive a column's position from the
    last one): positions out of order, with gaps, or padding after a real token."""
    k = torch.randn(1, 2, 5, 8)
    pool = torch.zeros(4, 8)
    none = torch.zeros(1, 2, dtype=torch.long)
    sink, window = torch.tensor([1, 0]), torch.tensor([2, 3])
    for positions in ([[0, 1, 3, 2, 4]], [[0, 1, 2, 10, 11]], [[0, 1, -1, 2, 3]], [[-2, 0, 1, 2, 3]]):
        positions = torch.tensor(positions)
        with pytest.raises(ValueError, match="positions: each row must be -1 .left padding. followed by consec"):
            ops.prefill_attention(k, k, k, positions, pool, pool, torch.zeros(4, dtype=torch.long), none, none,
                                  sink, window, scale=1.0, backend=backend)
        with pytest.raises(ValueError, match="positions: each row must be -1"):
            ops.append(pool, pool.clone(), torch.zeros(4, dtype=torch.long), none, k, k, positions, sink, window,
                       backend=backend)
    padded = torch.tensor([[-1, -1, 7, 8, 9]])  # left padding, then a later block of a sequence: accepted
    out = ops.prefill_attention(k, k, k, padded, pool, pool, torch.zeros(4, dtype=torch.long), none, none, sink,
                                window, scale=1.0, backend=backend)
    assert out.shape == k.shape


def test_positions_checked_once_are_not_read_again_unless_changed():
    """HeadKVCache marks the positions it built; the ops then skip reading them back (a GPU synchronisation per
    layer), but a marked tensor changed in place is checked again."""
    from headkv_engine.ops._checks import check_block_positions, mark_positions_checked  # noqa: PLC0415

    positions = torch.tensor([[-1, 0, 1, 2]])
    mark_positions_checked(positions)
    check_block_positions(positions)
    positions[0, 2] = 5  # bumps the tensor's version
    with pytest.raises(ValueError, match="consecutive positions"):
        check_block_positions(positions)


@pytest.mark.parametrize("backend", VALIDATED_BACKENDS)
def test_rows_outside_the_pools_are_refused(backend):
    q = torch.randn(1, 2, 8)
    pool = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"base 2, length 3\) .*outside the pools' 4 rows"):
        ops.decode_attention(q, pool, pool, torch.tensor([[0, 2]]), torch.tensor([[2, 3]]), scale=1.0,
                             backend=backend)
    huge = 2**63 - 4  # base + length wraps around in int64: still refused
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):
        ops.decode_attention(q, pool, pool, torch.tensor([[0, huge]]), torch.tensor([[2, 8]]), scale=1.0,
                             backend=backend)
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):
        ops.decode_attention(q, pool, pool, torch.tensor([[0, 0]]), torch.tensor([[2, huge]]), scale=1.0,
                             backend=backend)
    k = torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)[None]
    pools = [torch.zeros(4, 8), torch.zeros(4, 8), torch.full((4,), -1)]
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):  # head 1 (window 3) needs rows 2..4
        ops.append(*pools, torch.tensor([[0, 2]]), k, k, positions, torch.tensor([0, 0]), torch.tensor([2, 3]),
                   backend=backend)
    assert torch.equal(pools[0], torch.zeros(4, 8)) and (pools[2] == -1).all()  # checked before any write
    with pytest.raises(ValueError, match="outside the pools' 4 rows"):
        ops.prefill_attention(k, k, k, positions, pool, pool, torch.zeros(4, dtype=torch.long),
                              torch.tensor([[0, 3]]), torch.tensor([[2, 2]]), torch.tensor([0, 0]),
                              torch.tensor([2, 3]), scale=1.0, backend=backend)


@pytest.mark.parametrize("backend", VALIDATED_BACKENDS)
def test_an_empty_block_is_a_no_op(backend):
    k = torch.randn(2, 3, 0, 8)
    pools = [torch.randn(6, 8), torch.randn(6, 8), torch.arange(6)]
    before = [p.clone() for p in pools]
    base = torch.arange(6).view(2, 3)
    length = torch.ones(2, 3, dtype=torch.long)
    sink, window = torch.tensor([0, 1, 0]), torch.tensor([UNBOUNDED_WINDOW, 2, 1])
    positions = torch.zeros(2, 0, dtype=torch.long)
    ops.append(*pools, base, k, k, positions, sink, window, backend=backend)
    assert all(torch.equal(p, b) for p, b in zip(pools, before))
    out = ops.prefill_attention(k, k, k, positions, *pools, base, length, sink, window, scale=1.0, backend=backend)
    assert out.shape == (2, 3, 0, 8)


@pytest.mark.parametrize("backend", VALIDATED_BACKENDS)
def test_decode_sink_query_must_have_the_query_shape(backend):
    q = torch.randn(2, 2, 8)
    pool = torch.randn(4, 8)
    base, length = torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2, dtype=torch.long)
    for shape in ((1, 2, 8), (2, 2, 4)):
        with pytest.raises(ValueError, match=r"q_sink must have q's shape \(2, 2, 8\)"):
            ops.decode_attention(q, pool, pool, base, length, scale=1.0, sink_size=torch.tensor([1, 1]),
                                 q_sink=torch.randn(shape), backend=backend)


@pytest.mark.parametrize("backend", VALIDATED_BACKENDS)
def test_decode_max_length_below_a_length_is_refused(backend):
    q = torch.randn(1, 2, 8)
    pool = torch.randn(6, 8)
    base, length = torch.tensor([[0, 3]]), torch.tensor([[3, 3]])
    with pytest.raises(ValueError, match="max_length: expected an upper bound of length, got 2 < 3"):
        ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend=backend, max_length=2)
    want = ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend="torch")
    got = ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend=backend, max_length=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,value,message", [("q_start", -1, "q_start must be >= 0"),
                                                ("sink_size", -1, "sink_size must be >= 0"),
                                                ("local_window", 0, "local_window must be >= 1"),
                                                ("min_query", -3, "min_query must be >= 0")])
def test_head_statistics_refuses_negative_arguments(name, value, message):
    q = torch.randn(2, 5, 8)
    kwargs = {"scale": 1.0, name: value} if name != "q_start" else {"scale": 1.0}
    with pytest.raises(ValueError, match=message):
        ops.head_statistics(q, q, value if name == "q_start" else 0, backend="cpu", **kwargs)


@pytest.mark.parametrize("field,args,message", [
    ("q_start", dict(q_start=-1, min_query=0), "q_start must be >= 0"),
    ("min_query", dict(min_query=-1), "min_query must be >= 0"),
    ("sink_size", dict(sink_size=-2), "sink_size must be >= 0"),
    ("local_window", dict(local_window=0), "local_window must be positive"),
    ("recent_ratio", dict(recent_ratio=1.5), "recent_ratio must be in"),
])
def test_extension_statistics_checks_its_arguments(field, args, message):
    """The C++ kernel checks for itself what the dispatcher checks (a direct call read below its rows)."""
    from headkv_engine.ops import _cpu  # noqa: PLC0415

    q = torch.randn(2, 5, 8)
    call = dict(q_start=0, scale=1.0, sink_size=1, local_window=2, recent_ratio=0.1, min_query=3, bins=4)
    call.update(args)
    k = q if call["q_start"] >= 0 else torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=message):
        _cpu.head_statistics(q, k, **call)


@pytest.mark.parametrize("backend", ["cpu", "triton", "metal"])
def test_kernels_refuse_inputs_that_record_gradients(backend):
    """No backward: an input requiring grad is refused (outside torch.no_grad), not given a detached output."""
    q = torch.randn(1, 2, 8, requires_grad=True)
    pool = torch.randn(4, 8)
    base, length = torch.tensor([[0, 2]]), torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match=f"backend '{backend}' computes no gradients"):
        ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend=backend)
    with torch.no_grad():
        ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend=backend)
    out = ops.decode_attention(q, pool, pool, base, length, scale=1.0, backend="torch")
    out.sum().backward()
    assert q.grad is not None


def test_extension_checks_its_arguments():
    module = ext()
    assert module.cpu_isa() in ("avx2", "baseline")
    q = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="dtype code must be 0 .fp32., 1 .bf16. or 2 .fp16., got 7"):
        module.decode_attention(q.data_ptr(), 0, q.data_ptr(), q.data_ptr(), 0, 0, 0, 0, q.data_ptr(),
                                1, 1, 8, 1, 7, 0, 1.0)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        module.decode_attention(q.data_ptr(), 0, q.data_ptr(), q.data_ptr(), 0, 0, 0, 0, q.data_ptr(),
                                1, 1, 0, 1, 0, 0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_statistics(isa, dtype):
    """The step statistics: the reference against a brute-force softmax per head, the cpu kernel against the
    reference (a 1200-row full head spans three work items, merged), and their edge cases."""
    gen = torch.Generator().manual_seed(11)
    (k_pool, v_pool, pos_pool), base, length = filled_cache([1200, 3], 8, dtype, gen)
    q = (torch.randn(2, len(SINKS), 8, generator=gen) * 3).to(dtype)
    query_position = torch.tensor([1199, 2])
    out, stats = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.5, return_stats=True,
                                                pos_pool=pos_pool, query_position=query_position, stat_sink=4,
                                                stat_local=8)
    assert torch.equal(out, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.5))
    for b in range(2):
        for h in range(len(SINKS)):
            n = int(length[b, h])
            if n == 0:  # pruned head: zeros
                assert torch.equal(stats[b, h], torch.zeros(3))
                continue
            rows = slice(int(base[b, h]), int(base[b, h]) + n)
            p = torch.softmax(k_pool[rows].float() @ q[b, h].float() * 0.5, 0)
            pos = pos_pool[rows]
            torch.testing.assert_close(stats[b, h, 0], -(p * p.log()).sum())
            torch.testing.assert_close(stats[b, h, 1], p[pos < 4].sum())
            torch.testing.assert_close(stats[b, h, 2], p[pos > int(query_position[b]) - 8].sum())
    assert float(stats[0, 2, 0]) == 0 and float(stats[0, 2, 2]) == 1  # window 1: one key, the newest
    got_out, got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.5, backend="cpu", return_stats=True,
                                        pos_pool=pos_pool, query_position=query_position, stat_sink=4, stat_local=8)
    assert_close(got_out, out, dtype)
    torch.testing.assert_close(got, stats, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="query_position"):
        ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.5, backend="torch", return_stats=True,
                             pos_pool=pos_pool, query_position=query_position[:1])
