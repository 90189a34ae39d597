"""Figures of an analysis (seed 000's list), drawn from HeadStatistics / HeadClassification only (Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
    order = sorted(statistics, key=lambda s: (s.layer_idx, s.head_idx))
    n = len(order)
    fig, ax = plt.subplots(figsize=(min(20, 4 + 0.03 * n), 4.5))
    bottom = np.zeros(n)
    colors = {"sink": "tab:blue", "local": "tab:orange", "recent": "tab:green", "global": "tab:gray"}
    for region in REGIONS:
        values = np.array([s.position_preference[region] for s in order])
        ax.bar(range(n), values, bottom=bottom, width=1.0, color=colors[region], label=region)
        bottom += values
    heads = 1 + max(s.head_idx for s in order)
    layers = n // heads
    step = max(1, layers // 16)
    ax.set_xticks([layer * heads for layer in range(0, layers, step)], [f"L{layer}" for layer in range(0, layers, step)])
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("heads, layer by layer")
    ax.set_ylabel("share of attention")
    ax.set_title("Where each head attends: sink / local / recent / global")
    ax.legend(loc="upper right", ncol=4, fontsize=8)
    save_figure(fig, path)


def relative_position_heatmap(statistics, path):
    order = sorted(statistics, key=lambda s: (s.layer_idx, s.head_idx))
    matrix = np.array([s.relative_position_dist for s in order])
    fig, ax = plt.subplots(figsize=(10, min(14, 3 + 0.012 * len(order) * 8)))
    image = ax.imshow(np.log10(matrix + 1e-6), aspect="auto", cmap="viridis", interpolation="nearest")
    heads = 1 + max(s.head_idx for s in order)
    layers = len(order) // heads
    step = max(1, layers // 16)
    ax.set_yticks([layer * heads for layer in range(0, layers, step)], [f"L{layer}" for layer in range(0, layers, step)])
    ax.set_xticks([0, 8, 16, 32, 48, 63], ["0", "8", "16", "32", "48", ">=63"])
    ax.set_xlabel("distance to the query (tokens)")
    ax.set_ylabel("heads, layer by layer")
    ax.set_title("Attention mass by relative position (log10)")
    fig.colorbar(image, ax=ax, label="log10 mass")
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
        axes[0].scatter(features[members, 0], features[members, 1], s=14, label=f"cluster {cluster} ({members.sum()})")
    axes[0].set_xlabel("mean entropy (nats)")
    axes[0].set_ylabel("sink ratio")
    axes[0].set_title("Heads clustered on entropy, sink / local / recent share, max attention")
    axes[0].legend(fontsize=8)
    grid = _grid(statistics, lambda s: labels[statistics.index(s)])
    image = axes[1].imshow(grid, aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    _ticks(axes[1], *grid.shape)
    axes[1].set_title("Cluster of each head")
    fig.colorbar(image, ax=axes[1], label="cluster")
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


def relative_position_by_type(statistics, classifications, path):
    kinds = {(c.layer_idx, c.head_idx): c.head_type for c in classifications}
    fig, ax = plt.subplots(figsize=(9, 5))
    for kind in sorted(set(kinds.values())):
        rows = np.array([s.relative_position_dist for s in statistics if kinds[(s.layer_idx, s.head_idx)] == kind])
        ax.plot(rows.mean(0), label=f"{kind} ({len(rows)})", color=TYPE_COLORS.get(kind))
    ax.set_yscale("log")
    ax.set_xlabel("distance to the query (bin 63: >= 63)")
    ax.set_ylabel("mean attention mass")
    ax.set_title("Relative-position profile by head type")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def sink_vs_local_scatter(statistics, classifications, path):
    kinds = {(c.layer_idx, c.head_idx): c.head_type for c in classifications}
    fig, ax = plt.subplots(figsize=(7, 6))
    for kind in sorted(set(kinds.values())):
        pts = [s for s in statistics if kinds[(s.layer_idx, s.head_idx)] == kind]
        ax.scatter([s.position_preference["sink"] for s in pts], [s.position_preference["local"] for s in pts], s=14,
                   label=f"{kind} ({len(pts)})", color=TYPE_COLORS.get(kind))
    ax.set_xlabel("sink ratio")
    ax.set_ylabel("local ratio")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Sink vs local attention per head")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def entropy_by_type(statistics, classifications, path):
    kinds = {(c.layer_idx, c.head_idx): c.head_type for c in classifications}
    names = sorted(set(kinds.values()))
    data = [[s.mean_entropy for s in statistics if kinds[(s.layer_idx, s.head_idx)] == k] for k in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n({len(d)})" for n, d in zip(names, data)])
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title("Entropy by head type")
    save_figure(fig, path)


def validation_figures(statistics, classifications, output_dir) -> list[str]:
    figures = {
        "relative_position_by_type.png": relative_position_by_type,
        "sink_vs_local_scatter.png": sink_vs_local_scatter,
        "entropy_by_type.png": entropy_by_type,
    }
    for name, draw in figures.items():
        draw(statistics, classifications, os.path.join(output_dir, name))
    return list(figures)
