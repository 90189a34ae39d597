"""Head analysis: hk.analyze vs the seeds' method (output_attentions=True, statistics from the matrices).

A pythia-160m-shaped GPTNeoX (12 layers x 12 heads, hidden 768) with random weights, one sequence of T tokens.
Each method runs in a fresh subprocess, so its peak memory is its own: peak RSS of its first full run minus the
RSS once the model is loaded; its time is the best of `--repeats` warm runs after that. Both report their
statistics, which are compared here.

    python bench/bench_analysis.py --tokens 512 1024 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from headkv_engine import provenance


def model_and_ids(tokens: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25,
                           initializer_range=0.05)
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, 50304, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, ids


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@torch.no_grad()
def seed_method(model, ids, sink_size=4, local_window=8, recent_ratio=0.1):
    """Statistics from materialised attention matrices (the seed's AttentionAnalyzer)."""
    model.config._attn_implementation = "eager"
    attentions = model(ids, output_attentions=True).attentions
    out = []
    tokens = ids.shape[1]
    queries = torch.arange(sink_size + local_window, tokens)
    j = torch.arange(tokens)
    for layer, att in enumerate(attentions):
        p = att[0, :, queries].double()  # [H, Q, T]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        distance = queries[:, None] - j[None, :]
        causal = distance >= 0
        recent_start = queries + 1 - torch.ceil(recent_ratio * (queries + 1).double()).long()
        sink = (j[None, :] < sink_size) & causal
        local = ~sink & causal & (distance < local_window)
        recent = ~sink & ~local & causal & (j[None, :] >= recent_start[:, None])
        for head in range(p.shape[0]):
            out.append({"layer": layer, "head": head, "entropy": entropy[head].mean().item(),
                        "sink": (p[head] * sink).sum(-1).mean().item(),
                        "local": (p[head] * local).sum(-1).mean().item(),
                        "recent": (p[head] * recent).sum(-1).mean().item(),
                        "max": p[head].max(-1).values.mean().item()})
    return out


def ours(model, ids):
    import headkv_engine as hk  # noqa: PLC0415

    result = hk.analyze(model, ids, chunk_size=512, progress=False)
    return [{"layer": s.layer_idx, "head": s.head_idx, "entropy": s.mean_entropy,
             "sink": s.position_preference["sink"], "local": s.position_preference["local"],
             "recent": s.position_preference["recent"], "max": s.max_attention_mean} for s in result.statistics]


def run_one(method: str, tokens: int, repeats: int) -> dict:
    model, ids = model_and_ids(tokens)
    fn = seed_method if method == "seed" else ours
    fn(model, ids[:, :64])  # load kernels
    base = rss_mb()
    fn(model, ids)  # the first full run pays page faults and allocator growth; time the next ones
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        stats = fn(model, ids)
        seconds.append(time.perf_counter() - start)
    return {"method": method, "tokens": tokens, "seconds": min(seconds), "peak_mb": peak - base, "stats": stats}


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{datetime.date.today()}; {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; "
            f"{torch.get_num_threads()} threads; commit {provenance.commit()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per method; the best is reported")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return
    print(machine() + "\n")
    print("| T | output_attentions s | hk.analyze s | speedup | output_attentions peak MB | hk.analyze peak MB | "
          "memory ratio | max stat difference |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        runs = {}
        for method in ("seed", "ours"):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(tokens), "--repeats",
                                  str(args.repeats)], capture_output=True, text=True, check=True)
            runs[method] = json.loads(out.stdout.strip().splitlines()[-1])
        diff = max(abs(a[k] - b[k]) for a, b in zip(runs["seed"]["stats"], runs["ours"]["stats"])
                   for k in ("entropy", "sink", "local", "recent", "max"))
        s, o = runs["seed"], runs["ours"]
        ratio = s["peak_mb"] / max(o["peak_mb"], 1e-9)
        print(f"| {tokens} | {s['seconds']:.2f} | {o['seconds']:.2f} | {s['seconds'] / o['seconds']:.1f}x | "
              f"{s['peak_mb']:.0f} | {o['peak_mb']:.0f} | {ratio:.1f}x | {diff:.1e} |", flush=True)
        if math.isnan(diff):
            raise SystemExit("statistics differ (NaN)")


if __name__ == "__main__":
    main()
