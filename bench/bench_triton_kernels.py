"""Triton kernel microbenchmarks on CUDA with pytest-benchmark: ours vs the dense torch baseline, one session.

pythia-2.8b attention (32 heads of 80), fp16, the seed's head mix. Decode at 8k context (batch 1 and 8): the
two-pass and the one-launch split-K launch vs SDPA over the dense cache; windowed prefill (sink 4 + window 24)
at 8k vs dense causal SDPA. Each round synchronises the device, so a time is the kernels plus their launch.

    pytest bench/bench_triton_kernels.py --benchmark-only --benchmark-group-by=param:case

Skips without CUDA. (`pytest` alone does not collect this file: testpaths is tests/.)
"""

from __future__ import annotations

import pytest
import torch

from headkv_engine import ops
from headkv_engine.kernel_sources import triton_module
from headkv_engine.quickstart import seed_mix_profile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HEADS, HEAD_DIM, CONTEXT = 32, 80, 8192


def decode_providers(batch):
    sink, window, _ = seed_mix_profile(1, HEADS, HEAD_DIM).layer_tensors(0, device="cuda")
    kept = torch.minimum(torch.tensor(CONTEXT, device="cuda"), sink + window).expand(batch, HEADS).contiguous()
    base = (torch.cumsum(kept.flatten(), 0) - kept.flatten()).view(batch, HEADS)
    rows = int(kept.sum())
    k_pool, v_pool = (torch.randn(rows, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    k_dense, v_dense = (torch.randn(batch, HEADS, CONTEXT, HEAD_DIM, device="cuda", dtype=torch.float16)
                        for _ in range(2))
    launch = triton_module("decode").decode_attention
    scale = HEAD_DIM**-0.5
    return {
        "ours": lambda: launch(q, k_pool, v_pool, base, kept, scale, max_length=CONTEXT),
        "ours_fused": lambda: launch(q, k_pool, v_pool, base, kept, scale, max_length=CONTEXT, fused=True),
        "sdpa_dense": lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense),
    }


def prefill_providers():
    q, k, v = (torch.randn(1, HEADS, CONTEXT, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
    positions = torch.arange(CONTEXT, device="cuda")[None]
    empty = torch.zeros(0, HEAD_DIM, device="cuda", dtype=torch.float16)
    none = torch.zeros(1, HEADS, dtype=torch.long, device="cuda")
    sink, window = torch.full((HEADS,), 4, device="cuda"), torch.full((HEADS,), 24, device="cuda")
    args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long, device="cuda"), none, none, sink, window)
    return {
        "ours": lambda: ops.prefill_attention(*args, scale=HEAD_DIM**-0.5, backend="triton"),
        "sdpa_dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


CASES = {"decode_8k_batch1": lambda: decode_providers(1), "decode_8k_batch8": lambda: decode_providers(8),
         "prefill_8k_sink4_window24": prefill_providers}


@pytest.mark.parametrize("provider", ["ours", "ours_fused", "sdpa_dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel(benchmark, case, provider):
    providers = CASES[case]()
    if provider not in providers:
        pytest.skip(f"{case} has no {provider} variant")
    fn = providers[provider]
    fn()  # compile and autotune outside the timed rounds
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, iterations=5, warmup_rounds=3)
