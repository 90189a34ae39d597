"""Evaluation of 1000 tokens: one masked pass vs token-by-token (stepwise) through the ragged cache.

    python bench/bench_evaluation.py            # the built-in model, StreamingLLM 4 + 60 and a head mix
"""

from __future__ import annotations

import datetime

import torch

import headkv_engine as hk
from headkv_engine import zoo
from headkv_engine.quickstart import seed_mix_profile


def main():
    model, tokenizer = hk.load_builtin_model()
    ids = zoo.encode(tokenizer, zoo.heldout_text(), 1000)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    profiles = {"streaming_llm(4, 60)": hk.Profile.streaming_llm(layers, heads, 4, 60),
                "seed head mix": seed_mix_profile(layers, heads)}
    print(f"{datetime.date.today()}; torch {torch.__version__}; {torch.get_num_threads()} threads; built-in model, "
          f"{ids.numel()} tokens\n")
    print("| profile | one pass s | stepwise s | speedup | PPL one pass | PPL stepwise | relative difference |")
    print("|---|---|---|---|---|---|---|")
    for name, profile in profiles.items():
        hk.evaluate(model, ids[:50], profile)  # warm up
        one = hk.evaluate(model, ids, profile)
        step = hk.evaluate(model, ids, profile, mode="stepwise")
        diff = abs(one.perplexity - step.perplexity) / step.perplexity
        print(f"| {name} | {one.seconds:.2f} | {step.seconds:.2f} | {step.seconds / one.seconds:.1f}x | "
              f"{one.perplexity:.4f} | {step.perplexity:.4f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
