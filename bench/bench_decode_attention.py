"""decode_attention microbenchmark on the CPU: cpu and torch backends vs SDPA over a dense cache.

pythia-2.8b head shape (32 heads of 80), batch 1, the seed's head mix (11 heads sink 4 + window 8,
14 sink 4 + window 24, 1 window 8, 6 full), contexts 1k-16k.

    pytest bench/bench_decode_attention.py --benchmark-only          # pytest-benchmark statistics
    python bench/bench_decode_attention.py                           # the markdown table of RESULTS.md

The table also gives the time to read the kept K/V once at the machine's copy bandwidth, measured in the same
run: bandwidth = bytes read per second by `Tensor.copy_` of a 256 MiB buffer (larger than the caches).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time

import pytest
import torch

from headkv_engine import ops
from headkv_engine.quickstart import seed_mix_profile

HEADS, HEAD_DIM = 32, 80
CONTEXTS = [1024, 2048, 4096, 8192, 16384]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    src = torch.empty(2**28 // 4)
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


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def main():
    bandwidth = copy_read_bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"Machine: {machine()}; torch {torch.__version__}; {datetime.date.today()}; commit {commit or 'uncommitted'}.")
    print(f"Copy bandwidth (bytes read per second by a 256 MiB Tensor.copy_): {bandwidth / 1e9:.1f} GB/s.\n")
    print("| dtype | context | cpu ms | torch ms | SDPA dense ms | cpu vs SDPA | kept K/V MB | read at copy BW ms | cpu / read time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name, dtype in DTYPES.items():
        for context in CONTEXTS:
            providers, kept_bytes = setup(context, dtype)
            ms = {name: median_ms(fn) for name, fn in providers.items()}
            read_ms = 1000 * kept_bytes / bandwidth
            print(f"| {dtype_name} | {context} | {ms['cpu']:.3f} | {ms['torch']:.3f} | {ms['sdpa_dense']:.3f} | "
                  f"{ms['sdpa_dense'] / ms['cpu']:.1f}x | {kept_bytes / 2**20:.1f} | {read_ms:.3f} | "
                  f"{ms['cpu'] / read_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
