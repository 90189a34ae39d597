"""End-to-end decode: patched (ragged per-head cache) vs unpatched GPTNeoX, measured in one run.

The model has pythia-2.8b attention (hidden 2560, 32 heads of 80) in 2 layers, with a small MLP and vocab
so that attention dominates as it does at long context; the profile is the seed's head mix. For each
context length: prefill once, then time `--new-tokens` greedy decode steps of each model, and compare the
bytes of their KV caches.

    python bench/e2e_decode.py --contexts 2048 4096 8192 16384 --csv bench/results/e2e_decode.csv
    python bench/e2e_decode.py --device cuda --layers 4 --contexts 8192 32768 --csv e2e_decode_cuda.csv
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import transformers
from transformers import GPTNeoXForCausalLM

import headkv_engine as hk
from headkv_engine.backends import resolve_backend
from headkv_engine.files import read_csv, write_csv_atomic
from headkv_engine.provenance import commit, processor
from headkv_engine.quickstart import dense_cache_nbytes, random_gpt_neox, seed_mix_profile


def bench_model(layers: int, max_len: int) -> GPTNeoXForCausalLM:
    return random_gpt_neox(layers, 32, 80, vocab=1024, intermediate_size=1024, max_positions=max_len)


@torch.no_grad()
def time_decode(model, prompt, new_tokens: int, warmup: int = 2):
    """Prefill, then per-token decode times (ms) after `warmup` steps; returns (times, cache)."""
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    out = model(prompt, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(warmup + new_tokens):
        sync()
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        if step >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times, cache


def machine(device) -> str:
    name = processor(device)
    return name if device.type == "cuda" else f"{name}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="model and cache dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--csv", default=None, help="append rows to this CSV file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    model = bench_model(args.layers, max(args.contexts) + args.new_tokens + 8).to(device, dtype)
    profile = seed_mix_profile(args.layers, 32, 80)
    backend = resolve_backend(args.backend, device)
    rows = []
    earlier = read_csv(args.csv) if args.csv and os.path.exists(args.csv) else []  # kept: rows are added
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    for context in args.contexts:
        prompt = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(context)).to(device)
        dense_times, dense_cache = time_decode(model, prompt, args.new_tokens)
        dense_bytes = dense_cache_nbytes(dense_cache)
        del dense_cache
        with hk.patch_model(model, profile, backend=backend):
            ragged_times, ragged_cache = time_decode(model, prompt, args.new_tokens)
        dense_ms, ragged_ms = statistics.median(dense_times), statistics.median(ragged_times)
        rows.append({
            "date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(device),
            "torch": torch.__version__, "transformers": transformers.__version__, "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "layers": args.layers, "context": context, "new_tokens": args.new_tokens,
            "dense_ms_per_token": round(dense_ms, 3), "ragged_ms_per_token": round(ragged_ms, 3),
            "speedup": round(dense_ms / ragged_ms, 3), "dense_kv_bytes": dense_bytes,
            "ragged_kv_bytes": ragged_cache.nbytes(), "kv_fraction": round(ragged_cache.nbytes() / dense_bytes, 4),
        })
        print(rows[-1], flush=True)
        if args.csv:  # rewritten (atomically) after every context: a run cut short keeps what it measured
            write_csv_atomic(args.csv, earlier + rows)
    print(f"\nmachine: {machine(device)}; {rows[0]['dtype']}; torch {torch.__version__}; backend {backend}; "
          f"commit {commit()}\n")
    print("| context | unpatched (sdpa) ms/token | patched ms/token | speedup | "
          "dense KV MB | ragged KV MB | KV fraction |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['dense_ms_per_token']:.1f} | {r['ragged_ms_per_token']:.1f} | "
              f"{r['speedup']:.2f}x | {r['dense_kv_bytes'] / 2**20:.1f} | {r['ragged_kv_bytes'] / 2**20:.1f} | "
              f"{100 * r['kv_fraction']:.1f}% |")


if __name__ == "__main__":
    main()
