"""The Metal kernels against the PyTorch references: on Apple MPS where present, else on CPU through the
emulator (conftest.py sets HEADKV_METAL_EMULATE=1), which compiles the same kernel sources as C++ and runs each
threadgroup's threads as real threads. Shapes cover window 1, sink 0, windows longer than the sequence, pruned
and full heads, batch > 1, left padding, head sizes that are not a multiple of the SIMD width, fp16/bf16 and
pools stored in another dtype than the queries.
"""

import csv
import functools
import os
import subprocess
import sys
import textwrap

import kernel_cases
import pytest
import torch
from kernel_cases import SINKS

from headkv_engine import backends, ops
from headkv_engine.metal_emulator import EmulatedLibrary, emulation_unavailable_reason
from headkv_engine.ops import _metal

DEVICE = "mps" if torch.backends.mps.is_available() else "cpu"
# Without an Apple GPU the kernels run through the emulator, which needs a C++ compiler (CI always has one).
pytestmark = pytest.mark.skipif(emulation_unavailable_reason() is not None and os.environ.get("CI") != "true",
                                reason="no C++ compiler for the Metal emulator")
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
policy = functools.partial(kernel_cases.policy, device=DEVICE)
filled_cache = functools.partial(kernel_cases.filled_cache, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_sink_query", [False, True])
@pytest.mark.parametrize("head_dim", [24, 80])
def test_decode_matches_reference(dtype, with_sink_query, head_dim):
    batch = 2
    args, kwargs, fill = kernel_cases.decode_case(batch, head_dim, dtype, with_sink_query, DEVICE)
    got = ops.decode_attention(*args, backend="metal", **kwargs)
    want = ops.decode_attention_reference(*args, **kwargs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got[:, 3].float(), fill[3].to(dtype).float().expand(batch, -1), atol=0, rtol=0)
    # without a fill, a pruned head outputs zeros
    kwargs.pop("fill")
    got = ops.decode_attention(*args, backend="metal", **kwargs)
    assert not got[:, 3].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_statistics_match_reference(dtype):
    batch, head_dim = 2, 24
    (k_pool, v_pool, pos_pool), base, length = filled_cache(batch, head_dim, seen=[150, 9], dtype=dtype, seed=2)
    q = torch.randn(batch, len(SINKS), head_dim, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    query_position = torch.tensor([150, 9], device=DEVICE)
    kwargs = dict(scale=0.4, return_stats=True, pos_pool=pos_pool, query_position=query_position, stat_sink=2,
                  stat_local=4)
    got, got_stats = ops.decode_attention(q, k_pool, v_pool, base, length, backend="metal", **kwargs)
    want, want_stats = ops.decode_attention_reference(q, k_pool, v_pool, base, length, **kwargs)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got_stats, want_stats, atol=1e-4, rtol=1e-4)
    assert not got_stats[:, 3].any()  # the pruned head: zeros


@pytest.mark.parametrize("chunk", [16, 50, 75], ids=["partial-last-chunk", "whole-chunks", "two-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_split_into_chunks_matches_reference(chunk, dtype):
    """Heads longer than a chunk are split over threadgroups and merged by a second launch; shorter heads (and
    threadgroups past a head's rows) take no part in the merge; the step statistics merge too."""
    batch, head_dim = 2, 40
    (k_pool, v_pool, pos_pool), base, length = filled_cache(batch, head_dim, seen=[150, 9], dtype=dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(batch, len(SINKS), head_dim, generator=gen).to(dtype).to(DEVICE)
    sink, _ = policy()
    fill = torch.randn(len(SINKS), head_dim, generator=gen).to(DEVICE)
    stats = (pos_pool, torch.tensor([150, 9], device=DEVICE), 2, 4)
    kwargs = dict(sink_size=sink, q_sink=torch.randn_like(q), fill=fill)
    got, got_stats = _metal.decode_attention(q, k_pool, v_pool, base, length, 0.3, stats=stats, chunk=chunk, **kwargs)
    want, want_stats = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3, return_stats=True,
                                                      pos_pool=pos_pool, query_position=stats[1], stat_sink=2,
                                                      stat_local=4, **kwargs)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got_stats, want_stats, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, 3].float(), fill[3].to(dtype).float().expand(batch, -1))
    plain = _metal.decode_attention(q, k_pool, v_pool, base, length, 0.3, chunk=chunk)
    torch.testing.assert_close(plain.float(), ops.decode_attention_reference(q, k_pool, v_pool, base, length,
                                                                             scale=0.3).float(),
                               atol=TOL[dtype], rtol=TOL[dtype])
    assert not plain[:, 3].any()


@pytest.mark.parametrize("query_dtype,pool_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_pools_in_another_dtype_than_the_queries(query_dtype, pool_dtype):
    batch, head_dim, tokens = 2, 16, 9
    (k_pool, v_pool, pos_pool), base, length = filled_cache(batch, head_dim, seen=[20, 13], dtype=pool_dtype)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(batch, len(SINKS), head_dim, generator=gen).to(query_dtype).to(DEVICE)
    sink, window = policy()
    got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.3, backend="metal")
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3)
    tol = max(TOL[query_dtype], TOL[pool_dtype])
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    q, k, v = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(query_dtype).to(DEVICE)
               for _ in range(3))
    positions = torch.stack([torch.arange(20, 20 + tokens), torch.arange(13, 13 + tokens)]).to(DEVICE)
    args = (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink, window)
    got = ops.prefill_attention(*args, scale=0.3, backend="metal")
    torch.testing.assert_close(got.float(), ops.prefill_attention_reference(*args, scale=0.3).float(), atol=tol,
                               rtol=tol)
    pools, base = empty_pools(head_dim, [20 + tokens, 13 + tokens], pool_dtype)
    want = [p.clone() for p in pools]
    ops.append(*pools, base, k, v, positions, sink, window, backend="metal")
    ops.append_reference(*want, base, k, v, positions, sink, window)
    for mine, theirs in zip(pools, want):
        assert torch.equal(mine, theirs)


def empty_pools(head_dim, seen_after, dtype):
    """Unwritten pools with the rows each head keeps after `seen_after[b]` tokens: ([k, v, pos], base)."""
    sink, window = kernel_cases.policy()
    keep = torch.minimum(torch.tensor(seen_after)[:, None], (sink + window)[None, :]).flatten()
    base = (torch.cumsum(keep, 0) - keep).view(len(seen_after), -1).to(DEVICE)
    rows = int(keep.sum())
    pools = [torch.zeros(rows, head_dim, dtype=dtype, device=DEVICE),
             torch.zeros(rows, head_dim, dtype=dtype, device=DEVICE),
             torch.full((rows,), -1, dtype=torch.long, device=DEVICE)]
    return pools, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cached", [False, True], ids=["empty-cache", "cached-prefix"])
def test_prefill_matches_reference(dtype, cached):
    head_dim = 40
    args, q_sink, fill = kernel_cases.prefill_case(2, head_dim, 37, cached, dtype, DEVICE)
    for kwargs in (dict(scale=head_dim**-0.5, q_sink=q_sink, fill=fill), dict(scale=head_dim**-0.5)):
        got = ops.prefill_attention(*args, backend="metal", **kwargs)
        want = ops.prefill_attention_reference(*args, **kwargs)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_visits_exactly_the_sink_and_window_columns():
    """The kernel visits only the block columns the mask lets through, computed from the positions: sweep the
    sink and window sizes around the block's length and the padding, where an off-by-one in those ranges shows."""
    batch, head_dim, tokens = 2, 8, 12
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(batch, 1, tokens, head_dim, generator=gen).to(DEVICE) for _ in range(3))
    positions = torch.stack([torch.arange(tokens), torch.cat([torch.full((5,), -1), torch.arange(3, 3 + tokens - 5)])])
    positions = positions.to(DEVICE)
    empty = torch.zeros(0, head_dim, device=DEVICE)
    none = torch.zeros(batch, 1, dtype=torch.long, device=DEVICE)
    for sink in (0, 1, 3, 4, 12, 20):
        for window in (0, 1, 2, 5, 11, 12, 13, 1 << 40):
            sizes = (torch.tensor([sink], device=DEVICE), torch.tensor([window], device=DEVICE))
            args = (q, k, v, positions, empty, empty, none[0, :0].clone(), none, none, *sizes)
            got = ops.prefill_attention(*args, scale=0.5, backend="metal")
            want = ops.prefill_attention_reference(*args, scale=0.5)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"sink {sink}, window {window}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_matches_reference(dtype):
    batch, head_dim, tokens = 2, 40, 30
    gen = torch.Generator().manual_seed(7)
    k, v = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    # a block that continues both sequences (the second left-padded): ring slots wrap within the block
    sink, window = policy()
    pools, base = empty_pools(head_dim, [7 + tokens, 3 + tokens - 4], dtype)
    positions = torch.stack([torch.arange(7, 7 + tokens),
                             torch.cat([torch.full((4,), -1), torch.arange(3, 3 + tokens - 4)])]).to(DEVICE)
    want = [p.clone() for p in pools]
    ops.append(*pools, base, k, v, positions, sink, window, backend="metal")
    ops.append_reference(*want, base, k, v, positions, sink, window)
    for mine, theirs in zip(pools, want):
        assert torch.equal(mine, theirs)


def test_append_never_writes_outside_the_pools():
    """A base that points past the pools is skipped by the kernel (the dispatcher refuses it on CPU tensors)."""
    k = torch.randn(1, 2, 3, 8, device=DEVICE)
    pools = [torch.zeros(4, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE),
             torch.full((4,), -1, dtype=torch.long, device=DEVICE)]
    base = torch.tensor([[0, 3]], device=DEVICE)  # head 1 would write rows 3, 4, 5
    sink, window = torch.tensor([0, 0], device=DEVICE), torch.tensor([3, 3], device=DEVICE)
    _metal.append(*pools, base, k, k, torch.arange(3, device=DEVICE)[None], sink, window)
    assert torch.equal(pools[0][:3], k[0, 0]) and torch.equal(pools[0][3], k[0, 1, 0])
    assert pools[2].tolist() == [0, 1, 2, 0]


def test_head_dim_above_the_kernels_limit_is_refused():
    q = torch.zeros(1, 1, 264, device=DEVICE)
    pool = torch.zeros(2, 264, device=DEVICE)
    index = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim: the Metal kernels serve heads of up to 256 dimensions, got 264"):
        ops.decode_attention(q, pool, pool, index, index, scale=1.0, backend="metal")


def test_every_launched_kernel_is_instantiated_in_the_sources():
    """The launcher names a kernel per (query dtype, pool dtype); each source instantiates all nine (bfloat under
    Metal 3.1) or, for one-dtype kernels, all three, and declares its threadgroup memory through
    HEADKV_THREADGROUP (shared in the emulator too)."""
    types = list(_metal.TYPE_NAMES.values())
    pairs = [(a, b) for a in types for b in types]
    for op, kernel, combos in (("decode", "decode", pairs), ("decode", "decode_merge", [(t, t) for t in types]),
                               ("prefill", "prefill", pairs), ("append", "append", pairs),
                               ("statistics", "statistics", [(t, t) for t in types])):
        names = _metal.instantiated_kernels(op)
        for query, pool in combos:
            assert f"headkv_{kernel}_{query}_{pool}" in names
    for op in ("decode", "prefill", "append", "statistics"):
        text = _metal.source(op)
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("threadgroup ") and "[" in stripped and "(" not in stripped:
                pytest.fail(f"{op}: threadgroup memory declared without HEADKV_THREADGROUP: {stripped}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio",
    [(0, 80, 16, 4, 8, 0.1),  # distances past the 64 relative bins
     (37, 21, 40, 0, 1, 0.3),  # a later query block (chunked analysis), sink 0, local window 1
     (0, 9, 16, 2, 3, 1.0)],  # the recent region is everything
)
def test_head_statistics_matches_reference(dtype, q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio):
    kernel_cases.check_head_statistics("metal", DEVICE, dtype, q_start, tokens_q, head_dim, sink_size,
                                       local_window, recent_ratio)


def test_analyze_with_metal_statistics_matches_the_cpu_kernel():
    from reference_model import tiny_model  # noqa: PLC0415

    import headkv_engine as hk  # noqa: PLC0415

    model = tiny_model(2, 4, 16).to(DEVICE)
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(8))
    got = hk.analyze(model, ids, chunk_size=16, progress=False, backend="metal")
    want = hk.analyze(model.cpu(), ids, chunk_size=16, progress=False, backend="cpu")
    for mine, theirs in zip(got.statistics, want.statistics):
        assert mine.num_queries == theirs.num_queries
        assert mine.mean_entropy == pytest.approx(theirs.mean_entropy, abs=1e-4)
        assert mine.sink_ratio == pytest.approx(theirs.sink_ratio, abs=1e-4)


def test_patched_model_on_the_metal_device_equals_the_masked_reference():
    """The patched model on DEVICE (on a Mac: the GPU; the model tests of test_model.py run CPU tensors through the
    emulator): prefill, then decode steps, against the dense per-head-masked reference."""
    from reference_model import reference_logits, tiny_model  # noqa: PLC0415
    from test_model import mixed_profile, stepwise_logits  # noqa: PLC0415

    import headkv_engine as hk  # noqa: PLC0415

    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(9))
    profile = mixed_profile(fill=True)
    want = reference_logits(model, profile, ids)
    model.to(DEVICE)
    with hk.patch_model(model, profile, backend="metal"), torch.no_grad():
        got, cache = stepwise_logits(model, ids.to(DEVICE), first=9)
    assert (got.cpu() - want).abs().max() <= 1e-3
    assert cache.backend == "metal"


def test_statistics_kernel_writes_the_layout_of_the_other_backends():
    from headkv_engine.ops import statistics  # noqa: PLC0415

    regions_at = 5
    relative_at = regions_at + len(statistics.REGIONS)
    sinks_at = relative_at + statistics.RELATIVE_BINS
    log2_at = sinks_at + len(statistics.SINK_SIZES)
    for name, want in (("STATISTICS_REGIONS_AT", regions_at), ("STATISTICS_RELATIVE_AT", relative_at),
                       ("STATISTICS_RELATIVE_BINS", statistics.RELATIVE_BINS), ("STATISTICS_SINKS_AT", sinks_at),
                       ("STATISTICS_LOG2_AT", log2_at)):
        assert _metal.defined("statistics", name) == want, name
    # the fields of the longest sequence an int32 distance allows fit the kernel's threadgroup rows
    assert log2_at + statistics.log2_bins(2**31 - 1) <= _metal.defined("statistics", "STATISTICS_MAX_FIELDS")


def test_edge_shapes_match_reference():
    """head_dim 256 (8 dimensions per lane); a head longer than a decode chunk through the dispatcher; a
    max_length hint below the real length cuts every head at the hint, split or not; a prefill row that is all
    padding; head statistics with min_query inside the block and with no query."""
    gen = torch.Generator().manual_seed(12)
    (k_pool, v_pool, _), base, length = filled_cache(1, 256, seen=[600], dtype=torch.float32, seed=12)
    q = torch.randn(1, len(SINKS), 256, generator=gen).to(DEVICE)
    got = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.06, backend="metal")  # 600 rows: split
    torch.testing.assert_close(got, ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.06),
                               atol=2e-5, rtol=2e-5)
    cut = torch.minimum(length, torch.tensor(40, device=DEVICE))
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, cut, scale=0.06)
    for chunk in (512, 16):  # one chunk, and split into chunks that do not end at the hint
        short = _metal.decode_attention(q, k_pool, v_pool, base, length, 0.06, max_length=40, chunk=chunk)
        torch.testing.assert_close(short, want, atol=2e-5, rtol=2e-5)

    k = torch.randn(2, len(SINKS), 5, 16, generator=gen).to(DEVICE)
    positions = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, -1, -1, -1]], device=DEVICE)
    empty = torch.zeros(0, 16, device=DEVICE)
    none = torch.zeros(2, len(SINKS), dtype=torch.long, device=DEVICE)
    fill = torch.randn(len(SINKS), 16, generator=gen).to(DEVICE)
    args = (k, k, k, positions, empty, empty, none[0, :0].clone(), none, none, *policy())
    got = ops.prefill_attention(*args, scale=0.25, fill=fill, backend="metal")
    torch.testing.assert_close(got, ops.prefill_attention_reference(*args, scale=0.25, fill=fill), atol=2e-5,
                               rtol=2e-5)
    assert torch.equal(got[1], fill[:, None, :].expand(-1, 5, -1))

    q, k = torch.randn(2, 6, 16, generator=gen).to(DEVICE), torch.randn(2, 26, 16, generator=gen).to(DEVICE)
    kwargs = dict(scale=0.25, sink_size=2, local_window=3, min_query=23)  # queries 20..25: the first three skipped
    got = ops.head_statistics(q, k, 20, backend="metal", **kwargs)
    want = ops.head_statistics(q.cpu(), k.cpu(), 20, backend="torch", **kwargs)
    assert got["count"].tolist() == [3.0, 3.0]
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=key)
    none = ops.head_statistics(q[:, :0], k[:, :20], 20, backend="metal", **kwargs)
    assert not any(value.any() for value in none.values())


def test_sources_are_what_pytorchs_metal_loader_takes():
    """torch.mps.compile_shader reads a source as ASCII; its header embedding trips over `#pragma once`. Neither
    matters to the emulator, so it is checked here."""
    for op in ("decode", "prefill", "append", "statistics"):
        assert _metal.instantiated_kernels(op)
        text = _metal.source(op)
        assert text.isascii(), f"{op}: non-ASCII character at {next(i for i, c in enumerate(text) if ord(c) > 127)}"
        assert "#pragma once" not in text


def test_a_gpu_with_another_simd_width_is_refused(monkeypatch):
    library = _metal.library("decode", "cpu")
    kernel = getattr(library, _metal.kernel_name("decode", torch.float32, torch.float32))
    monkeypatch.setattr(type(kernel), "thread_execution_width", 64)
    q = torch.zeros(1, 1, 8)
    index = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="need SIMD groups of 32 lanes, this GPU runs 64"):
        _metal.decode_attention(q, torch.zeros(1, 8), torch.zeros(1, 8), index, index, 1.0)


# --- the emulator itself ------------------------------------------------------------------------------------

EMULATOR_PROBE = textwrap.dedent("""
    #include <metal_stdlib>
    using namespace metal;
    #define PROBE_SIMDS 2
    kernel void probe(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                      uint3 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],
                      uint simd [[simdgroup_index_in_threadgroup]]) {
        HEADKV_THREADGROUP float shared_sum[PROBE_SIMDS];
        const uint thread_id = simd * 32 + lane;
        const uint index = group.x * 40 + thread_id;
        const float total = simd_sum(x[index]);
        const float top = simd_max(x[index]);
        if (lane == 0) shared_sum[simd] = total;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[index] = shared_sum[0] + shared_sum[1] + 1000.0f * top;
    }
""")


def test_emulator_reduces_over_the_lanes_of_partial_simd_groups_and_shares_threadgroup_memory():
    """40 threads per group: SIMD groups of 32 and 8 lanes; simd_sum / simd_max cover exactly the live lanes,
    and the threadgroup array is one per group (two groups run in turn)."""
    library = EmulatedLibrary(EMULATOR_PROBE, ["probe"])
    x = torch.rand(80)
    out = torch.empty(80)
    library.probe(x, out, threads=(80,), group_size=(40,))
    for g in range(2):
        part = x[g * 40 : (g + 1) * 40]
        want = part.sum() + 1000.0 * torch.cat([part[:32].max().expand(32), part[32:].max().expand(8)])
        torch.testing.assert_close(out[g * 40 : (g + 1) * 40], want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="whole multiples of group_size"):
        library.probe(x, out, threads=(70,), group_size=(40,))
    with pytest.raises(ValueError, match="probe takes 2 buffers, got 1"):
        library.probe(x, threads=(80,), group_size=(40,))
    with pytest.raises(AttributeError, match="no kernel 'missing'"):
        library.missing  # noqa: B018


MISSING_BARRIER_PROBE = textwrap.dedent("""
    #include <metal_stdlib>
    using namespace metal;
    // SIMD group `writer` stores the group's number, SIMD group `reader` reads it back
    void handoff(device float* out, device const long* with_barrier, uint writer, uint reader, uint3 group,
                 uint lane, uint simd, threadgroup float* value) {
        if (simd == writer && lane == 0) value[0] = float(group.x + 1);
        if (with_barrier[0] != 0) threadgroup_barrier(mem_flags::mem_threadgroup);
        if (simd == reader && lane == 0) out[group.x] = value[0];
    }
    kernel void down(device float* out [[buffer(0)]], device const long* with_barrier [[buffer(1)]],
                     uint3 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],
                     uint simd [[simdgroup_index_in_threadgroup]]) {
        HEADKV_THREADGROUP float value[1];
        handoff(out, with_barrier, 1, 0, group, lane, simd, value);
    }
    kernel void up(device float* out [[buffer(0)]], device const long* with_barrier [[buffer(1)]],
                   uint3 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],
                   uint simd [[simdgroup_index_in_threadgroup]]) {
        HEADKV_THREADGROUP float value[1];
        handoff(out, with_barrier, 0, 1, group, lane, simd, value);
    }
""")


def test_emulator_exposes_a_missing_threadgroup_barrier_every_time():
    """SIMD groups take turns between barriers, forwards in even threadgroups and backwards in odd ones: a SIMD
    group reading what another writes without a barrier between sees the value from before (of the previous
    threadgroup), not by chance but every time, whichever SIMD group is the writer."""
    library = EmulatedLibrary(MISSING_BARRIER_PROBE, ["down", "up"])
    for kernel in (library.down, library.up):
        out = torch.zeros(3)
        kernel(out, torch.tensor([1]), threads=(192,), group_size=(64,))
        assert out.tolist() == [1.0, 2.0, 3.0]
    for _ in range(3):
        out = torch.zeros(3)
        library.down(out, torch.tensor([0]), threads=(192,), group_size=(64,))
        assert out.tolist() == [3.0, 2.0, 2.0]  # groups 0 and 2 read before the write: the value left before
        library.up(out, torch.tensor([0]), threads=(192,), group_size=(64,))
        assert out.tolist() == [1.0, 1.0, 3.0]  # group 1 (backwards) reads before the write


EARLY_EXIT_PROBE = textwrap.dedent("""
    #include <metal_stdlib>
    using namespace metal;
    kernel void early(device float* out [[buffer(0)]],
                      uint3 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],
                      uint simd [[simdgroup_index_in_threadgroup]]) {
        HEADKV_THREADGROUP float lanes[4];
        if (simd == 1) return;                // a whole SIMD group returns before the barriers
        if (simd == 2 && lane >= 16) return;  // and half of another
        const float live = simd_sum(1.0f);
        if (lane == 0) lanes[simd] = live;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (simd == 0 && lane == 0) out[group.x] = lanes[0] + 100.0f * lanes[2] + 10000.0f * lanes[3];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
""")


def test_emulator_lets_returned_threads_leave_reductions_and_barriers():
    """Threads that return no longer count in the SIMD-group reductions or the barriers (as on the GPU): the
    others neither wait for them nor add them."""
    library = EmulatedLibrary(EARLY_EXIT_PROBE, ["early"])
    out = torch.zeros(3)
    library.early(out, threads=(3 * 128,), group_size=(128,))
    assert out.tolist() == [32 + 100 * 16 + 10000 * 32] * 3


def test_emulated_launches_from_several_threads_do_not_mix():
    """ctypes releases the GIL: two Python threads launching at once share the (static) threadgroup memory, so the
    emulator runs one launch at a time."""
    import concurrent.futures  # noqa: PLC0415

    (k_pool, v_pool, _), base, length = filled_cache(2, 24, seen=[150, 9], dtype=torch.float32)
    qs = [torch.randn(2, len(SINKS), 24, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(2)]
    wants = [ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3) for q in qs]

    def run(i):
        return [_metal.decode_attention(qs[i], k_pool, v_pool, base, length, 0.3) for _ in range(4)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    for got, want in zip(results, wants):
        for out in got:
            torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_metal_backend_needs_mps_or_the_emulator(monkeypatch):
    monkeypatch.setenv("HEADKV_METAL_EMULATE", "0")
    with pytest.raises(RuntimeError, match="backend 'metal' is unavailable: Metal runs on Apple MPS devices .or on "
                                           "CPU with HEADKV_METAL_EMULATE=1., not on cpu"):
        backends.resolve_backend("metal", torch.device("cpu"))
    assert "metal" not in backends.available_backends("cpu")
    monkeypatch.setenv("HEADKV_METAL_EMULATE", "1")
    assert backends.resolve_backend("metal", torch.device("cpu")) == "metal"
    assert backends.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")  # never the emulator


def test_emulator_reports_a_compile_error():
    with pytest.raises(RuntimeError, match="could not compile the kernels"):
        EmulatedLibrary("kernel void broken(device float* x, HEADKV_NO_SUCH_MACRO) {}", ["broken"])


@pytest.mark.skipif(os.environ.get("CI") == "true", reason="needs a Metal toolchain (macOS)")
def test_sources_compile_with_apples_metal_compiler():
    """Where Apple's offline compiler is installed (xcrun metal), every source compiles as Metal."""
    try:
        subprocess.run(["xcrun", "--find", "metal"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("xcrun metal is not installed")
    for op in ("decode", "prefill", "append", "statistics"):
        result = subprocess.run(["xcrun", "metal", "-std=metal3.1", "-x", "metal", "-c", "-", "-o", os.devnull],
                                input=_metal.source(op), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_mps_benchmark_script_runs_through_the_emulator(tmp_path):
    """bench/mps_kernels.py, ready for an Apple GPU, writes its CSV (here on CPU through the emulator: the rows
    are checked, not the times) and does not overwrite it without --force."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "mps_kernels.py")
    out = tmp_path / "mps.csv"
    command = [sys.executable, script, "--device", "cpu", "--contexts", "64", "--batches", "2",
               "--prefill-contexts", "16", "--statistics-tokens", "24", "--repeats", "1", "--csv", str(out)]
    env = {**os.environ, "HEADKV_METAL_EMULATE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["op"] for r in rows] == ["decode", "prefill_sink4_window8", "prefill_sink4_window24",
                                       "prefill_sink4_window252", "head_statistics_h12_d64"]
    assert rows[0]["device_type"] == "cpu" and float(rows[0]["ours_ms"]) > 0 and float(rows[0]["copy_GBps"]) > 0
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "pass --force to overwrite it" in again.stderr
