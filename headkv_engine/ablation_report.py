"""Tables and plots of an ablation results file (the layout of seed 004's report).

Everything here reads `ablation_results.json`; nothing is recomputed.
"""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from headkv_engine.files import save_figure, write_text_atomic  # noqa: E402

BUDGET_GROUPS = {"from_budget": "from_budget (KL price)",
                 "from_budget_measured": "from_budget (measured layer losses)"}
COLORS = {"A": "tab:red", "B": "tab:green", "G": "tab:blue", "I": "tab:purple", "J": "tab:orange", "K": "tab:cyan",
          "from_budget": "black", "from_budget_measured": "tab:olive", "head_aware": "tab:brown", "full": "tab:gray"}


def _by_name(results):
    return {c["name"]: c for c in results["configs"]}


def _row(c, baseline=None):
    cells = [c["name"], f"{c['perplexity']:.2f}", f"{100 * c['accuracy']:.2f}%", f"{c['effective_context']:.1f}"]
    if baseline is not None:
        cells.append(f"{100 * (c['perplexity'] / baseline['perplexity'] - 1):+.1f}%")
    return "| " + " | ".join(cells) + " |"


def _table(title, configs, baseline=None):
    if not configs:
        return []
    header = "| config | PPL | accuracy | eff. ctx |" + (" vs " + baseline["name"] + " |" if baseline else "")
    rule = "|---|---|---|---|" + ("---|" if baseline else "")
    return [f"### {title}", "", header, rule] + [_row(c, baseline) for c in configs] + [""]


def pareto_frontier(configs):
    """Configs not beaten by one with both lower effective context and lower perplexity, by context."""
    frontier, best = [], float("inf")
    for c in sorted(configs, key=lambda c: (c["effective_context"], c["perplexity"])):
        if c["perplexity"] < best:
            frontier.append(c)
            best = c["perplexity"]
    return frontier


def markdown(results) -> str:
    configs = [c for c in results["configs"] if c["name"] != "full"]
    named = _by_name(results)
    # PPL and accuracy are over the predicted tokens: every token of a window but its first
    windows = results.get("windows", 1)
    predicted = results["configs"][0]["tokens"] if results["configs"] else results["tokens"] - windows
    lines = [f"# Ablation study: {results['model']}", "",
             f"{predicted} predicted tokens ({results['tokens']} tokens in {windows} window"
             f"{'s' if windows != 1 else ''}, each window's first token not predicted); "
             f"commit {results['configs'][0]['commit'] if configs else '?'}. "
             "PPL = perplexity, eff. ctx = mean per-head budget (S+W, W, T or 0).", ""]
    if "full" in named:
        lines += _table("Full cache", [named["full"]])
    control = []
    for budget in (512, 256, 128, 64):
        control += [named[n] for n in (f"A_window_{budget}", f"B_streaming_{budget}") if n in named]
    lines += _table("Control groups (sink tokens)", control)
    for target in (64, 128):
        near = [c for c in configs if 0.85 * target <= c["effective_context"] <= 1.2 * target]
        baseline = named.get(f"B_streaming_{target}")
        lines += _table(f"~{target} context", sorted(near, key=lambda c: c["perplexity"]), baseline)
    inverse = [c for c in configs if c["group"] == "I"] + [named[n] for n in ("B_streaming_256",) if n in named]
    lines += _table("Inverse experiment (group I)", inverse)
    for group, title in BUDGET_GROUPS.items():
        budget_rows = budget_comparison(configs, group)
        if not budget_rows:
            continue
        lines += [f"### {title} vs StreamingLLM at equal budget", "",
                  f"| budget | {group} PPL | eff. ctx | StreamingLLM PPL | difference |", "|---|---|---|---|---|"]
        for _, c, s, _ in budget_rows:
            diff = f"{ppl_change(c, s):+.1f}%" if s else "n/a"
            lines.append(f"| {c['name'].rsplit('_', 1)[1]} | {c['perplexity']:.2f} | {c['effective_context']:.1f} | "
                         f"{s['perplexity']:.2f} | {diff} |" if s else
                         f"| {c['name']} | {c['perplexity']:.2f} | {c['effective_context']:.1f} | n/a | n/a |")
        lines.append("")
    lines += _table("Best configurations", sorted(configs, key=lambda c: c["perplexity"])[:8])
    lines += _table("Pareto frontier (no config has both lower context and lower PPL)", pareto_frontier(configs))
    return "\n".join(lines)


def budget_comparison(configs, group: str = "from_budget") -> list[tuple]:
    """(budget, config, B_streaming config or None, A_window config or None) for every config of `group`
    (from_budget or from_budget_measured), in the order of `configs`."""
    named = {c["name"]: c for c in configs}
    rows = []
    for c in configs:
        if c["group"] == group:
            budget = int(c["name"].rsplit("_", 1)[1])
            rows.append((budget, c, named.get(f"B_streaming_{budget}"), named.get(f"A_window_{budget}")))
    return rows


def ppl_change(config, baseline) -> float:
    """Perplexity of `config` relative to `baseline`, in percent."""
    return 100 * (config["perplexity"] / baseline["perplexity"] - 1)


def plot_ppl_vs_context(results, path):
    configs = [c for c in results["configs"] if c["name"] != "full"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for group in sorted({c["group"] for c in configs}):
        pts = sorted((c for c in configs if c["group"] == group), key=lambda c: c["effective_context"])
        style = "-o" if group in ("A", "B", *BUDGET_GROUPS) else "o"
        ax.plot([c["effective_context"] for c in pts], [c["perplexity"] for c in pts], style,
                color=COLORS.get(group), label=group, alpha=0.85)
    frontier = pareto_frontier(configs)
    ax.plot([c["effective_context"] for c in frontier], [c["perplexity"] for c in frontier], "--", color="gray",
            label="Pareto frontier")
    full = _by_name(results).get("full")
    if full:
        ax.axhline(full["perplexity"], color="gray", linestyle=":", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective context (mean kept tokens per head)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity vs effective context — {results['model']}")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def plot_sink_importance(results, path):
    named = _by_name(results)
    budgets = [b for b in (64, 128, 256, 512) if f"A_window_{b}" in named and f"B_streaming_{b}" in named]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(budgets))
    ax.bar([i - 0.2 for i in x], [named[f"A_window_{b}"]["perplexity"] for b in budgets], 0.4,
           label="A: window only", color=COLORS["A"])
    ax.bar([i + 0.2 for i in x], [named[f"B_streaming_{b}"]["perplexity"] for b in budgets], 0.4,
           label="B: 4 sinks + window", color=COLORS["B"])
    ax.set_xticks(list(x), [str(b) for b in budgets])
    ax.set_xlabel("budget (kept tokens per head)")
    ax.set_ylabel("perplexity")
    ax.set_title("Sink tokens: window only vs StreamingLLM")
    ax.legend()
    save_figure(fig, path, dpi=120)


def plot_confidence_threshold(results, path):
    configs = [c for c in results["configs"] if c["group"] == "G"]
    named = _by_name(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, base in zip(axes, (128, 64)):
        pts = sorted(((float(re.match(r"G_conf([0-9.]+)_", c["name"]).group(1)), c) for c in configs
                      if c["name"].endswith(f"_base{base}")), key=lambda t: t[0])
        ax.plot([t for t, _ in pts], [c["perplexity"] for _, c in pts], "-o", color=COLORS["G"], label="G (confidence)")
        if f"B_streaming_{base}" in named:
            ax.axhline(named[f"B_streaming_{base}"]["perplexity"], color=COLORS["B"], linestyle="--",
                       label=f"B_streaming_{base}")
        ax.set_xlabel("confidence threshold")
        ax.set_ylabel("perplexity")
        ax.set_title(f"base window {base}")
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def plot_best_configs(results, path, top=10):
    configs = sorted((c for c in results["configs"] if c["name"] != "full"), key=lambda c: c["perplexity"])[:top]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(configs) + 1.5))
    names = [f"{c['name']} (ctx {c['effective_context']:.0f})" for c in configs][::-1]
    ax.barh(names, [c["perplexity"] for c in configs][::-1], color=[COLORS.get(c["group"]) for c in configs][::-1])
    ax.set_xlabel("perplexity")
    ax.set_title("Best configurations")
    save_figure(fig, path, dpi=120)


def plot_inverse(results, path):
    configs = sorted((c for c in results["configs"] if c["group"] in ("I", "J", "K")), key=lambda c: c["perplexity"])
    named = _by_name(results)
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(configs), 1) + 1.5))
    ax.barh([f"{c['name']} (ctx {c['effective_context']:.0f})" for c in configs][::-1],
            [c["perplexity"] for c in configs][::-1], color=[COLORS.get(c["group"]) for c in configs][::-1])
    for budget, style in ((128, "--"), (256, ":")):
        if f"B_streaming_{budget}" in named:
            ax.axvline(named[f"B_streaming_{budget}"]["perplexity"], color=COLORS["B"], linestyle=style,
                       label=f"B_streaming_{budget}")
    ax.set_xlabel("perplexity")
    ax.set_title("Windows per head type (groups I, J, K)")
    if ax.get_legend_handles_labels()[0]:  # the StreamingLLM lines are drawn only when those budgets were run
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def write_report(results, output_dir) -> list[str]:
    """ablation_report.md and the five plots; returns the files written."""
    figures = {
        "ppl_vs_context.png": plot_ppl_vs_context,
        "sink_importance.png": plot_sink_importance,
        "confidence_threshold.png": plot_confidence_threshold,
        "best_configs.png": plot_best_configs,
        "inverse_experiment.png": plot_inverse,
    }
    written = []
    for name, draw in figures.items():
        draw(results, os.path.join(output_dir, name))
        written.append(name)
    report = markdown(results) + "\n## Figures\n\n" + "\n".join(f"![{n}]({n})" for n in written) + "\n"
    write_text_atomic(os.path.join(output_dir, "ablation_report.md"), report)
    return [*written, "ablation_report.md"]
