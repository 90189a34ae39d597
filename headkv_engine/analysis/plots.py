"""Figures of an analysis (seed 000's list), drawn from HeadStatistics / HeadClassification only (Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from headkv_engine.analysis.classify import Thresholds  # noqa: E402
from headkv_engine.files import save_figure  # noqa: E402
from headkv_engine.ops.statistics import REGIONS  # noqa: E402

TYPE_COLORS = {
    "sink_positional": "tab:blue", "true_positional": "tab:cyan", "sink_mixed": "tab:green", "gathering": "tab:red",
    "mixed": "tab:gray", "dead": "black", "positional": "tab:blue",
}


def _grid(statistics, value):
    layers = 1 + max(s.layer_idx for s in statistics)
    heads = 1 + max(s.head_idx for s in statistics)
    grid = np.full((layers, heads), np.nan)
    for s in statistics:
        grid[s.layer_idx, s.head_idx] = value(s)
    return grid


def _ticks(ax, layers, heads):
    step_h = max(1, heads // 16)
    step_l = max(1, layers // 16)
    ax.set_xticks(range(0, heads, step_h))
    ax.set_yticks(range(0, layers, step_l))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


def _heatmap(statistics, value, title, label, path, cmap="viridis", vmin=None, vmax=None):
    grid = _grid(statistics, value)
    layers, heads = grid.shape
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.32 * heads), min(12, 2 + 0.3 * layers)))
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if layers * heads <= 144:  # small models: the values too
        middle = np.nanmean(grid)
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < middle else "black")
    _ticks(ax, layers, heads)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    save_figure(fig, path)


def entropy_heatmap(statistics, path):
    _heatmap(statistics, lambda s: s.mean_entropy, "Mean attention entropy (low = focused)", "entropy (nats)", path)


def sink_ratio_analysis(statistics, path):
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, title in ((axes[0], "sink", "Attention on the first tokens (sink ratio)"),
                           (axes[1], "local", "Attention on the last tokens (local ratio)")):
        grid = _grid(statistics, lambda s, k=key: s.position_preference[k])
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        _ticks(ax, *grid.shape)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="share of attention")
    save_figure(fig, path)


def position_preference(statistics, path):
    """Stacked sink / local / recent / global shares of every head; rows of about 256 heads for big models."""
    grids = {region: _grid(statistics, lambda s, r=region: s.position_preference[r]) for region in REGIONS}
    layers, heads = grids["sink"].shape
    per_row = max(1, 256 // heads)  # layers per row
    rows = -(-layers // per_row)
    width = min(20, 4 + 0.05 * heads * min(per_row, layers))
    fig, axes = plt.subplots(rows, 1, figsize=(width, 1.2 + 2.4 * rows), squeeze=False)
    colors = {"sink": "tab:blue", "local": "tab:orange", "recent": "tab:green", "global": "tab:gray"}
    for row, ax in enumerate(axes[:, 0]):
        first, last = row * per_row, min(layers, (row + 1) * per_row)
        bottom = np.zeros((last - first) * heads)
        for region in REGIONS:
            values = np.nan_to_num(grids[region][first:last].ravel())
            ax.bar(np.arange(values.size), values, bottom=bottom, width=1.0, color=colors[region],
                   label=region if row == 0 else None)
            bottom += values
        for layer in range(1, last - first):
            ax.axvline(layer * heads - 0.5, color="white", linewidth=1.0)
        step = max(1, (last - first) // 16)
        ax.set_xticks([(layer - first) * heads + (heads - 1) / 2 for layer in range(first, last, step)],
                      [f"L{layer}" for layer in range(first, last, step)])
        ax.set_xlim(-0.5, (last - first) * heads - 0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share")
    axes[-1, 0].set_xlabel(f"heads 0..{heads - 1} of each layer, layer by layer")
    axes[0, 0].set_title("Where each head attends: sink / local / recent / global")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    save_figure(fig, path)


def relative_position_heatmap(statistics, path):
    order = sorted(statistics, key=lambda s: (s.layer_idx, s.head_idx))
    matrix = np.array([s.relative_position_dist for s in order])
    heads = 1 + max(s.head_idx for s in order)
    layers = len(order) // heads
    fig, ax = plt.subplots(figsize=(10, min(14, 3 + 0.1 * len(order))))
    image = ax.imshow(np.log10(np.maximum(matrix, 1e-6)), aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=-6, vmax=0)
    for layer in range(1, layers):
        ax.axhline(layer * heads - 0.5, color="white", linewidth=0.6)
    ax.axvline(62.5, color="white", linewidth=0.6)
    step = max(1, layers // 16)
    ax.set_yticks([layer * heads + (heads - 1) / 2 for layer in range(0, layers, step)],
                  [f"L{layer}" for layer in range(0, layers, step)])
    ax.set_xticks([0, 8, 16, 32, 48, 63], ["0", "8", "16", "32", "48", ">=63"])
    ax.set_xlabel("distance to the query (tokens)")
    ax.set_ylabel(f"heads (0..{heads - 1} within each layer)")
    ax.set_title("Attention mass by relative position, one row per head (log10)")
    fig.colorbar(image, ax=ax, label="log10 mean mass", fraction=0.04, pad=0.02)
    save_figure(fig, path)


def head_clustering(statistics, path, clusters: int = 4):
    from scipy.cluster.vq import kmeans2  # noqa: PLC0415

    features = np.array([[s.mean_entropy, s.position_preference["sink"], s.position_preference["local"],
                          s.position_preference["recent"], s.max_attention_mean] for s in statistics])
    scaled = (features - features.mean(0)) / (features.std(0) + 1e-9)
    k = max(1, min(clusters, len(statistics)))
    _, labels = kmeans2(scaled, k, seed=0, minit="++")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for cluster in range(k):
        members = labels == cluster
        axes[0].scatter(features[members, 0], features[members, 1], s=14, color=f"C{cluster}",
                        label=f"cluster {cluster} ({members.sum()})")
    axes[0].set_xlabel("mean entropy (nats)")
    axes[0].set_ylabel("sink ratio")
    axes[0].set_title("Heads clustered on entropy, sink / local / recent share, max attention")
    axes[0].legend(fontsize=8)
    cluster_of = {(s.layer_idx, s.head_idx): label for s, label in zip(statistics, labels)}
    grid = _grid(statistics, lambda s: cluster_of[(s.layer_idx, s.head_idx)])
    cmap = matplotlib.colors.ListedColormap([f"C{i}" for i in range(k)])
    image = axes[1].imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
    _ticks(axes[1], *grid.shape)
    axes[1].set_title("Cluster of each head")
    fig.colorbar(image, ax=axes[1], label="cluster", ticks=range(k))
    save_figure(fig, path)


def analysis_figures(statistics, output_dir) -> list[str]:
    figures = {
        "entropy_heatmap.png": entropy_heatmap,
        "position_preference.png": position_preference,
        "sink_ratio_analysis.png": sink_ratio_analysis,
        "head_clustering.png": head_clustering,
        "relative_position_heatmap.png": relative_position_heatmap,
    }
    for name, draw in figures.items():
        draw(statistics, os.path.join(output_dir, name))
    return list(figures)


def _by_type(statistics, classifications):
    """{head type: [HeadStatistics of its heads]}, types sorted by name."""
    kinds = {(c.layer_idx, c.head_idx): c.head_type for c in classifications}
    groups = {}
    for s in statistics:
        groups.setdefault(kinds[(s.layer_idx, s.head_idx)], []).append(s)
    return dict(sorted(groups.items()))


def relative_position_by_type(statistics, classifications, path, thresholds):
    fig, ax = plt.subplots(figsize=(9, 5))
    for kind, rows in _by_type(statistics, classifications).items():
        mean = np.array([s.relative_position_dist for s in rows]).mean(0)
        color = TYPE_COLORS.get(kind)
        ax.plot(range(63), mean[:63], label=f"{kind} ({len(rows)})", color=color)
        ax.plot([63], mean[63:], "o", color=color)
    ax.axvline(62.5, color="black", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([0, 8, 16, 32, 48, 63], ["0", "8", "16", "32", "48", ">=63"])
    ax.set_xlabel("distance to the query (tokens; the dot: all distances >= 63)")
    ax.set_ylabel("mean attention mass")
    ax.set_title("Relative-position profile by head type")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def sink_vs_local_scatter(statistics, classifications, path, thresholds):
    fig, ax = plt.subplots(figsize=(7, 6))
    for kind, pts in _by_type(statistics, classifications).items():
        ax.scatter([s.position_preference["sink"] for s in pts], [s.position_preference["local"] for s in pts], s=14,
                   label=f"{kind} ({len(pts)})", color=TYPE_COLORS.get(kind))
    ax.axvline(thresholds.sink, color="black", linestyle="--", linewidth=0.8)
    ax.axhline(thresholds.local, color="black", linestyle=":", linewidth=0.8)
    ax.text(thresholds.sink, 0.98, f" sink {thresholds.sink}", va="top", fontsize=8)
    ax.text(0.98, thresholds.local, f"local {thresholds.local} ", ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("sink ratio")
    ax.set_ylabel("local ratio")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Sink vs local attention per head")
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path)


def entropy_by_type(statistics, classifications, path, thresholds):
    groups = _by_type(statistics, classifications)
    data = [[s.mean_entropy for s in rows] for rows in groups.values()]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.boxplot(data, showfliers=False)
    jitter = np.random.default_rng(0)
    for i, (kind, values) in enumerate(zip(groups, data), start=1):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=6, alpha=0.5, color=TYPE_COLORS.get(kind))
    for value in (thresholds.low_entropy, thresholds.high_entropy):
        ax.axhline(value, color="black", linestyle="--", linewidth=0.8)
        ax.text(len(data) + 0.45, value, f"{value}", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(1, len(data) + 1), [f"{n}\n({len(d)})" for n, d in zip(groups, data)])
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title("Entropy by head type (dashed: the entropy thresholds)")
    save_figure(fig, path)


def validation_figures(statistics, classifications, output_dir, thresholds=None) -> list[str]:
    figures = {
        "relative_position_by_type.png": relative_position_by_type,
        "sink_vs_local_scatter.png": sink_vs_local_scatter,
        "entropy_by_type.png": entropy_by_type,
    }
    for name, draw in figures.items():
        draw(statistics, classifications, os.path.join(output_dir, name), thresholds or Thresholds())
    return list(figures)
