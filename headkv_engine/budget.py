"""Budget-optimal profiles: every head's sink and window chosen to cover the most attention mass under a
mean budget of kept tokens (seed 004's "learned window allocation" direction).

The analysis records, per head, how its attention mass falls with distance (`distance_mass_log2`: bin 0 is
distance 0, bin i >= 1 distances in [2^(i-1), 2^i)) and on the first tokens (`sink_mass_by_size`, mass on
keys j < s, or the `sink` share of `position_preference` at the analysed sink size). A policy (S, W) covers
about sink_mass(S) + window_mass(W) of a head's attention and costs S + W kept tokens; a full head covers all
of it and costs the context length. The allocation maximises the summed covered mass under
mean(S + W) <= B with a Lagrange multiplier found by bisection: each head independently takes the policy
maximising covered - lambda * cost, and lambda is the smallest for which the mean cost fits the budget; what
that leaves of the budget then goes, greedily, to the upgrades that add the most mass per token.
"""

from __future__ import annotations

import json

import numpy as np

from headkv_engine.profile import HeadPolicy, Profile, ProfileError


def _get(stat, name, default=None):
    if isinstance(stat, dict):
        return stat.get(name, default)
    return getattr(stat, name, default)


def _load(statistics):
    """(list of per-head statistics, model_info dict) from a path, a parsed file, an AnalysisResult or a list."""
    if isinstance(statistics, (str, bytes)) or hasattr(statistics, "__fspath__"):
        with open(statistics, encoding="utf-8") as f:
            statistics = json.load(f)
    if isinstance(statistics, dict):
        return statistics.get("head_statistics", []), statistics.get("model_info", {})
    if hasattr(statistics, "statistics"):
        return list(statistics.statistics), dict(getattr(statistics, "model_info", {}) or {})
    return list(statistics), {}


def head_curves(stat, sink_size: int):
    """(window sizes, window mass) and {sink size: sink mass} of one head."""
    bins = _get(stat, "distance_mass_log2")
    if bins is None:
        raise ProfileError(
            f"distance_mass_log2 (layer {_get(stat, 'layer_idx')}, head {_get(stat, 'head_idx')}): from_budget needs "
            "the distance histogram recorded by headkv_engine.analyze"
        )
    bins = np.asarray(bins, dtype=np.float64)
    # W = 2^k covers bins 0..k exactly; W = 3 * 2^(k-1) also half of bin k + 1 (distances 2^k .. 2^(k+1) - 1),
    # whose mass is taken as spread evenly over its distances.
    windows = np.unique(np.concatenate([2 ** np.arange(len(bins)), 3 * 2 ** np.arange(len(bins) - 1)]))
    lo = np.concatenate([[0], 2 ** np.arange(len(bins) - 1)])  # bin i: distances lo[i] .. hi[i] - 1
    hi = np.concatenate([[1], 2 ** np.arange(1, len(bins))])
    share = np.clip((windows[:, None] - lo[None, :]) / (hi - lo)[None, :], 0.0, 1.0)
    window_mass = np.minimum(share @ bins, 1.0)
    sinks = {0: 0.0}
    by_size = _get(stat, "sink_mass_by_size")
    if by_size:
        sinks.update({int(s): float(m) for s, m in dict(by_size).items()})
    else:
        preference = _get(stat, "position_preference") or {}
        sinks[sink_size] = float(preference.get("sink", _get(stat, "sink_ratio", 0.0)))
    return windows, window_mass, sinks


def allocate(curves, mean_tokens: float, length: int):
    """Per head (S, W, full?) maximising covered mass under mean(S + W) <= mean_tokens."""
    options = []
    for windows, window_mass, sinks in curves:
        head = [(s, int(w), min(1.0, sm + wm), s + int(w)) for s, sm in sinks.items() for w, wm in zip(windows, window_mass)
                if s + w < length]
        head.append((0, None, 1.0, length))  # full
        options.append(head)

    def choose(lam):
        picks = [max(head, key=lambda o: (o[2] - lam * o[3], -o[3])) for head in options]
        return picks, sum(p[3] for p in picks) / len(picks)

    low, high = 0.0, 1.0
    while choose(high)[1] > mean_tokens and high < 1e6:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        if choose(mid)[1] > mean_tokens:
            low = mid
        else:
            high = mid
    picks, cost = choose(high)
    if cost > mean_tokens:
        raise ProfileError(f"mean_tokens: a budget of {mean_tokens} is below the smallest policy of every head")
    return _fill(options, picks, mean_tokens * len(picks) - sum(p[3] for p in picks))


def _fill(options, picks, spare: float):
    """Spend what the Lagrangian solution leaves of the budget: repeatedly take the upgrade of one head that
    fits and adds the most covered mass per extra token."""
    picks = list(picks)
    while True:
        best = None
        for i, head in enumerate(options):
            _, _, mass, cost = picks[i]
            for option in head:
                extra = option[3] - cost
                if 0 < extra <= spare and option[2] > mass + 1e-12:
                    gain = (option[2] - mass) / extra
                    if best is None or gain > best[0]:
                        best = (gain, i, option)
        if best is None:
            return picks
        _, i, option = best
        spare -= option[3] - picks[i][3]
        picks[i] = option


def from_budget(statistics, mean_tokens: float, length: int | None = None, sink_size: int | None = None) -> Profile:
    """The profile covering the most attention mass with at most `mean_tokens` kept tokens per head on average.

    length: the context the budget is planned for (a full head costs this much; default: the longest distance
    the analysis saw); sink_size: sink size of `position_preference` (default: the analysis' own).
    """
    stats, info = _load(statistics)
    if not stats:
        raise ProfileError("statistics: expected per-head statistics (head_statistics.json or hk.analyze(...))")
    if mean_tokens <= 0:
        raise ProfileError(f"mean_tokens: expected a positive budget, got {mean_tokens}")
    sink_size = sink_size or int(info.get("sink_size", 4))
    curves = [head_curves(s, sink_size) for s in stats]
    length = length or int(2 ** (len(curves[0][0]) - 1))
    picks = allocate(curves, mean_tokens, length)
    layers = 1 + max(int(_get(s, "layer_idx")) for s in stats)
    heads = 1 + max(int(_get(s, "head_idx")) for s in stats)
    policies = {}
    for stat, (sink, window, _, _) in zip(stats, picks):
        if window is None:
            policy = HeadPolicy.make("full")
        elif sink > 0:
            policy = HeadPolicy.make("sink_window", sink, window)
        else:
            policy = HeadPolicy.make("window_only", None, window)
        policies[(int(_get(stat, "layer_idx")), int(_get(stat, "head_idx")))] = policy
    profile = Profile(layers, heads, heads=policies,
                      meta={"source": "from_budget", "mean_tokens": mean_tokens, "length": length,
                            "name": f"from_budget_{mean_tokens:g}"})
    return profile
