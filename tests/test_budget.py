"""Profile.from_budget: respects the budget and keeps the heads' attention closer to full (KL) than a uniform
window, on constructed statistics and on a GPTNeoX whose heads were engineered to known distance profiles."""

import numpy as np
import pytest

import headkv_engine as hk
from headkv_engine.budget import allocate, head_options, kl_divergence

LENGTH = 1024  # 11 log2 bins: distances 0, 1, 2-3, ..., 512-1023


def local_head(layer, head):
    bins = np.zeros(11)
    bins[:3] = [0.5, 0.3, 0.2]  # all mass within distance 3
    return {"layer_idx": layer, "head_idx": head, "distance_mass_log2": bins.tolist(),
            "position_preference": {"sink": 0.0}}


def sink_head(layer, head):
    bins = np.zeros(11)
    bins[:2] = [0.1, 0.1]
    bins[10] = 0.8  # the far past: the first tokens
    return {"layer_idx": layer, "head_idx": head, "distance_mass_log2": bins.tolist(),
            "position_preference": {"sink": 0.8}}


def broad_head(layer, head):
    bins = np.full(11, 1 / 11)
    return {"layer_idx": layer, "head_idx": head, "distance_mass_log2": bins.tolist(),
            "position_preference": {"sink": 0.01}}


def statistics():
    kinds = [local_head, sink_head, broad_head, local_head]
    return {
        "model_info": {"sink_size": 4},
        "head_statistics": [kinds[h](layer, h) for layer in range(2) for h in range(4)],
    }


def divergence(profile, stats):
    """Summed KL divergence -log(covered mass) of the profile's heads from full attention, each policy priced as
    the largest window of the grid it contains."""
    total = 0.0
    for s in stats["head_statistics"]:
        p = profile.policy(s["layer_idx"], s["head_idx"])
        if p.strategy == "full":
            continue
        options = head_options(s, 4, LENGTH)
        total += kl_divergence(max(mass for sink, window, mass, _ in options
                                   if sink == p.sink_size and window is not None and window <= p.window_size))
    return total


@pytest.mark.parametrize("budget", [8, 32, 128, 512])
def test_budget_respected_and_beats_uniform(budget):
    stats = statistics()
    profile = hk.Profile.from_budget(stats, mean_tokens=budget, length=LENGTH)
    assert profile.effective_context(LENGTH) <= budget
    if budget <= 32:  # every head still has mass to gain from a few more tokens: the budget is spent to the token
        assert profile.effective_context(LENGTH) == budget
    uniform = hk.Profile.streaming_llm(2, 4, sink_size=4, window_size=budget - 4) if budget > 4 else None
    uniform_w = hk.Profile.window_only(2, 4, window_size=budget)
    assert divergence(profile, stats) <= divergence(uniform_w, stats) + 1e-9
    if uniform is not None:
        assert divergence(profile, stats) <= divergence(uniform, stats) + 1e-9


def test_allocation_follows_the_heads():
    profile = hk.Profile.from_budget(statistics(), mean_tokens=300, length=LENGTH)
    assert profile.policy(0, 0).kept_tokens(LENGTH) <= 4  # local: a tiny window suffices
    assert profile.policy(0, 1).strategy == "sink_window" and profile.policy(0, 1).sink_size == 4  # the sink head
    broad = profile.policy(0, 2)
    assert broad.kept_tokens(LENGTH) > 64  # the broad head gets the budget
    assert profile.meta["source"] == "from_budget"


@pytest.mark.parametrize("budget", [LENGTH, 2 * LENGTH])
def test_budget_of_the_whole_context_is_the_full_cache(budget):
    profile = hk.Profile.from_budget(statistics(), mean_tokens=budget, length=LENGTH)
    assert all(profile.policy(layer, head).strategy == "full" for layer in range(2) for head in range(4))
    assert profile.effective_context(LENGTH) == LENGTH


def test_allocate_with_another_price_follows_that_price():
    """The third field of an option priced by `price` (here: a loss increase itself) instead of the KL of a
    covered mass: the budget for one full head goes to the head whose window costs the most."""
    budget = (12 + 64 + 12) / 3
    losses = [[(4, 8, loss, 12), (0, None, 0.0, 64)] for loss in (0.1, 1.0, 0.2)]
    assert [p[1] for p in allocate(losses, budget, price=lambda loss: loss)] == [8, None, 8]
    masses = [[(4, 8, mass, 12), (0, None, 1.0, 64)] for mass in (0.9, 0.95, 0.5)]  # the default: KL of the mass
    assert [p[1] for p in allocate(masses, budget)] == [8, 8, None]


def test_budget_for_a_shorter_context_plans_with_what_that_context_sees():
    """Causal attention at position q depends only on tokens <= q: the octaves of a long analysis below `length`
    are the analysis of the first `length` tokens, so from_budget(length=64) plans the same from either."""
    import torch
    from reference_model import tiny_model

    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(3))
    short = hk.analyze(model, ids[:64], chunk_size=32, progress=False)
    long = hk.analyze(model, ids, chunk_size=32, progress=False)
    for a, b in zip(short.statistics, long.statistics):
        assert b.mass_by_query_position[: len(a.mass_by_query_position)] == a.mass_by_query_position
        assert b.distance_mass_log2 != pytest.approx(a.distance_mass_log2 + [0.0] * 2)  # the long one differs
    for budget in (8, 16, 24):
        planned = [hk.Profile.from_budget(r, mean_tokens=budget, length=64) for r in (short, long)]
        assert planned[0].to_dict()["heads"] == planned[1].to_dict()["heads"]


def test_missing_distance_histogram_is_a_clear_error():
    with pytest.raises(hk.ProfileError, match="distance_mass_log2"):
        hk.Profile.from_budget([{"layer_idx": 0, "head_idx": 0}], mean_tokens=32)
    with pytest.raises(hk.ProfileError, match="mean_tokens"):
        hk.Profile.from_budget(statistics(), mean_tokens=0)


# --- a GPTNeoX whose heads have known distance profiles -------------------------------------------------------

BOS = 1


def engineered_model():
    """2 layers x 4 heads of 16 (rotary on 8 dims) whose attention patterns are set by hand, content-free except
    for the sink head: `sink` looks at the BOS token (position 0), `narrow` at distances <= 2, `wide` at distances
    up to about 20, `broad` uniformly at everything. Values, MLPs and the LM head keep their random weights."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    heads, head_dim, hidden = 4, 16, 64
    config = GPTNeoXConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=256, rotary_pct=0.5,
                           use_parallel_residual=True)
    config.rope_parameters["partial_rotary_factor"] = 0.5
    model = GPTNeoXForCausalLM(config).eval()
    body = model.gpt_neox
    with torch.no_grad():
        # Residual dimension 0 marks BOS: only its embedding has it, and no layer writes to it.
        body.embed_in.weight[:, 0] = 0.0
        body.embed_in.weight[BOS].zero_()
        body.embed_in.weight[BOS, 0] = 30.0
        kinds = (["sink", "narrow", "wide", "broad"], ["broad", "sink", "narrow", "wide"])
        for layer, names in zip(body.layers, kinds):
            layer.attention.dense.weight[0] = 0.0
            layer.attention.dense.bias[0] = 0.0
            layer.mlp.dense_4h_to_h.weight[0] = 0.0
            layer.mlp.dense_4h_to_h.bias[0] = 0.0
            qkv_w, qkv_b = layer.attention.query_key_value.weight, layer.attention.query_key_value.bias
            for h, kind in enumerate(names):
                q_rows = slice(3 * head_dim * h, 3 * head_dim * h + head_dim)
                k_rows = slice(q_rows.stop, q_rows.stop + head_dim)
                qkv_w[q_rows] = 0.0
                qkv_w[k_rows] = 0.0
                qkv_b[q_rows] = 0.0
                qkv_b[k_rows] = 0.0
                if kind == "sink":  # non-rotary dim 8: a constant query meets a key only BOS has
                    qkv_b[q_rows.start + 8] = 3.0
                    qkv_w[k_rows.start + 8, 0] = 3.0
                elif kind in ("narrow", "wide"):  # rotary pair (2, 6), frequency 0.01: score a^2 cos(0.01 d) / 4
                    a = 280.0 if kind == "narrow" else 28.0
                    qkv_b[q_rows.start + 2] = a
                    qkv_b[k_rows.start + 2] = a
    return model, kinds


def test_from_budget_on_a_model_with_engineered_heads():
    """On a GPTNeoX whose heads have known distance profiles, the analysis finds them, from_budget follows them,
    and at equal mean budget its outputs are closer to the full cache's than a uniform window's or
    StreamingLLM's (KL of the next-token distributions)."""
    import torch

    model, kinds = engineered_model()
    gen = torch.Generator().manual_seed(1)
    tokens = 128
    ids = torch.cat([torch.tensor([[BOS]]), torch.randint(2, 64, (1, tokens - 1), generator=gen)], 1)
    analysis = hk.analyze(model, ids, progress=False)
    stats = {(s.layer_idx, s.head_idx): s for s in analysis.statistics}
    for layer, names in enumerate(kinds):
        for head, kind in enumerate(names):
            s = stats[(layer, head)]
            if kind == "sink":
                assert s.sink_mass_by_size[1] > 0.8, (layer, head, s.sink_mass_by_size)
            if kind == "narrow":
                assert sum(s.distance_mass_log2[:3]) > 0.95  # distances 0..3
            if kind == "broad":
                assert s.mean_entropy > 3.5

    budget = 16
    profile = hk.Profile.from_budget(analysis, mean_tokens=budget, length=tokens)
    assert profile.effective_context(tokens) <= budget
    for layer, names in enumerate(kinds):
        policies = {kind: profile.policy(layer, head) for head, kind in enumerate(names)}
        assert policies["sink"].sink_size >= 1 and policies["sink"].kept_tokens(tokens) <= 8
        assert policies["narrow"].kept_tokens(tokens) <= 6
        assert policies["broad"].kept_tokens(tokens) > budget  # what the sharp heads leave goes to the broad one

    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits, -1)

    def kl_to_full(p):
        handle = hk.patch_model(model, p, backend="torch")
        try:
            with torch.no_grad():
                logits = torch.log_softmax(model(ids).logits, -1)
        finally:
            handle.unpatch()
        return float(torch.nn.functional.kl_div(logits, full, log_target=True, reduction="none").sum(-1).mean())

    ours = kl_to_full(profile)
    window = kl_to_full(hk.Profile.window_only(2, 4, window_size=budget))
    streaming = kl_to_full(hk.Profile.streaming_llm(2, 4, sink_size=4, window_size=budget - 4))
    assert ours < 0.5 * window and ours < 0.5 * streaming, (ours, window, streaming)


def test_no_sinks_cover_no_sink_mass():
    """sink_size=0: every option is a window, and a window is credited with its distances' mass only (the recorded
    sink mass belongs to the analysis' sink size)."""
    options = head_options(sink_head(0, 0), 0, 1024)
    windows = {window: mass for sink, window, mass, _ in options if window is not None and window <= 2}
    assert all(sink == 0 for sink, *_ in options)
    assert windows[1] == pytest.approx(0.1) and windows[2] == pytest.approx(0.2)
    profile = hk.Profile.from_budget(statistics(), mean_tokens=8, length=1024)
    assert profile.policy(0, 1).sink_size > 0  # with the analysis' sinks, the sink head keeps its sinks
