"""Apple GPU kernel benchmark: the Metal kernels vs dense baselines, one run, one CSV.

Decode: bandwidth = bytes of kept K/V read / time, beside the device's copy bandwidth measured in the same run
(bytes read + written / time) and the ratio of the two; vs torch SDPA over the dense cache. Prefill: a windowed
head (sink 4 + window 8 / 24 / 252) vs dense causal SDPA. Head statistics vs the attention-matrix method.
Shapes: pythia-2.8b attention (32 heads of 80), the seed's head mix, fp16. Times are medians of synchronised
calls (MPS has no graph replay: they include the launch).

    python bench/mps_kernels.py --csv bench/results/mps_kernels.csv --force

`--device cpu` (with HEADKV_METAL_EMULATE=1) runs the same rows through the CPU emulator of the kernels: a check
that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from csv_rows import CsvRows
from kernel_inputs import HEAD_DIM, HEADS, ragged_cache, windowed_prefill

from headkv_engine import ops
from headkv_engine.provenance import commit, processor


def synchronize(device) -> None:
    if device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn, device, repeats: int) -> float:
    fn()  # compiles the library on first use
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth(device, repeats: int) -> float:
    """Copy of 256 MiB on the device: (bytes read + bytes written) / time, in bytes/s."""
    src = torch.empty(2**28 // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (median_ms(lambda: dst.copy_(src), device, repeats) * 1e-3)


def bench_decode(batch, context, device, copy_bw, repeats):
    dtype = torch.float16
    k_pool, v_pool, base, kept, _, _ = ragged_cache(batch, context, dtype, device)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
    k_dense, v_dense = (torch.randn(batch, HEADS, context, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    scale = HEAD_DIM**-0.5
    longest = int(kept.max())  # known on the host, as the cache knows it: no device read per call
    ours = median_ms(lambda: ops.decode_attention(q, k_pool, v_pool, base, kept, scale=scale, backend="metal",
                                                  max_length=longest), device, repeats)
    dense = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense),
                      device, repeats)
    kept_bytes = k_pool.nbytes + v_pool.nbytes
    return {
        "op": "decode", "batch": batch, "context": context, "dtype": "float16", "ours_ms": ours, "sdpa_dense_ms": dense,
        "speedup_vs_sdpa": dense / ours, "kept_kv_MB": kept_bytes / 2**20,
        "decode_GBps": kept_bytes / (ours * 1e-3) / 1e9, "copy_GBps": copy_bw / 1e9,
        "share_of_copy_bw": kept_bytes / (ours * 1e-3) / copy_bw,
    }


def bench_prefill(context, sink_size, window_size, device, repeats):
    args, q, k, v = windowed_prefill(context, sink_size, window_size, torch.float16, device)
    scale = HEAD_DIM**-0.5
    ours = median_ms(lambda: ops.prefill_attention(*args, scale=scale, backend="metal"), device, repeats)
    dense = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), device,
                      repeats)
    return {
        "op": f"prefill_sink{sink_size}_window{window_size}", "batch": 1, "context": context, "dtype": "float16",
        "ours_ms": ours, "sdpa_dense_ms": dense, "speedup_vs_sdpa": dense / ours,
        "target_speedup": 0.5 * context / (sink_size + window_size),
    }


def bench_statistics(tokens, device, repeats, heads=12, head_dim=64):
    """head_statistics over one sequence (pythia-160m head shape) vs the attention-matrix method (softmax of the
    whole [H, T, T] score matrix, what output_attentions hands to an analysis); MPS has no fp64 for the reference."""
    q, k = (torch.randn(heads, tokens, head_dim, dtype=torch.float16, device=device) for _ in range(2))
    scale = head_dim**-0.5

    def matrix():
        scores = (q.float() @ k.float().transpose(1, 2)) * scale
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1), p.max(-1).values.mean(-1)

    ours = median_ms(lambda: ops.head_statistics(q, k, 0, scale=scale, backend="metal"), device, repeats)
    dense = median_ms(matrix, device, repeats)
    return {"op": f"head_statistics_h{heads}_d{head_dim}", "batch": 1, "context": tokens, "dtype": "float16",
            "ours_ms": ours, "matrix_ms": dense}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prefill-contexts", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--statistics-tokens", type=int, nargs="*", default=[2048])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="mps")
    parser.add_argument("--csv", default="bench/results/mps_kernels.csv")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CSV")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    meta = {"date": datetime.date.today().isoformat(), "device": processor(device), "device_type": device.type,
            "torch": torch.__version__, "commit": commit()}
    record = CsvRows(args.csv, meta, args.force).record  # refuses an existing CSV before measuring
    copy_bw = copy_bandwidth(device, args.repeats)

    for batch in args.batches:
        for context in args.contexts:
            record(bench_decode(batch, context, device, copy_bw, args.repeats))
    for context in args.prefill_contexts:
        for sink_size, window_size in ((4, 8), (4, 24), (4, 252)):
            record(bench_prefill(context, sink_size, window_size, device, args.repeats))
    for tokens in args.statistics_tokens:
        record(bench_statistics(tokens, device, min(args.repeats, 10)))
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {meta['device']}; wrote {args.csv}")


if __name__ == "__main__":
    main()
