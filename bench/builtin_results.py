"""Regenerate bench/results/builtin for the shipped built-in model and print the README's headline table.

    python bench/builtin_results.py            # analyse, validate, ablate, then the table (minutes on 2 cores)
    python bench/builtin_results.py --table    # only the table, from the results already there

The analysis reads the first 4 windows of 512 tokens (BOS first: the context the model was trained at) of the
built-in held-out text; the ablation evaluates the 32 windows of 512 tokens after its first 2048 tokens, so no
evaluated token was seen by the analysis that picks the policies. The ablation also has the from_budget_measured
rows, priced by the built-in model's shipped per-layer losses (headkv_engine/zoo/builtin/layer_losses.json,
measured on training documents by `loss_priced_budget.py --training-corpus`).
"""

from __future__ import annotations

import argparse
import json
import os

from builtin_head_types import WINDOW_TOKENS
from builtin_head_types import WINDOWS as ANALYSIS_WINDOWS

from headkv_engine import cli, zoo
from headkv_engine.ablation_report import budget_comparison, ppl_change

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "builtin")
WINDOWS = 32  # evaluated windows of WINDOW_TOKENS, after the analysed ones
EVAL_OFFSET = 2048  # evaluation starts at this token of the text, past the 4 x 511 the analysis read
BUDGETS = (32, 64, 128, 256, 512)
LAYER_LOSSES = zoo.LAYER_LOSSES


def run(argv: list[str]) -> None:
    print("headkv " + " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        raise SystemExit(f"headkv {argv[0]} failed")


def regenerate(out: str, force: bool) -> None:
    analysis = os.path.join(out, "analysis")
    again = ["--force"] if force else []  # existing results are replaced only when asked
    run(["analyze", "--max-tokens", str(WINDOW_TOKENS), "--windows", str(ANALYSIS_WINDOWS), "--output-dir", analysis,
         *again])
    run(["validate", "--results-dir", analysis, *again])
    run(["ablate", "--ablation", "all", "--classifications", os.path.join(analysis, "head_classifications.json"),
         "--statistics", os.path.join(analysis, "head_statistics.json"), "--max-tokens", str(WINDOW_TOKENS),
         "--windows", str(WINDOWS), "--offset", str(EVAL_OFFSET), "--budgets", *map(str, BUDGETS),
         "--layer-losses", LAYER_LOSSES, "--output-dir", out, *again])


def headline_table(results: dict) -> str:
    full = next(c for c in results["configs"] if c["name"] == "full")
    lines = [f"Full cache: PPL {full['perplexity']:.2f} on {results['windows']} held-out windows of "
             f"{results['window_tokens']} tokens ({full['tokens']} predicted tokens).", "",
             "| budget (kept tokens per head) | StreamingLLM (4 sinks + window) PPL | window only PPL | "
             "from_budget PPL | from_budget vs StreamingLLM |"]
    measured = {b: ours for b, ours, _, _ in budget_comparison(results["configs"], "from_budget_measured")}
    if measured:
        lines[-1] += " from_budget, measured layer losses PPL | vs StreamingLLM |"
    lines.append("|---" * (7 if measured else 5) + "|")
    for budget, ours, streaming, window in budget_comparison(results["configs"]):
        if streaming is None:
            continue
        window_ppl = f"{window['perplexity']:.2f}" if window else "-"
        line = (f"| {budget} | {streaming['perplexity']:.2f} | {window_ppl} | {ours['perplexity']:.2f} "
                f"(ctx {ours['effective_context']:.0f}) | {ppl_change(ours, streaming):+.1f}% |")
        if budget in measured:
            line += (f" {measured[budget]['perplexity']:.3f} (ctx {measured[budget]['effective_context']:.0f}) | "
                     f"{ppl_change(measured[budget], streaming):+.2f}% |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print the table from the existing results")
    parser.add_argument("--output-dir", default=OUT)
    parser.add_argument("--force", action="store_true", help="replace the results already in --output-dir")
    args = parser.parse_args()
    if not args.table:
        regenerate(args.output_dir, args.force)
    with open(os.path.join(args.output_dir, "ablation_results.json"), encoding="utf-8") as f:
        print(headline_table(json.load(f)))


if __name__ == "__main__":
    main()
