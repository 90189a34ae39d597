"""GPU kernel benchmark: Triton ragged decode and windowed prefill vs dense baselines, one run, one CSV.

Times are CUDA-graph replays (the kernels alone; `*_eager_ms` adds Python launch overhead). A lone call is timed
after the L2 cache is flushed, so its time includes the latency of a cold start; `*_layer_ms` is the time per
call of a graph that runs the op for L layers in a row, each over its own cache (L chosen so that the caches
together are >= 8x the L2 cache), as a decode step of an L-layer model does.
Decode: bandwidth = bytes of kept K/V read / time, beside the device-to-device copy bandwidth measured in the
same run (bytes read + written / time) and the ratio of the two, for the two-pass launch (chunks, then merge)
and the fused one (`*_fused_*`: the last chunk of a head merges), each also with the step statistics
(`*_stats_ms`: entropy, sink and local mass in the same pass); vs torch SDPA over the dense cache, and vs
flash-attn / FlashInfer when installed. Prefill: a windowed head (sink 4 + window 8 / 24) vs dense causal SDPA.
Shapes: pythia-2.8b attention (32 heads of 80), the seed's head mix, contexts 1k-64k, batch 1-16.

    python bench/gpu_kernels.py --csv bench/results/gpu_kernels.csv --force
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
import triton.testing
from csv_rows import CsvRows
from kernel_inputs import HEAD_DIM, HEADS, ragged_cache, windowed_prefill

from headkv_engine import ops
from headkv_engine.kernel_sources import triton_module
from headkv_engine.provenance import commit


def copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, in bytes/s."""
    src = torch.empty(2**30 // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.nbytes / (ms * 1e-3)


def graph_ms(fn) -> float:
    """GPU time of `fn` replayed from a CUDA graph: the kernels alone, without Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200)


def layers_for(bytes_per_layer: int, device, cap: int = 32) -> int:
    """Layers whose caches together cover the L2 cache 8 times (at most `cap`)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(cap, -(-8 * l2 // max(1, bytes_per_layer))))


def bench_decode(batch, context, dtype, device, copy_bw):
    k_pool, v_pool, base, kept, sink, window = ragged_cache(batch, context, dtype, device)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
    scale = HEAD_DIM**-0.5
    launch = triton_module("decode").decode_attention
    # the fused launches' own arrival counters, allocated outside the graphs so that no memset is captured
    counters = torch.zeros(batch * HEADS, dtype=torch.int32, device=device)

    def ours_fn():
        return ops.decode_attention(q, k_pool, v_pool, base, kept, scale=scale, backend="triton", max_length=context)

    def fused_fn():  # the one-launch variant of the same kernel
        return launch(q, k_pool, v_pool, base, kept, scale, max_length=context, fused=True, counters=counters)

    # with this step's entropy / sink / local mass (the positions only steer the masks)
    stats = (torch.arange(k_pool.shape[0], device=device) % context, torch.full((batch,), context, device=device), 4, 8)

    def stats_fn():
        return launch(q, k_pool, v_pool, base, kept, scale, max_length=context, stats=stats)

    def fused_stats_fn():
        return launch(q, k_pool, v_pool, base, kept, scale, max_length=context, stats=stats, fused=True,
                      counters=counters)

    kv_bytes = k_pool.nbytes + v_pool.nbytes
    k_dense = torch.randn(batch, HEADS, context, HEAD_DIM, dtype=dtype, device=device)
    v_dense = torch.randn_like(k_dense)
    qd = q[:, :, None]

    def sdpa_fn():
        return torch.nn.functional.scaled_dot_product_attention(qd, k_dense, v_dense)

    ours, fused, sdpa = graph_ms(ours_fn), graph_ms(fused_fn), graph_ms(sdpa_fn)
    # Back to back over L layers' caches (dense caches: the same L, so both read cold memory every call).
    layers = layers_for(kv_bytes, device, cap=max(1, min(32, (8 << 30) // (2 * k_dense.nbytes))))
    caches = [ragged_cache(batch, context, dtype, device)[:4] for _ in range(layers - 1)] + [(k_pool, v_pool, base,
                                                                                              kept)]
    dense = [(torch.randn_like(k_dense), torch.randn_like(v_dense)) for _ in range(layers - 1)] + [(k_dense, v_dense)]

    def ours_layers():
        for kp, vp, b, n in caches:
            ops.decode_attention(q, kp, vp, b, n, scale=scale, backend="triton", max_length=context)

    def fused_layers():
        for kp, vp, b, n in caches:
            launch(q, kp, vp, b, n, scale, max_length=context, fused=True, counters=counters)

    def sdpa_layers():
        for kd, vd in dense:
            torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)

    ours_layer, sdpa_layer = graph_ms(ours_layers) / layers, graph_ms(sdpa_layers) / layers
    fused_layer = graph_ms(fused_layers) / layers
    dense.clear(), caches.clear()  # free the extra layers before the library baselines
    row = {
        "op": "decode", "batch": batch, "context": context, "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": ours, "sdpa_dense_ms": sdpa, "speedup_vs_sdpa": sdpa / ours,
        "ours_eager_ms": triton.testing.do_bench(ours_fn, warmup=25, rep=200),
        "sdpa_dense_eager_ms": triton.testing.do_bench(sdpa_fn, warmup=25, rep=200),
        "kept_kv_bytes": kv_bytes, "dense_kv_bytes": k_dense.nbytes * 2,
        "decode_bw_GBps": kv_bytes / (ours * 1e-3) / 1e9, "copy_bw_GBps": copy_bw / 1e9,
        "bw_ratio": kv_bytes / (ours * 1e-3) / copy_bw,
        "layers": layers, "ours_layer_ms": ours_layer, "sdpa_dense_layer_ms": sdpa_layer,
        "speedup_vs_sdpa_layer": sdpa_layer / ours_layer, "bw_ratio_layer": kv_bytes / (ours_layer * 1e-3) / copy_bw,
        "ours_fused_ms": fused, "ours_fused_layer_ms": fused_layer,
        "bw_ratio_fused_layer": kv_bytes / (fused_layer * 1e-3) / copy_bw,
        "ours_stats_ms": graph_ms(stats_fn), "ours_fused_stats_ms": graph_ms(fused_stats_fn),
    }
    row.update(library_baselines(q, k_dense, v_dense))
    return row


def library_baselines(q, k_dense, v_dense) -> dict:
    """Graph time of flash-attn's and FlashInfer's decode over the same dense cache, where installed.

    A library that is absent records "not installed"; one that refuses the shape (FlashInfer builds some head
    sizes only) records its error, so a missing figure always says why.
    """
    batch, heads, context, head_dim = k_dense.shape
    row = {}
    kc, vc = k_dense.transpose(1, 2).contiguous(), v_dense.transpose(1, 2).contiguous()  # [B, T, H, D]
    try:
        from flash_attn import flash_attn_with_kvcache  # noqa: PLC0415
    except ImportError:
        row["flash_attn_dense_ms"] = "not installed"
    else:
        qf = q[:, None]
        row["flash_attn_dense_ms"] = graph_ms(lambda: flash_attn_with_kvcache(qf, kc, vc))
    try:
        import flashinfer  # noqa: PLC0415
    except ImportError:
        row["flashinfer_dense_ms"] = "not installed"
        return row
    try:  # one page per sequence holding its whole context
        workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
        pages = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        last_page_len = torch.full((batch,), context, dtype=torch.int32, device=q.device)
        # use_cuda_graph: run() then launches kernels only, on these fixed buffers, so graph_ms can capture it
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=pages,
            paged_kv_indices_buffer=pages[:-1].clone(), paged_kv_last_page_len_buffer=last_page_len)
        wrapper.plan(pages, pages[:-1], last_page_len, heads, heads, head_dim, context, q_data_type=q.dtype,
                     kv_data_type=q.dtype)
        paged = torch.stack([kc, vc], dim=1)  # [pages, 2, page_size, H, D]
        row["flashinfer_dense_ms"] = graph_ms(lambda: wrapper.run(q, paged))
    except Exception as error:  # noqa: BLE001 - recorded in the CSV, not hidden
        row["flashinfer_dense_ms"] = f"error: {type(error).__name__}: {str(error)[:120]}"
    return row


def bench_prefill(context, sink_size, window_size, dtype, device):
    scale = HEAD_DIM**-0.5
    args, q, k, v = windowed_prefill(context, sink_size, window_size, dtype, device)
    # each head kind gets its own tuning (in a model one tuning serves a layer's mix), outside the timed graph
    triton_module("prefill")._prefill_kernel_tuned.cache.clear()
    ops.prefill_attention(*args, scale=scale, backend="triton")
    ours = graph_ms(lambda: ops.prefill_attention(*args, scale=scale, backend="triton"))
    dense = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return {
        "op": f"prefill_sink{sink_size}_window{window_size}", "batch": 1, "context": context,
        "dtype": str(dtype).replace("torch.", ""), "ours_ms": ours, "sdpa_dense_ms": dense,
        "speedup_vs_sdpa": dense / ours, "target_speedup": 0.5 * context / (sink_size + window_size),
    }


def bench_statistics(tokens, device, heads=12, head_dim=64):
    """head_statistics over one sequence (pythia-160m head shape): Triton vs the chunked PyTorch reference and vs
    the attention-matrix method (softmax of the whole [H, T, T] score matrix, then the same sums)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(heads, tokens, head_dim, device=device, generator=gen, dtype=torch.float16) for _ in range(2))
    kwargs = dict(scale=head_dim**-0.5, sink_size=4, local_window=8, recent_ratio=0.1)

    def triton_fn():
        return ops.head_statistics(q, k, 0, backend="triton", **kwargs)

    def reference_fn():
        return ops.head_statistics(q, k, 0, backend="torch", **kwargs)

    def matrix_fn():  # what output_attentions hands to the seed's analysis: the whole matrix at once
        scores = (q.float() @ k.float().transpose(1, 2)) * kwargs["scale"]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1), p.max(-1).values.mean(-1)

    row = {"op": f"head_statistics_h{heads}_d{head_dim}", "batch": 1, "context": tokens, "dtype": "float16"}
    for name, fn in (("ours", triton_fn), ("reference", reference_fn), ("matrix", matrix_fn)):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        row[f"{name}_peak_MB"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        row[f"{name}_ms"] = triton.testing.do_bench(fn, warmup=3, rep=20 if name != "reference" else 5)
    got, want = triton_fn(), ops.head_statistics(q.float(), k.float(), 0, backend="torch", **kwargs)
    row["max_abs_diff_mean_entropy"] = float((got["entropy"] - want["entropy"]).abs().max() / want["count"][0])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--statistics-tokens", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--csv", default="bench/results/gpu_kernels.csv")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CSV")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch.float16
    meta = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__,
        # the device copy of the tree has no .git: pass HEADKV_COMMIT=$(git rev-parse --short HEAD) from the checkout
        "commit": commit(),
    }
    record = CsvRows(args.csv, meta, args.force).record  # refuses an existing CSV before measuring
    copy_bw = copy_bandwidth(device)

    def decode_rows(batch):
        for context in args.contexts:
            if batch * context <= 16 * 32768:  # keep the dense baseline within memory
                record(bench_decode(batch, context, dtype, device, copy_bw))

    # the first batch size (the decode target's), then prefill and statistics, then the larger batches
    decode_rows(args.batches[0])
    for context in () if args.skip_prefill else (2048, 8192, 32768):
        for sink_size, window_size in ((4, 8), (4, 24), (4, 252)):
            record(bench_prefill(context, sink_size, window_size, dtype, device))
    for tokens in args.statistics_tokens:
        record(bench_statistics(tokens, device))
    for batch in args.batches[1:]:
        decode_rows(batch)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {meta['device']}; wrote {args.csv}")


if __name__ == "__main__":
    main()
