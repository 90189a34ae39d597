"""`headkv demo`: the whole pipeline on one model, offline, in minutes, ending in a report a person can read.

analyse every head on held-out text -> classify -> build profiles (StreamingLLM, head-aware, from_budget at
several budgets, priced by attention KL and, given per-layer losses (shipped with the built-in model, or from
`headkv calibrate`), by measured loss) -> evaluate perplexity / accuracy / effective context against the full
cache -> measure decode speed and KV bytes -> figures -> report.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch
from tqdm.auto import tqdm

from headkv_engine import __version__, loading, zoo
from headkv_engine.ablation_report import BUDGET_GROUPS, budget_comparison, pareto_frontier, plot_ppl_vs_context
from headkv_engine.analysis import analyze, classify, save_classifications, write_analysis
from headkv_engine.analysis.layer_loss import load_layer_losses
from headkv_engine.evaluation import evaluate
from headkv_engine.files import write_text_atomic
from headkv_engine.patching import patch_model
from headkv_engine.profile import Profile, write_json_atomic
from headkv_engine.quickstart import decode_ms_per_token, dense_cache_nbytes


def _decode_speed(model, prompt, new_tokens, profile=None, backend="auto"):
    """(ms per decoded token, KV bytes allocated, KV bytes kept) of greedy decoding after `prompt`, with or without
    a profile (the dense cache allocates what it keeps)."""
    if profile is None:
        ms, cache = decode_ms_per_token(model, prompt[None], new_tokens)
        return ms, dense_cache_nbytes(cache), dense_cache_nbytes(cache)
    with patch_model(model, profile, backend=backend):
        ms, cache = decode_ms_per_token(model, prompt[None], new_tokens)
    return ms, cache.nbytes(), cache.kept_nbytes()


def run_demo(output_dir, model_id="builtin", text_file=None, analysis_tokens=2048, eval_tokens=512, eval_windows=4,
             budgets=(32, 64, 128, 256), decode_context=1024, new_tokens=32, backend="auto",
             layer_losses=None) -> dict:
    """layer_losses: a `headkv calibrate` file (or dict) for the measured-loss from_budget rows; None: the built-in
    model's shipped calibration for the built-in model, none for another model."""
    began = time.perf_counter()
    # every input is checked before the first result is written
    budgets = tuple(budgets)
    if not budgets or any(not 4 < b < eval_tokens for b in budgets):
        raise ValueError(f"--budgets: every budget must exceed the 4 StreamingLLM sinks and be below --eval-tokens "
                         f"({eval_tokens}; a budget of the whole window compresses nothing), got {list(budgets)}")
    for folder in ("analysis", "profiles"):  # --force cleans only real folders; nothing is written through a link
        if os.path.islink(os.path.join(output_dir, folder)):
            raise ValueError(f"--output-dir: {os.path.join(output_dir, folder)!r} is a link; the demo writes its "
                             f"{folder}/ itself: remove the link or use another --output-dir")
    model, tokenizer, name = loading.load_model(model_id)
    text = loading.load_text(text_file, None)
    builtin = model_id == loading.BUILTIN
    if layer_losses is None and builtin:
        layer_losses = zoo.LAYER_LOSSES
    if layer_losses is not None:  # a file of another model is refused here, not after the analysis
        layer_losses = load_layer_losses(layer_losses, num_layers=model.config.num_hidden_layers)
    prompt = loading.encode(tokenizer, text, decode_context, builtin=builtin)  # for the decode timing
    # the analysis reads windows of the evaluated length (at least one) from the start of the text; the
    # evaluation windows come right after them, so no evaluated token was analysed
    analysis_windows = max(1, analysis_tokens // eval_tokens)
    analysis_ids = loading.encode_windows(tokenizer, text, eval_tokens, analysis_windows, builtin=builtin,
                                          flags=("--eval-tokens", "--analysis-tokens"))
    eval_offset = analysis_windows * loading.window_step(eval_tokens, builtin)
    eval_ids = loading.encode_windows(tokenizer, text, eval_tokens, eval_windows, builtin=builtin,
                                      offset=eval_offset, flags=("--eval-tokens", "--eval-windows"))
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    steps = tqdm(total=6, desc="demo", unit="step")
    # an earlier run's results of other budgets must not pass for this run's (prepare_output_dir has already
    # refused a non-empty directory without --force)
    loading.remove_outputs(output_dir, loading.OUTPUTS["demo"])
    steps.set_postfix_str("analysis")

    # 1. analyse and classify the heads on the analysis windows: the heads are measured at the context the
    # profiles are planned and evaluated for
    analysis_dir = os.path.join(output_dir, "analysis")
    result = analyze(model, analysis_ids, chunk_size=512, backend=backend, model_name=name, progress=False)
    write_analysis(result, analysis_dir)
    classifications = classify(result.statistics)
    steps.update()

    # 2. profiles: full, StreamingLLM and from_budget at each budget, head-aware from the classification
    profiles = {"full": ("full", Profile.full(layers, heads))}
    for budget in budgets:
        profiles[f"B_streaming_{budget}"] = ("B", Profile.streaming_llm(layers, heads, 4, budget - 4))
        profiles[f"from_budget_{budget}"] = ("from_budget", Profile.from_budget(result.statistics, budget,
                                                                                 length=eval_tokens))
        if layer_losses is not None:
            profiles[f"from_budget_measured_{budget}"] = ("from_budget_measured", Profile.from_budget(
                result.statistics, budget, length=eval_tokens, layer_losses=layer_losses))
    cls_path = os.path.join(analysis_dir, "head_classifications.json")
    save_classifications(classifications, cls_path)
    profiles["head_aware"] = ("head_aware", Profile.from_classifications(cls_path))
    os.makedirs(os.path.join(output_dir, "profiles"), exist_ok=True)
    for config_name, (_, profile) in profiles.items():
        profile.save(os.path.join(output_dir, "profiles", f"{config_name}.json"))
    steps.update()

    # 3. evaluate every profile on the evaluation windows (one masked pass each)
    configs = []
    evaluation_began = time.perf_counter()
    for config_name, (group, profile) in tqdm(profiles.items(), desc="evaluate", leave=False):
        r = evaluate(model, eval_ids, profile, backend=backend)
        configs.append({"name": config_name, "group": group, "perplexity": r.perplexity, "accuracy": r.accuracy,
                        "effective_context": r.effective_context, "tokens": r.tokens,
                        "kv_fraction": profile.summary(eval_tokens)["kv_fraction"]})
    evaluation_seconds = time.perf_counter() - evaluation_began
    steps.update()

    # 4. decode speed and KV bytes at `decode_context` tokens: full cache vs the head-aware and budget profiles
    speed = {"full": _decode_speed(model, prompt, new_tokens)}
    for config_name in ("head_aware", f"from_budget_{budgets[len(budgets) // 2]}", f"from_budget_{budgets[0]}"):
        speed[config_name] = _decode_speed(model, prompt, new_tokens, profiles[config_name][1], backend)
    steps.update()

    # 5. figures and the results file
    results = {"format": "headkv-demo/1", "model": name, "tokens": configs[0]["tokens"], "windows": len(eval_ids),
               "window_tokens": eval_tokens, "eval_offset": eval_offset, "configs": configs,
               "evaluation_seconds": evaluation_seconds,
               "decode": {k: {"ms_per_token": v[0], "kv_bytes": v[1], "kv_bytes_kept": v[2]} for k, v in speed.items()},
               "decode_context": decode_context, "decode_new_tokens": new_tokens, "analysis": result.model_info,
               "layer_losses": None if layer_losses is None else layer_losses.get("text", "given"),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
               "headkv_engine": __version__, "date": datetime.date.today().isoformat()}
    write_json_atomic(os.path.join(output_dir, "demo_results.json"), results)
    plot_ppl_vs_context(results, os.path.join(output_dir, "ppl_vs_context.png"))
    steps.update()

    # 6. the report
    results["seconds"] = time.perf_counter() - began
    _write_report(results, classifications, output_dir)
    steps.update()
    steps.close()
    return results


def _against_streaming(configs, group) -> str:
    """A report line: how the `group` profiles compare with StreamingLLM at each budget."""
    wins = [(budget, c["perplexity"], streaming["perplexity"])
            for budget, c, streaming, _ in budget_comparison(configs, group) if streaming]
    better = [w for w in wins if w[1] <= w[2]]
    return (f"- `{group}` is at or below StreamingLLM's perplexity at {len(better)} of {len(wins)} budgets "
            f"({'; '.join(f'{b}: {f:.2f} vs {s:.2f}' for b, f, s in wins)}).")


def _write_report(results, classifications, output_dir):
    configs = {c["name"]: c for c in results["configs"]}
    full = configs["full"]
    types = {}
    for c in classifications:
        types[c.head_type] = types.get(c.head_type, 0) + 1
    analysis = results["analysis"]
    lines = [
        f"# headkv-engine demo: {results['model']}",
        "",
        f"{results['date']}, headkv-engine {results['headkv_engine']}, torch {results['torch']}, {results['machine']}; "
        f"{results['seconds']:.0f} s in all.",
        "",
        "## What was done",
        "",
        f"1. **Analysis.** Every one of the {analysis['num_layers']} x {analysis['num_heads']} heads was measured on "
        f"{analysis['tokens']} held-out tokens in {analysis['sequences']} windows of the evaluated length (entropy, "
        "sink / local / recent / global mass, distance histograms) "
        "by fused kernels, without attention matrices. Files and figures: `analysis/`.",
        f"2. **Classification.** Head types: {', '.join(f'{k} {v}' for k, v in sorted(types.items()))}.",
        "3. **Profiles.** StreamingLLM (4 sinks + window) and `from_budget` (each head's sink and window chosen to "
        "cover the most attention mass under the same mean budget) at each budget, and the head-aware profile of "
        "the classification. Files: `profiles/`."
        + (" `from_budget_measured` prices the same choice by each layer's measured loss increase at each window "
           "(a calibration on other text) instead of the attention it drops." if results["layer_losses"] else ""),
        f"4. **Evaluation.** Perplexity and next-token accuracy on {results['windows']} held-out windows of "
        f"{results['window_tokens']} tokens (after the analysed ones), in one masked pass per profile (identical "
        f"to token-by-token decoding with the ragged cache): {len(results['configs'])} profiles evaluated in "
        f"{results['evaluation_seconds']:.0f} s.",
        f"5. **Speed and memory.** Greedy decoding after a {results['decode_context']}-token prompt, full cache vs "
        "ragged cache.",
        "",
        "## Perplexity at equal budget",
        "",
        "| profile | PPL | vs full | accuracy | effective context | KV kept |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(results["configs"], key=lambda c: (c["effective_context"], c["name"])):
        lines.append(f"| {c['name']} | {c['perplexity']:.2f} | "
                     f"{100 * (c['perplexity'] / full['perplexity'] - 1):+.1f}% | {100 * c['accuracy']:.1f}% | "
                     f"{c['effective_context']:.1f} | {100 * c['kv_fraction']:.1f}% |")
    lines += ["", "## Decode speed and KV bytes", "",
              "| cache | ms / token | KV bytes kept | KV bytes allocated | vs full |", "|---|---|---|---|---|"]
    dense = results["decode"]["full"]
    for k, v in results["decode"].items():
        lines.append(f"| {k} | {v['ms_per_token']:.2f} | {v['kv_bytes_kept']:,} | {v['kv_bytes']:,} | "
                     f"{100 * v['kv_bytes_kept'] / dense['kv_bytes']:.1f}% of the bytes kept "
                     f"({100 * v['kv_bytes'] / dense['kv_bytes']:.1f}% allocated), "
                     f"{dense['ms_per_token'] / v['ms_per_token']:.2f}x the speed |")
    lines += ["", f"Bytes of the caches after the {results['decode_context']}-token prompt and "
              f"{results['decode_new_tokens'] + 1} decode steps (the first untimed). "
              "Kept: the rows written; allocated: what the pools hold, full heads' room for growth included (an "
              "eighth more rows, 16 to 256, so that the pools move once per 16-256 steps)."]
    frontier = ", ".join(c["name"] for c in pareto_frontier([c for c in results["configs"] if c["name"] != "full"]))
    lines += [
        "",
        "## What it means",
        "",
        *(_against_streaming(results["configs"], group) for group in BUDGET_GROUPS
          if any(c["group"] == group for c in results["configs"])),
        f"- The Pareto frontier (no profile with both less context and lower perplexity): {frontier}.",
        f"- The head-aware profile keeps {100 * configs['head_aware']['kv_fraction']:.1f}% of the KV cache at "
        f"{100 * (configs['head_aware']['perplexity'] / full['perplexity'] - 1):+.1f}% perplexity.",
        "- Decode speed-ups grow with the context and with the share of the step spent in attention; on a model "
        "this small the MLP and LM head dominate a decode step at this context.",
        "",
        "## Figures",
        "",
        "![perplexity vs effective context](ppl_vs_context.png)",
        "",
        "![entropy per head](analysis/entropy_heatmap.png)",
        "",
        "![position preference](analysis/position_preference.png)",
        "",
        "![relative position](analysis/relative_position_heatmap.png)",
        "",
    ]
    write_text_atomic(os.path.join(output_dir, "report.md"), "\n".join(lines))
