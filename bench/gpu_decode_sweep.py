"""Sweep of the Triton decode launch parameters (chunk rows, tile rows, warps, two-pass or fused), pythia-2.8b shape.

The seed's head mix, fp16; each configuration is timed as a CUDA-graph replay.

    python bench/gpu_decode_sweep.py     # CUDA-graph time per configuration, best first
    python bench/gpu_decode_sweep.py --chunks 64 256 1024 --blocks 32 64 --warps 2 4   # a smaller grid (fewer compiles)
"""

import argparse
import itertools

import torch
from gpu_kernels import graph_ms
from kernel_inputs import HEAD_DIM, HEADS, ragged_cache

from headkv_engine.kernel_sources import triton_module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    decode = triton_module("decode").decode_attention
    for batch, context in ((1, 8192), (1, 32768), (8, 8192)):
        k_pool, v_pool, base, kept, _, _ = ragged_cache(batch, context, torch.float16, torch.device("cuda"))
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.float16, device="cuda")
        counters = torch.zeros(batch * HEADS, dtype=torch.int32, device="cuda")  # no memset in the fused graphs
        results = []
        for chunk, block_n, warps, fused in itertools.product(args.chunks, args.blocks, args.warps, (False, True)):
            if block_n > chunk:
                continue
            ms = graph_ms(lambda: decode(q, k_pool, v_pool, base, kept, 0.1, max_length=context, chunk=chunk,
                                         block_n=block_n, num_warps=warps, fused=fused,
                                         counters=counters if fused else None))
            results.append((ms, chunk, block_n, warps, fused))
        results.sort()
        default = graph_ms(lambda: decode(q, k_pool, v_pool, base, kept, 0.1, max_length=context))
        gbps = (k_pool.nbytes + v_pool.nbytes) / 1e9
        print(f"batch {batch} context {context}: default {1000 * default:.1f} us; best "
              + "; ".join(f"{1000 * ms:.1f} us (chunk {c}, block {b}, warps {w}{', fused' if f else ''}, "
                          f"{gbps / (ms * 1e-3):.0f} GB/s)" for ms, c, b, w, f in results[:4]), flush=True)
        for fused in (False, True):
            best = min(r for r in results if r[4] == fused)
            print(f"  best {'fused' if fused else 'two-pass'}: {1000 * best[0]:.1f} us (chunk {best[1]}, block "
                  f"{best[2]}, warps {best[3]}, {gbps / (best[0] * 1e-3):.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
