"""decode_attention microbenchmark on the CPU: cpu and torch backends vs SDPA over a dense cache.

pythia-2.8b head shape (32 heads of 80), batch 1, the seed's head mix (11 heads sink 4 + window 8,
14 sink 4 + window 24, 1 window 8, 6 full), contexts 1k-16k, fp32 and bf16.

    pytest bench/bench_decode_attention.py --benchmark-only          # pytest-benchmark statistics
    python bench/bench_decode_attention.py                           # the markdown table of RESULTS.md

(`pytest` alone does not collect this file: testpaths is tests/.) The table also gives the time to read the
kept K/V once at the machine's copy bandwidth, measured in the same run: bandwidth = bytes read per second by
`Tensor.copy_` of a 256 MiB buffer (larger than the caches; each byte read is also written once, so this is
half the bytes moved per second). "hot" times repeat the call on the same cache, which then sits in the CPU's
caches when it fits (the 8k fp32 K/V of this mix is 30 MB, the L3 of the machine below 32 MB); "cold" times
first stream a 256 MiB buffer through the caches, as a decode step of a deep model finds them.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import pytest
import torch

from headkv_engine import ops, provenance
from headkv_engine.backends import load_cpu_extension
from headkv_engine.quickstart import seed_mix_profile

HEADS, HEAD_DIM = 32, 80
CONTEXTS = [1024, 2048, 4096, 8192, 16384]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLUSH_BYTES = 2**28


def setup(context: int, dtype=torch.float32, seed: int = 0):
    """Callables per provider over the same query and kept K/V; plus the kept bytes."""
    gen = torch.Generator().manual_seed(seed)
    sink, window, _ = seed_mix_profile(1, HEADS, HEAD_DIM).layer_tensors(0)
    kept = torch.minimum(torch.tensor(context), sink + window).expand(1, HEADS).contiguous()
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view(1, HEADS)
    rows = int(capacity.sum())
    k_pool, v_pool = (torch.randn(rows, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(1, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_dense, v_dense = (torch.randn(1, HEADS, context, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    scale = HEAD_DIM**-0.5
    providers = {
        "cpu": lambda: ops.decode_attention(q, k_pool, v_pool, base, kept, scale=scale, backend="cpu"),
        "torch": lambda: ops.decode_attention(q, k_pool, v_pool, base, kept, scale=scale, backend="torch"),
        "sdpa_dense": lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense),
    }
    return providers, k_pool.nbytes + v_pool.nbytes


def copy_read_bandwidth(repeats: int = 10) -> float:
    """Bytes read per second by a large copy (each byte read is also written once)."""
    src = torch.ones(FLUSH_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.nbytes / statistics.median(times)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("provider", ["cpu", "torch", "sdpa_dense"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_attention(benchmark, provider, context, dtype):
    providers, kept_bytes = setup(context, DTYPES[dtype])
    benchmark.extra_info.update(kept_kv_bytes=kept_bytes, heads=HEADS, head_dim=HEAD_DIM)
    benchmark(providers[provider])


def median_ms(fn, repeats: int = 30, flush: torch.Tensor | None = None) -> float:
    """Median wall time of fn(); with `flush`, a buffer larger than the caches is rewritten before each call."""
    fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main():
    ext, reason = load_cpu_extension()
    if ext is None:
        raise SystemExit(f"backend 'cpu' is unavailable: {reason}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    flush = torch.zeros(FLUSH_BYTES // 4)
    print(f"Machine: {machine()}; torch {torch.__version__}; kernels: {ext.cpu_isa()} build; "
          f"{datetime.date.today()}; commit {provenance.commit()}; load average before the run {load:.2f}.")
    print("Copy BW: bytes read per second by a 256 MiB Tensor.copy_, measured just before each row's timings.\n")
    print("| dtype | context | cpu hot ms | cpu cold ms | torch ms | SDPA dense ms | SDPA / cpu hot | SDPA / cpu cold "
          "| kept K/V MB | copy BW GB/s | read at copy BW ms | cpu hot / read | cpu cold / read |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name, dtype in DTYPES.items():
        for context in CONTEXTS:
            providers, kept_bytes = setup(context, dtype)
            bandwidth = copy_read_bandwidth(repeats=5)
            ms = {name: median_ms(fn, repeats=10 if name == "torch" else 30) for name, fn in providers.items()}
            cold = median_ms(providers["cpu"], flush=flush)
            read_ms = 1000 * kept_bytes / bandwidth
            print(f"| {dtype_name} | {context} | {ms['cpu']:.3f} | {cold:.3f} | {ms['torch']:.2f} | "
                  f"{ms['sdpa_dense']:.3f} | {ms['sdpa_dense'] / ms['cpu']:.1f}x | {ms['sdpa_dense'] / cold:.1f}x | "
                  f"{kept_bytes / 2**20:.1f} | {bandwidth / 1e9:.1f} | {read_ms:.3f} | {ms['cpu'] / read_ms:.2f} | "
                  f"{cold / read_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
