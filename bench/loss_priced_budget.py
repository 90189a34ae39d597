"""Budget allocation priced by each head's measured loss increase instead of the KL of its dropped attention.

    python bench/loss_priced_budget.py [--force]     # ~9 minutes on 2 cores

On the built-in model: every head alone is switched to each policy of a grid (sinks 0 / 4 / 16, windows 16-384)
and the rise of the mean next-token loss over the full cache is measured on the 4 analysis windows (the
calibration text); those losses then price the allocation of `from_budget` (budget.allocate with another
price). Every profile is evaluated on the 32 evaluation windows of bench/builtin_results.py, beside
StreamingLLM and the KL-priced `from_budget`. Also measured: StreamingLLM 4 + 252 on one layer at a time, the
rest full, which shows where StreamingLLM's gain over the full cache at 256 comes from; and the allocation
priced by per-layer losses (every head of one layer at 4 sinks + window, 6 x 7 evaluations), shared among its heads.

Writes bench/results/builtin/loss_priced_budget.json and prints the tables of bench/RESULTS.md.

    python bench/loss_priced_budget.py --training-corpus /work/train_builtin/train.jsonl [--force]   # ~3 minutes

instead measures the per-layer losses on 16 windows of training documents (`train_builtin.py corpus`), chooses
the KL weight on 16 windows of other training documents, and evaluates only the chosen weight on the evaluation
windows (bench/results/builtin/layer_priced_budget_training.json): no evaluated text picks anything. The losses
are written to headkv_engine/zoo/builtin/layer_losses.json, the calibration shipped with the built-in model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random

from builtin_head_types import WINDOW_TOKENS
from builtin_head_types import WINDOWS as CALIBRATION_WINDOWS
from builtin_results import BUDGETS, EVAL_OFFSET, OUT
from builtin_results import WINDOWS as EVAL_WINDOWS
from tqdm.auto import tqdm

from headkv_engine import loading, zoo
from headkv_engine.analysis.layer_loss import WINDOWS as GRID_WINDOWS  # the windows `headkv calibrate` measures
from headkv_engine.analysis.layer_loss import measure_layer_losses
from headkv_engine.budget import allocate, head_options, kl_divergence
from headkv_engine.evaluation import evaluate
from headkv_engine.profile import HeadPolicy, Profile, write_json_atomic

SINKS = (0, 4, 16)
KL_WEIGHT = 0.01  # nats of loss per nat of KL: what a measured loss of 0 still costs by the attention it drops
LAYER_KL_WEIGHTS = (0.003, 0.01, 0.03)
SELECTION_KL_WEIGHTS = (0.001, 0.003, 0.01, 0.03, 0.1)
TRAINING_WINDOWS = 16  # windows of training text for the per-layer losses, and as many again to choose the weight
TRAINING_DOCUMENTS = 60  # random training documents per text (their first 6000 characters), disjoint


def mean_loss(model, windows, profile) -> float:
    return evaluate(model, windows, profile).nll


def measure_head_losses(model, windows) -> dict:
    """{(layer, head): {(sink, window): loss increase over the full cache}}, each head changed alone."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    full = mean_loss(model, windows, Profile.full(layers, heads))
    losses = {}
    for layer, head in tqdm([(l, h) for l in range(layers) for h in range(heads)], desc="heads"):
        losses[layer, head] = {
            (sink, window): mean_loss(model, windows,
                                      Profile(layers, heads, heads={(layer, head): HeadPolicy.keeping(sink, window)}))
            - full for sink in SINKS for window in GRID_WINDOWS}
    return losses


def priced_profile(options: list, statistics: list, budget: int, layers: int, heads: int) -> Profile:
    """The profile of the allocation of `options`, whose third field is already the price."""
    picks = allocate(options, budget, price=lambda loss: loss)
    return Profile(layers, heads, heads={(int(st["layer_idx"]), int(st["head_idx"])): HeadPolicy.keeping(s, w)
                                        for st, (s, w, _, _) in zip(statistics, picks)})


def loss_priced_profile(losses: dict, statistics: list, budget: int, layers: int, heads: int, kl_weight: float,
                        clip: bool) -> Profile:
    """Allocate under `budget` with each option priced by its measured loss (clipped at 0 when `clip`: a head
    that predicts better without part of its context earns nothing for it) plus kl_weight * its KL."""
    options = []
    for stat in statistics:
        key = (int(stat["layer_idx"]), int(stat["head_idx"]))
        kl = {(s, w): kl_divergence(mass) for s, w, mass, _ in head_options(stat, 4, WINDOW_TOKENS)}
        head = [(s, w, (max(loss, 0.0) if clip else loss) + kl_weight * kl[s, w], s + w)
                for (s, w), loss in losses[key].items()]
        options.append(head + [(0, None, 0.0, WINDOW_TOKENS)])
    return priced_profile(options, statistics, budget, layers, heads)


def training_texts(corpus: str, tokenizer) -> tuple[list, list]:
    """Two disjoint sets of TRAINING_WINDOWS windows from random training documents (seed 0)."""
    with open(corpus, encoding="utf-8") as f:
        documents = [json.loads(line)["text"] for line in f]
    random.Random(0).shuffle(documents)
    texts = ["\n\n".join(d[:6000] for d in documents[k * TRAINING_DOCUMENTS:(k + 1) * TRAINING_DOCUMENTS])
             for k in range(2)]
    return tuple(loading.encode_windows(tokenizer, t, WINDOW_TOKENS, TRAINING_WINDOWS, builtin=True) for t in texts)


def training_text_protocol(model, tokenizer, corpus, statistics_file, held_out, output,
                           write_calibration=False) -> None:
    """Per-layer losses and the KL weight from training text; the evaluation windows only evaluate."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    calibration, selection = training_texts(corpus, tokenizer)
    layer_losses = measure_layer_losses(model, calibration)
    budgets = [b for b in BUDGETS if b < WINDOW_TOKENS]

    def ppl(profile, windows):
        return evaluate(model, windows, profile).perplexity

    def rows(windows, weights):
        out = {"StreamingLLM (4 sinks + window)": [ppl(Profile.streaming_llm(layers, heads, 4, b - 4), windows)
                                                   for b in budgets],
               "from_budget (KL of dropped attention)": [
                   ppl(Profile.from_budget(statistics_file, b, length=WINDOW_TOKENS), windows) for b in budgets]}
        for weight in weights:
            out[f"measured loss per layer + {weight:g} x KL"] = [
                ppl(Profile.from_budget(statistics_file, b, length=WINDOW_TOKENS, layer_losses=layer_losses,
                                        kl_weight=weight), windows) for b in budgets]
        return out

    selection_rows = rows(selection, SELECTION_KL_WEIGHTS)
    # the weight with the lowest mean log-PPL over the budgets on the selection text
    chosen = min(SELECTION_KL_WEIGHTS,
                 key=lambda w: sum(map(math.log, selection_rows[f"measured loss per layer + {w:g} x KL"])))
    evaluated = rows(held_out, (chosen,))
    # the losses on their own: the built-in model's shipped calibration (`headkv demo`, `headkv ablate --layer-losses`),
    # replaced only when asked (--write-calibration)
    if write_calibration:
        write_json_atomic(zoo.LAYER_LOSSES,
                          {**layer_losses, "model": loading.BUILTIN, "kl_weight": chosen,
                           "text": f"{TRAINING_WINDOWS} windows of {TRAINING_DOCUMENTS} random training documents "
                                   f"(seed 0) of {os.path.basename(corpus)}"})
    write_json_atomic(output, {"model": loading.BUILTIN, "budgets": budgets, "corpus": os.path.basename(corpus),
                               "chosen_kl_weight": chosen, "selection_perplexity": selection_rows,
                               "evaluation_perplexity": evaluated,
                               "layer_losses": layer_losses})
    for title, table in (("selection text (training documents)", selection_rows), ("evaluation windows", evaluated)):
        print(f"\n| {title} | " + " | ".join(f"{b} tokens" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for name, values in table.items():
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print(f"\nchosen KL weight: {chosen:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="results JSON (default: under bench/results/builtin)")
    parser.add_argument("--training-corpus", help="train.jsonl of train_builtin.py corpus: calibrate on training text")
    parser.add_argument("--write-calibration", action="store_true",
                        help="with --training-corpus: also replace the shipped headkv_engine/zoo/builtin/"
                             "layer_losses.json (needs --force, since it exists)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing results file")
    args = parser.parse_args()
    if args.write_calibration and not args.training_corpus:
        raise SystemExit("--write-calibration: the calibration comes from --training-corpus; pass it")
    if args.write_calibration and os.path.exists(zoo.LAYER_LOSSES) and not args.force:
        raise SystemExit(f"{zoo.LAYER_LOSSES} exists; pass --force with --write-calibration to replace it")
    name = "layer_priced_budget_training.json" if args.training_corpus else "loss_priced_budget.json"
    output = args.output or os.path.join(OUT, name)
    if os.path.exists(output) and not args.force:
        raise SystemExit(f"{output} exists; pass --force to overwrite it")
    statistics_file = os.path.join(OUT, "analysis", "head_statistics.json")
    with open(statistics_file, encoding="utf-8") as f:
        statistics = json.load(f)["head_statistics"]

    model, tokenizer, _ = loading.load_model(loading.BUILTIN)
    text = zoo.heldout_text()
    calibration = loading.encode_windows(tokenizer, text, WINDOW_TOKENS, CALIBRATION_WINDOWS, builtin=True)
    held_out = loading.encode_windows(tokenizer, text, WINDOW_TOKENS, EVAL_WINDOWS, builtin=True, offset=EVAL_OFFSET)
    if args.training_corpus:
        training_text_protocol(model, tokenizer, args.training_corpus, statistics_file, held_out, output,
                               write_calibration=args.write_calibration)
        return
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    losses = measure_head_losses(model, calibration)
    layer_losses = measure_layer_losses(model, calibration)

    def ppl(profile, windows=held_out):
        return evaluate(model, windows, profile).perplexity

    budgets = [b for b in BUDGETS if b < WINDOW_TOKENS]
    rows = {
        "StreamingLLM (4 sinks + window)": [ppl(Profile.streaming_llm(layers, heads, 4, b - 4)) for b in budgets],
        "from_budget (KL of dropped attention)": [ppl(Profile.from_budget(statistics_file, b, length=WINDOW_TOKENS))
                                                  for b in budgets],
        "measured loss": [ppl(loss_priced_profile(losses, statistics, b, layers, heads, 0.0, clip=False))
                          for b in budgets],
        f"measured loss clipped at 0 + {KL_WEIGHT:g} x KL": [
            ppl(loss_priced_profile(losses, statistics, b, layers, heads, KL_WEIGHT, clip=True)) for b in budgets],
    }
    for weight in LAYER_KL_WEIGHTS:
        rows[f"measured loss per layer + {weight:g} x KL"] = [
            ppl(Profile.from_budget(statistics_file, b, length=WINDOW_TOKENS, layer_losses=layer_losses,
                                    kl_weight=weight)) for b in budgets]
    by_layer = {}
    for which, windows in (("calibration", calibration), ("evaluation", held_out)):
        full = mean_loss(model, windows, Profile.full(layers, heads))
        by_layer[which] = [1000 * (mean_loss(model, windows, Profile(
            layers, heads, heads={(layer, h): HeadPolicy.keeping(4, 252) for h in range(heads)})) - full)
            for layer in range(layers)]
    results = {"model": loading.BUILTIN, "budgets": budgets, "full_perplexity": ppl(Profile.full(layers, heads)),
               "perplexity": rows, "streaming_256_one_layer_millinats": by_layer,
               "layer_losses": layer_losses,
               "head_losses": {f"{l},{h}": {f"{s},{w}": v for (s, w), v in options.items()}
                               for (l, h), options in losses.items()}}
    write_json_atomic(output, results)

    print("| allocation | " + " | ".join(f"{b} tokens" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print("\n| StreamingLLM 4 + 252 on layer | " + " | ".join(str(layer) for layer in range(layers)) + " |")
    print("|---|" + "---|" * layers)
    for which, values in by_layer.items():
        print(f"| loss change, {which} (millinats) | " + " | ".join(f"{v:+.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
