"""Profile.from_budget: respects the budget and covers more attention mass than a uniform window."""

import numpy as np
import pytest

import headkv_engine as hk
from headkv_engine.budget import head_curves

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
    return {"model_info": {"sink_size": 4}, "head_statistics": [kinds[h](layer, h) for layer in range(2) for h in range(4)]}


def covered(profile, stats):
    total = 0.0
    for s in stats["head_statistics"]:
        windows, mass, sinks = head_curves(s, 4)
        p = profile.policy(s["layer_idx"], s["head_idx"])
        if p.strategy == "full":
            total += 1.0
            continue
        w = np.searchsorted(windows, p.window_size, side="right") - 1
        total += min(1.0, mass[w] + sinks.get(p.sink_size, 0.0))
    return total / len(stats["head_statistics"])


@pytest.mark.parametrize("budget", [8, 32, 128, 512])
def test_budget_respected_and_beats_uniform(budget):
    stats = statistics()
    profile = hk.Profile.from_budget(stats, mean_tokens=budget, length=LENGTH)
    assert profile.effective_context(LENGTH) <= budget
    uniform = hk.Profile.streaming_llm(2, 4, sink_size=4, window_size=budget - 4) if budget > 4 else None
    uniform_w = hk.Profile.window_only(2, 4, window_size=budget)
    assert covered(profile, stats) >= covered(uniform_w, stats) - 1e-9
    if uniform is not None:
        assert covered(profile, stats) >= covered(uniform, stats) - 1e-9


def test_allocation_follows_the_heads():
    profile = hk.Profile.from_budget(statistics(), mean_tokens=300, length=LENGTH)
    assert profile.policy(0, 0).kept_tokens(LENGTH) <= 4  # local: a tiny window suffices
    assert profile.policy(0, 1).strategy == "sink_window" and profile.policy(0, 1).sink_size == 4  # the sink head
    broad = profile.policy(0, 2)
    assert broad.kept_tokens(LENGTH) > 64  # the broad head gets the budget
    assert profile.meta["source"] == "from_budget"


def test_missing_distance_histogram_is_a_clear_error():
    with pytest.raises(hk.ProfileError, match="distance_mass_log2"):
        hk.Profile.from_budget([{"layer_idx": 0, "head_idx": 0}], mean_tokens=32)
    with pytest.raises(hk.ProfileError, match="mean_tokens"):
        hk.Profile.from_budget(statistics(), mean_tokens=0)
