"""The Triton kernels against the PyTorch references, on CPU under TRITON_INTERPRET=1 (or on CUDA).

The interpreter runs kernels exactly but slowly, so shapes are small; the shapes still cover window 1,
sink 0, windows longer than the sequence, pruned heads, full heads, batch > 1, left padding and fp16/bf16.
"""

import functools
import os

import kernel_cases
import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton is first imported.
if os.environ.get("CI") != "true":
    pytest.importorskip("triton")

from kernel_cases import SINKS  # noqa: E402

from headkv_engine import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}

policy = functools.partial(kernel_cases.policy, device=DEVICE)
filled_cache = functools.partial(kernel_cases.filled_cache, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_sink_query", [False, True])
def test_decode_matches_reference(dtype, with_sink_query):
    batch, head_dim = 2, 24
    args, kwargs, fill = kernel_cases.decode_case(batch, head_dim, dtype, with_sink_query, DEVICE)
    got = ops.decode_attention(*args, backend="triton", **kwargs)
    want = ops.decode_attention_reference(*args, **kwargs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # pruned head: its fill (the interpreter may round bf16 toward zero: one ulp)
    torch.testing.assert_close(got[:, 3].float(), fill[3].float().expand(batch, -1), atol=0, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [None, 16], ids=["default-chunks", "many-chunks"])
def test_fused_decode_matches_reference(dtype, chunk):
    """The one-launch variant (the last chunk of a head merges): same outputs, and its arrival counters
    leave no trace between calls."""
    from headkv_engine.kernel_sources import triton_module

    batch, head_dim = 2, 24
    (k_pool, v_pool, _), base, length = filled_cache(batch, head_dim, seen=[150, 9], dtype=dtype, seed=3)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(batch, len(SINKS), head_dim, generator=gen).to(dtype).to(DEVICE)
    q_sink = torch.randn_like(q)
    sink, _ = policy()
    fill = torch.randn(len(SINKS), head_dim, generator=gen).to(DEVICE)
    launch = triton_module("decode").decode_attention
    for kwargs in (dict(sink_size=sink, q_sink=q_sink, fill=fill), {}):
        want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3, **kwargs)
        for _ in range(2):
            got = launch(q, k_pool, v_pool, base, length, 0.3, chunk=chunk, block_n=16 if chunk else None, fused=True,
                         **kwargs)
            torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
            # the merging programs zeroed the counters they used: the next launch needs no memset
            counters = triton_module("decode").arrival_counters(q.device, q.shape[0] * q.shape[1])
            assert counters.numel() >= q.shape[0] * q.shape[1] and not counters.any()


def test_fused_decode_below_max_length_truncates_and_leaves_no_trace():
    """A max_length under the real length launches fewer chunks than a head has: the head is truncated, as in the
    two-pass launch, and no counter is left waiting, so the next (correct) call is exact."""
    from headkv_engine.kernel_sources import triton_module

    decode = triton_module("decode")
    (k_pool, v_pool, _), base, length = filled_cache(2, 16, seen=[150, 9], dtype=torch.float32, seed=4)
    q = torch.randn(2, len(SINKS), 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    short = decode.decode_attention(q, k_pool, v_pool, base, length, 0.3, max_length=40, chunk=16, block_n=16)
    got = decode.decode_attention(q, k_pool, v_pool, base, length, 0.3, max_length=40, chunk=16, block_n=16,
                                  fused=True)
    torch.testing.assert_close(got, short, atol=2e-5, rtol=2e-5)
    assert not decode.arrival_counters(q.device, 2 * len(SINKS)).any()
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3)
    for _ in range(2):
        got = decode.decode_attention(q, k_pool, v_pool, base, length, 0.3, chunk=16, block_n=16, fused=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # a caller's own counters (for graph capture): used, checked, left zero
    own = torch.zeros(2 * len(SINKS), dtype=torch.int32, device=DEVICE)
    got = decode.decode_attention(q, k_pool, v_pool, base, length, 0.3, chunk=16, block_n=16, fused=True,
                                  counters=own)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert not own.any()
    with pytest.raises(ValueError, match="counters"):
        decode.decode_attention(q, k_pool, v_pool, base, length, 0.3, fused=True, counters=own[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 16], ids=["default-chunks", "many-chunks"])
@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
def test_decode_statistics_match_reference(dtype, chunk, fused):
    """Entropy, sink and local mass of the step's attention, merged across split-K chunks (by the merge pass,
    or by the last chunk of each head in the fused launch)."""
    from headkv_engine.kernel_sources import triton_module

    batch, head_dim = 2, 16
    (k_pool, v_pool, pos_pool), base, length = filled_cache(batch, head_dim, seen=[150, 9], dtype=dtype, seed=5)
    q = (torch.randn(batch, len(SINKS), head_dim, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    q = q.to(DEVICE)
    query_position = torch.tensor([149, 8], device=DEVICE)
    stat = dict(stat_sink=4, stat_local=8)
    want_out, want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3, return_stats=True,
                                                    pos_pool=pos_pool, query_position=query_position, **stat)
    got_out, got = triton_module("decode").decode_attention(
        q, k_pool, v_pool, base, length, 0.3, chunk=chunk, block_n=16 if chunk else None, fused=fused,
        stats=(pos_pool, query_position, stat["stat_sink"], stat["stat_local"]))
    torch.testing.assert_close(got_out.float(), want_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, 3], torch.zeros(batch, 3, device=DEVICE))  # pruned head: zeros
    # the dispatcher gives the same
    _, again = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.3, backend="triton", return_stats=True,
                                    pos_pool=pos_pool, query_position=query_position, **stat)
    torch.testing.assert_close(again, want, atol=1e-4, rtol=1e-4)


def timing_every_config(monkeypatch, tuned):
    """Let a Triton autotuner run on CPU (the interpreter has no GPU timer): each config is run once and timed
    with the wall clock; returns the list of configs it tried."""
    import time

    tried = []

    def bench(kernel_call, quantiles=None):
        start = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - start] * 3

    original = tuned._bench

    def recording(*args, config, **meta):
        tried.append(config)
        return original(*args, config=config, **meta)

    monkeypatch.setitem(tuned.__dict__, "do_bench", bench)  # shadows the cached property that asks for a GPU
    monkeypatch.setattr(tuned, "_bench", recording)
    monkeypatch.setattr(tuned, "cache", {})
    return tried


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
def test_autotuned_decode_tries_every_config_and_matches_reference(monkeypatch, fused):
    """The path CUDA takes by default: the tuner times each tile config, then the launch with the chosen one
    (outputs of every tuning run, and of the final launch, are complete)."""
    from headkv_engine.kernel_sources import triton_module

    mod = triton_module("decode")
    tuned = mod._decode_fused_kernel_tuned if fused else mod._decode_chunk_kernel_tuned
    tried = timing_every_config(monkeypatch, tuned)
    (k_pool, v_pool, _), base, length = filled_cache(2, 16, seen=[150, 9], dtype=torch.float16, seed=8)
    q = torch.randn(2, len(SINKS), 16, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, length, scale=0.3)
    for _ in range(2):  # the second call reuses the tuned config
        got = mod.decode_attention(q, k_pool, v_pool, base, length, 0.3, fused=fused, autotune=True)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert tried == mod._DECODE_CONFIGS
    with pytest.raises(ValueError, match="autotune"):
        mod.decode_attention(q, k_pool, v_pool, base, length, 0.3, autotune=True, block_n=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cached", [False, True], ids=["empty-cache", "cached-prefix"])
def test_prefill_matches_reference(dtype, cached):
    head_dim = 16
    args, q_sink, fill = kernel_cases.prefill_case(2, head_dim, 37, cached, dtype, DEVICE)
    kwargs = dict(scale=head_dim**-0.5, q_sink=q_sink)
    got = ops.prefill_attention(*args, backend="triton", **kwargs)
    want = ops.prefill_attention_reference(*args, **kwargs)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_small_blocks_skip_tiles_exactly():
    """With tiles smaller than the window the block-sparse loop bounds decide the result: check them."""
    mod = pytest.importorskip("headkv_engine.kernel_sources").triton_module("prefill")
    batch, head_dim, tokens = 1, 16, 70
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen).to(DEVICE) for _ in range(3))
    positions = torch.arange(tokens, device=DEVICE)[None]
    empty = torch.zeros(0, head_dim, device=DEVICE)
    none = torch.zeros(batch, len(SINKS), dtype=torch.long, device=DEVICE)
    sink, window = policy()
    args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long, device=DEVICE), none, none, sink, window)
    got = mod.prefill_attention(*args, head_dim**-0.5, block_m=16, block_n=16)
    want = ops.prefill_attention_reference(*args, scale=head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_autotuned_prefill_tries_every_config_and_matches_reference(monkeypatch):
    """CUDA's default prefill path: every tile config (16-key tiles included) is timed, the chosen one launched,
    and a block of another length in the same power-of-two class reuses the tuning."""
    mod = pytest.importorskip("headkv_engine.kernel_sources").triton_module("prefill")
    tried = timing_every_config(monkeypatch, mod._prefill_kernel_tuned)
    head_dim = 16
    empty = torch.zeros(0, head_dim, device=DEVICE)
    none = torch.zeros(1, len(SINKS), dtype=torch.long, device=DEVICE)
    sink, window = policy()
    for tokens in (40, 50):  # both in the class of 64
        gen = torch.Generator().manual_seed(tokens)
        q, k, v = (torch.randn(1, len(SINKS), tokens, head_dim, generator=gen).to(DEVICE) for _ in range(3))
        positions = torch.arange(tokens, device=DEVICE)[None]
        args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long, device=DEVICE), none, none, sink,
                window)
        got = mod.prefill_attention(*args, head_dim**-0.5, autotune=True)
        torch.testing.assert_close(got, ops.prefill_attention_reference(*args, scale=head_dim**-0.5), atol=2e-5,
                                   rtol=2e-5)
    assert tried == mod.PREFILL_CONFIGS
    with pytest.raises(ValueError, match="autotune"):
        mod.prefill_attention(*args, head_dim**-0.5, autotune=True, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_matches_reference(dtype):
    batch, head_dim, tokens = 2, 24, 29
    sink, window = policy()
    positions = torch.stack([torch.arange(tokens), torch.cat([torch.full((4,), -1), torch.arange(tokens - 4)])])
    seen = (positions >= 0).sum(1)
    kept = torch.minimum(seen[:, None], (sink.cpu() + window.cpu())[None, :])
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view_as(kept)
    rows = int(capacity.sum())
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen)
    v = torch.randn(batch, len(SINKS), tokens, head_dim, generator=gen)

    def pools():
        return [torch.zeros(rows, head_dim, dtype=dtype, device=DEVICE),
                torch.zeros(rows, head_dim, dtype=dtype, device=DEVICE),
                torch.full((rows,), -1, dtype=torch.long, device=DEVICE)]

    to = lambda t: t.to(DEVICE)  # noqa: E731
    want, got = pools(), pools()
    ops.append_reference(*want, to(base), to(k), to(v), to(positions), sink, window)
    ops.append(*got, to(base), to(k), to(v), to(positions), sink, window, backend="triton")
    assert torch.equal(got[2], want[2])
    tol = 0 if dtype == torch.float32 else 2**-7  # the interpreter may round bf16 toward zero
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=0, rtol=tol)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=0, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio",
    [(0, 90, 16, 4, 8, 0.1),  # several query and key tiles, distances past the 64 relative bins
     (37, 21, 24, 0, 1, 0.3),  # a later query block (chunked analysis), sink 0, local window 1, D not 2^k
     (0, 9, 16, 2, 3, 1.0)],  # fewer tokens than one tile; the recent region is everything
)
def test_head_statistics_matches_reference(dtype, q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio):
    kernel_cases.check_head_statistics("triton", DEVICE, dtype, q_start, tokens_q, head_dim, sink_size,
                                       local_window, recent_ratio)


def test_head_statistics_tiles_and_blocks_do_not_change_the_sums():
    """Block sizes only change how the sums are split over programs and tiles."""
    from headkv_engine.kernel_sources import triton_module
    from headkv_engine.ops.statistics import _recent_start, log2_bins

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 40, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 40, 16, generator=gen).to(DEVICE)
    launch = triton_module("statistics").head_statistics
    args = (q, k, _recent_start(0, 40, 0.1, q.device), 0, 0.25, 4, 8, 12, log2_bins(39))
    small = launch(*args, block_q=16, block_k=16)
    large = launch(*args, block_q=64, block_k=32)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)


def test_analyze_with_triton_statistics_matches_reference():
    """hk.analyze over a tiny model, in chunks, with the Triton statistics kernel."""
    from reference_model import tiny_model

    import headkv_engine as hk

    model = tiny_model(2, 4, 16).to(DEVICE)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = hk.analyze(model, ids, chunk_size=20, progress=False, backend="torch")
    got = hk.analyze(model, ids, chunk_size=20, progress=False, backend="triton")
    assert got.model_info["backend"] == "triton"
    for mine, ref in zip(got.statistics, want.statistics):
        assert mine.num_queries == ref.num_queries
        assert mine.mean_entropy == pytest.approx(ref.mean_entropy, abs=1e-5)
        assert mine.sink_ratio == pytest.approx(ref.sink_ratio, abs=1e-5)
        assert mine.max_attention_mean == pytest.approx(ref.max_attention_mean, abs=1e-5)
        assert mine.relative_position_dist == pytest.approx(ref.relative_position_dist, abs=1e-5)
        assert mine.distance_mass_log2 == pytest.approx(ref.distance_mass_log2, abs=1e-5)
        assert mine.sink_mass_by_size == pytest.approx(ref.sink_mass_by_size, abs=1e-5)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_autotuning_can_be_turned_off_by_the_environment(monkeypatch, op):
    from headkv_engine.kernel_sources import triton_module

    mod = triton_module(op)
    monkeypatch.delenv("HEADKV_TRITON_AUTOTUNE", raising=False)
    assert mod.triton_autotune_enabled()
    monkeypatch.setenv("HEADKV_TRITON_AUTOTUNE", "0")
    assert not mod.triton_autotune_enabled()
