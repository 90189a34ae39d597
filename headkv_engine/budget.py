"""Budget-optimal profiles: every head's sink and window chosen to cover the most attention mass under a
mean budget of kept tokens (seed 004's "learned window allocation" direction).

The analysis records, per head, how its attention mass falls with distance (`distance_mass_log2`: bin 0 is
distance 0, bin i >= 1 distances in [2^(i-1), 2^i)) and on the first tokens (`sink_mass_by_size`, mass on
keys j < s), overall and by octave of query positions (`mass_by_query_position`). A policy (S, W) costs S + W
kept tokens and covers, of the queries a context of `length` tokens has, all the mass of those at q < S + W
and sink_mass(S) + window_mass(W) of the later ones; a full head covers all of it and costs `length`.

Mass is counted on a log scale: a head that keeps `c` of its attention mass attends to its kept keys with the
full probabilities divided by c, a KL divergence of -log(c) from its full attention. The allocation minimises
the summed divergence under mean(S + W) <= B with a Lagrange multiplier found by bisection: each head
independently takes the policy minimising divergence + lambda * cost, and lambda is the smallest for which the
mean cost fits the budget; what that leaves of the budget then goes, greedily, to the upgrades that lower the
divergence the most per token.
"""

from __future__ import annotations

import math

import numpy as np

from headkv_engine.analysis.layer_loss import layer_loss, load_layer_losses
from headkv_engine.analysis.statistics import nulls_as_nan
from headkv_engine.files import read_json
from headkv_engine.profile import HeadPolicy, Profile, ProfileError


def _get(stat, name, default=None):
    if isinstance(stat, dict):
        return stat.get(name, default)
    return getattr(stat, name, default)


def _load(statistics):
    """(list of per-head statistics, model_info dict) from a path, a parsed file, an AnalysisResult or a list."""
    if isinstance(statistics, (str, bytes)) or hasattr(statistics, "__fspath__"):
        statistics = read_json(statistics, error=ProfileError)
        if isinstance(statistics, dict) and isinstance(statistics.get("head_statistics"), list):
            # a non-finite statistic is written as null: read it back as NaN, as load_statistics does
            statistics["head_statistics"] = [nulls_as_nan(s) if isinstance(s, dict) else s
                                             for s in statistics["head_statistics"]]
    if isinstance(statistics, dict):
        return statistics.get("head_statistics", []), statistics.get("model_info", {})
    if hasattr(statistics, "statistics"):
        return list(statistics.statistics), dict(getattr(statistics, "model_info", {}) or {})
    return list(statistics), {}


def _window_grid(bins: int) -> np.ndarray:
    """Window sizes 2^k and 3 * 2^k that the log2 histogram of `bins` bins can price."""
    return np.unique(np.concatenate([2 ** np.arange(bins), 3 * 2 ** np.arange(bins - 1)]))


def _window_mass(histogram, windows: np.ndarray) -> np.ndarray:
    """Mass at distances < W for every window W of `windows`, from a log2 distance histogram.

    W = 2^k covers bins 0..k exactly; W = 3 * 2^(k-1) also half of bin k + 1 (distances 2^k .. 2^(k+1) - 1),
    whose mass is taken as spread evenly over its distances."""
    bins = np.asarray(histogram, dtype=np.float64)
    lo = np.concatenate([[0], 2 ** np.arange(len(bins) - 1)])  # bin i: distances lo[i] .. hi[i] - 1
    hi = np.concatenate([[1], 2 ** np.arange(1, len(bins))])
    share = np.clip((windows[:, None] - lo[None, :]) / (hi - lo)[None, :], 0.0, 1.0)
    return np.minimum(share @ bins, 1.0)


def _sink_mass(stat, sink_size: int) -> dict:
    """{sink size: mass on the first sink size keys}, 0 included."""
    sinks = {0: 0.0}
    by_size = _get(stat, "sink_mass_by_size")
    if by_size:
        sinks.update({int(s): float(m) for s, m in dict(by_size).items()})
    elif sink_size > 0:  # (no sinks cover nothing: the recorded sink mass is that of the analysis' sink size)
        preference = _get(stat, "position_preference") or {}
        sinks[sink_size] = float(preference.get("sink", _get(stat, "sink_ratio", 0.0)))
    return sinks


def head_options(stat, sink_size: int, length: int) -> list[tuple]:
    """Every policy one head can take for a context of `length` tokens: (sink, window or None for full,
    covered mass, cost in kept tokens).

    With `mass_by_query_position` (what the analysis records), the mass is taken over the queries a context of
    `length` tokens has: a query at q < S + W keeps every key (covered 1), a later one covers the sink mass
    plus the window mass of its octave (disjoint there). Without it, sink plus window mass of all queries."""
    histogram = _get(stat, "distance_mass_log2")
    if histogram is None:
        raise ProfileError(
            f"distance_mass_log2 (layer {_get(stat, 'layer_idx')}, head {_get(stat, 'head_idx')}): from_budget needs "
            "the distance histogram recorded by headkv_engine.analyze"
        )
    windows = _window_grid(len(histogram))
    sinks = _sink_mass(stat, sink_size)
    octaves = [o for o in (_get(stat, "mass_by_query_position") or []) if o["positions"][0] < length]
    if octaves:
        covered = _covered_by_octave(octaves, windows, sorted(sinks), length)
    else:
        window_mass = _window_mass(histogram, windows)
        covered = np.minimum(1.0, np.array([[sinks[s] + m for m in window_mass] for s in sorted(sinks)]))
    options = [(s, int(w), float(covered[i, k]), s + int(w)) for i, s in enumerate(sorted(sinks))
               for k, w in enumerate(windows) if s + w < length]
    options.append((0, None, 1.0, length))  # full
    return options


def _covered_by_octave(octaves: list, windows: np.ndarray, sink_sizes: list, length: int) -> np.ndarray:
    """Covered mass [sink size, window] over the analysed queries at positions < length, octave by octave
    (queries taken as spread evenly over an octave's positions)."""
    low = np.array([o["positions"][0] for o in octaves], dtype=np.float64)
    high = np.minimum([o["positions"][1] for o in octaves], length).astype(np.float64)
    weight = np.array([o["num_queries"] for o in octaves], dtype=np.float64) * (high - low) / (
        np.array([o["positions"][1] for o in octaves], dtype=np.float64) - low)
    window_mass = np.stack([_window_mass(o["distance_mass_log2"], windows) for o in octaves])  # [O, W]
    by_size = [{int(s): float(m) for s, m in o["sink_mass_by_size"].items()} for o in octaves]  # JSON: str keys
    sink_mass = np.array([[0.0 if s == 0 else sizes.get(s, np.nan) for s in sink_sizes] for sizes in by_size])
    if np.isnan(sink_mass).any():
        raise ProfileError(f"mass_by_query_position: every octave needs sink_mass_by_size for sizes {sink_sizes[1:]}")
    kept = np.array(sink_sizes, dtype=np.float64)[:, None] + windows[None, :]  # S + W: [S, W]
    # share of an octave's queries at q < S + W, which keep every key
    whole = np.clip((kept[None] - low[:, None, None]) / (high - low)[:, None, None], 0.0, 1.0)  # [O, S, W]
    partial = np.minimum(1.0, sink_mass[:, :, None] + window_mass[:, None, :])
    covered = whole + (1.0 - whole) * partial
    return np.tensordot(weight, covered, axes=1) / weight.sum()


# Coverage below this counts as this (a head that keeps nothing it attends to); log(1e-6) = -13.8.
MIN_COVERED = 1e-6


def kl_divergence(covered: float) -> float:
    """KL(kept || full) of an attention row that keeps `covered` of its mass: the kept keys' probabilities are
    the full ones divided by `covered`, so the divergence is -log(covered)."""
    return -math.log(max(covered, MIN_COVERED))


def allocate(options: list[list[tuple]], mean_tokens: float, price=kl_divergence) -> list[tuple]:
    """Per head, the option of `options` (head_options) minimising the summed KL divergence of the heads' kept
    attention from their full attention, -log(covered mass), under mean(cost) <= mean_tokens. (A plain sum of
    covered mass would starve heads whose last percents are cheap for another head to buy: the divergence
    grows without bound as a head's coverage falls.)

    price: what an option's third field costs (default: the KL divergence of that covered mass); any other
    measure of harm per option, e.g. a measured loss increase, allocates the same way."""

    def choose(lam):
        picks = [min(head, key=lambda o: (price(o[2]) + lam * o[3], o[3])) for head in options]
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
    return _fill(options, picks, mean_tokens * len(picks) - sum(p[3] for p in picks), price)


def _fill(options, picks, spare: float, price):
    """Spend what the Lagrangian solution leaves of the budget: repeatedly take the upgrade of one head that
    fits and lowers the divergence the most per extra token."""
    picks = list(picks)
    while True:
        best = None
        for i, head in enumerate(options):
            _, _, mass, cost = picks[i]
            for option in head:
                extra = option[3] - cost
                gain = price(mass) - price(option[2])
                if 0 < extra <= spare and gain > 1e-12 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, i, option)
        if best is None:
            return picks
        _, i, option = best
        spare -= option[3] - picks[i][3]
        picks[i] = option


# What a nat of KL divergence costs beside measured layer losses: chosen on training text of the built-in model
# (bench/loss_priced_budget.py --training-corpus), never on evaluated text.
LAYER_LOSS_KL_WEIGHT = 0.003


def loss_priced(options: list[list[tuple]], stats: list, layer_losses: dict, heads: int, kl_weight: float) -> list:
    """Options whose third field is a price: the measured loss of the head's layer at that window (see
    analysis.layer_loss), shared evenly among the layer's heads, plus kl_weight x the KL of the dropped mass."""
    priced = []
    for stat, head in zip(stats, options):
        layer = int(_get(stat, "layer_idx"))
        priced.append([(s, w, 0.0 if w is None else layer_loss(layer_losses, layer, w) / heads
                        + kl_weight * kl_divergence(mass), cost) for s, w, mass, cost in head])
    return priced


def from_budget(statistics, mean_tokens: float, length: int | None = None, sink_size: int | None = None,
                layer_losses=None, kl_weight: float = LAYER_LOSS_KL_WEIGHT) -> Profile:
    """The profile covering the most attention mass with at most `mean_tokens` kept tokens per head on average.

    length: the context the budget is planned for (a full head costs this much; default: the longest distance
    the analysis saw); sink_size: sink size of `position_preference` (default: the analysis' own).
    layer_losses: measured per-layer losses (`headkv calibrate`, a path or its dict): options are then priced by
    what their layer's truncation costs the model's loss plus kl_weight x their KL, instead of by the KL alone.
    """
    stats, info = _load(statistics)
    if not stats:
        raise ProfileError("statistics: expected per-head statistics (head_statistics.json or hk.analyze(...))")
    if mean_tokens <= 0:
        raise ProfileError(f"mean_tokens: expected a positive budget, got {mean_tokens}")
    sink_size = int(info.get("sink_size", 4)) if sink_size is None else sink_size
    length = length or int(2 ** (len(_get(stats[0], "distance_mass_log2") or [1]) - 1))
    options = [head_options(s, sink_size, length) for s in stats]
    layers = 1 + max(int(_get(s, "layer_idx")) for s in stats)
    heads = 1 + max(int(_get(s, "head_idx")) for s in stats)
    if layer_losses is not None:
        layer_losses = load_layer_losses(layer_losses)
        if len(layer_losses["loss_increase"]) != layers:
            raise ProfileError(f"layer_losses: expected one row per layer of the analysed model ({layers}), got "
                               f"{len(layer_losses['loss_increase'])} (model {layer_losses.get('model')!r})")
        if kl_weight < 0:
            raise ProfileError(f"kl_weight: expected >= 0, got {kl_weight}")
    if mean_tokens >= length:  # the full cache fits: keep it (the histograms cannot see mass below their resolution)
        picks = [(0, None, 1.0, length)] * len(stats)
    elif layer_losses is None:
        picks = allocate(options, mean_tokens)
    else:
        picks = allocate(loss_priced(options, stats, layer_losses, heads, kl_weight), mean_tokens,
                         price=lambda price: price)
    policies = {(int(_get(stat, "layer_idx")), int(_get(stat, "head_idx"))): HeadPolicy.keeping(sink, window)
                for stat, (sink, window, _, _) in zip(stats, picks)}
    profile = Profile(layers, heads, heads=policies,
                      meta={"source": "from_budget", "mean_tokens": mean_tokens, "length": length,
                            "name": f"from_budget_{mean_tokens:g}",
                            "price": "kl" if layer_losses is None else f"layer_loss + {kl_weight:g} x kl"})
    return profile
