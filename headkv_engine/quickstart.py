"""A quick start that runs anywhere: a random tiny GPTNeoX, the seed's head mix, full cache vs ragged cache.

It shows the whole engine at work on a model small enough for any CPU: patch, generate, check the tokens
against the full cache where the profile keeps everything, and compare decode time and KV bytes.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from headkv_engine.backends import resolve_backend
from headkv_engine.patching import patch_model
from headkv_engine.profile import HeadPolicy, Profile


def random_gpt_neox(layers=4, heads=8, head_dim=32, vocab=1024, seed=0, *, intermediate_size=None,
                    max_positions=4096, rotary_pct=0.25, initializer_range=0.02,
                    dtype=torch.float32) -> GPTNeoXForCausalLM:
    """A GPTNeoX with random weights (seeded), for examples, tests and benchmarks: no download.

    Generation stops only at max_new_tokens (no end-of-sequence token); padding is token 0.
    """
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size or 4 * heads * head_dim,
        max_position_embeddings=max_positions,
        rotary_pct=rotary_pct,
        initializer_range=initializer_range,
    )
    model = GPTNeoXForCausalLM(config).eval().to(dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def seed_mix_profile(num_layers: int, num_heads: int, head_dim: int | None = None, seed: int = 0) -> Profile:
    """The head mix found on Pythia-2.8b (seed 000): ~35% sink 4 + window 8, ~44% sink 4 + window 24,
    ~1% window 8, ~20% full; heads drawn at random per layer."""
    shares = [
        (0.35, HeadPolicy("sink_window", 4, 8)),
        (0.44, HeadPolicy("sink_window", 4, 24)),
        (0.01, HeadPolicy("window_only", 0, 8)),
        (0.20, HeadPolicy("full")),
    ]
    counts = [round(share * num_heads) for share, _ in shares]
    counts[2] = max(counts[2], 1)  # the rare window-only type keeps at least one head
    counts[1] = num_heads - counts[0] - counts[2] - counts[3]  # the largest group takes the rounding
    policies = [policy for (_, policy), n in zip(shares, counts) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    heads = {}
    for layer in range(num_layers):
        order = torch.randperm(num_heads, generator=gen).tolist()
        for head, index in enumerate(order):
            heads[(layer, head)] = policies[index]
    return Profile(num_layers, num_heads, head_dim, heads=heads, meta={"source": "seed 000 head mix (Pythia-2.8b)"})


@torch.no_grad()
def decode_ms_per_token(model, prompt, new_tokens: int) -> tuple[float, object]:
    """(median ms of a greedy decode step over `new_tokens` steps, the cache) after prefilling `prompt` [B, T].

    One untimed step first (lazy allocations, first-call dispatch); the median, not the mean, so that one step
    preempted on a busy machine does not decide the figure.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    out = model(prompt, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for step in range(new_tokens + 1):
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if step > 0:
            steps.append(time.perf_counter() - start)
    return 1000 * statistics.median(steps), cache


def dense_cache_nbytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def run(context: int = 1024, new_tokens: int = 32, backend: str = "auto") -> dict:
    model = random_gpt_neox()
    shape = model.config
    head_dim = shape.hidden_size // shape.num_attention_heads
    profile = seed_mix_profile(shape.num_hidden_layers, shape.num_attention_heads, head_dim)
    prompt = torch.randint(1, shape.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))

    full_ms, dense = decode_ms_per_token(model, prompt, new_tokens)
    with patch_model(model, Profile.full(shape.num_hidden_layers, shape.num_attention_heads), backend=backend):
        same = model.generate(prompt[:, :64], max_new_tokens=16, do_sample=False)
    reference = model.generate(prompt[:, :64], max_new_tokens=16, do_sample=False)
    with patch_model(model, profile, backend=backend) as handle:
        ragged_ms, ragged = decode_ms_per_token(model, prompt, new_tokens)
        sample = model.generate(prompt[:, :64], max_new_tokens=16, do_sample=False)
    return {
        "backend": resolve_backend(handle.backend, prompt.device),
        "model": f"random GPTNeoX: {shape.num_hidden_layers} layers x {shape.num_attention_heads} heads, "
                 f"head_dim {head_dim}",
        "profile": profile.summary(context)["strategies"],
        "context": context,
        "kv_tokens": dense.get_seq_length(),  # the prompt and the decoded tokens the caches hold when measured
        "full_profile_matches_unpatched": bool(torch.equal(same, reference)),
        "generated": sample[0, 64:].tolist(),
        "dense_kv_bytes": dense_cache_nbytes(dense),
        "ragged_kv_bytes": ragged.nbytes(),
        "dense_ms_per_token": full_ms,
        "ragged_ms_per_token": ragged_ms,
    }


def report(result: dict) -> str:
    share = result["ragged_kv_bytes"] / result["dense_kv_bytes"]
    speed = result["dense_ms_per_token"] / result["ragged_ms_per_token"]
    return "\n".join(
        [
            f"model:    {result['model']}",
            f"profile:  {result['profile']} (seed 000 head mix), backend {result['backend']}",
            f"full-cache profile reproduces the unpatched model: {result['full_profile_matches_unpatched']}",
            f"greedy tokens under the profile: {result['generated']}",
            f"KV bytes at {result['kv_tokens']} tokens ({result['context']}-token prompt + "
            f"{result['kv_tokens'] - result['context']} decoded): dense {result['dense_kv_bytes']:,} | "
            f"ragged {result['ragged_kv_bytes']:,} ({100 * share:.1f}% of dense)",
            f"decode: dense {result['dense_ms_per_token']:.2f} ms/token | ragged {result['ragged_ms_per_token']:.2f} "
            f"ms/token ({speed:.2f}x)",
        ]
    )
