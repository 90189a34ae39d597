"""The ablation study of seed 004, run on any GPTNeoX: which policy gives the best perplexity at a KV budget.

`run_ablation` evaluates every configuration of the chosen ablations on one text, appending each result to a
JSON file as it finishes (a rerun skips what is there), then `write_report` draws the tables and plots.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import torch
from tqdm.auto import tqdm

from headkv_engine import provenance
from headkv_engine.evaluation import evaluate
from headkv_engine.files import read_json
from headkv_engine.profile import Profile, write_json_atomic

BUDGETS = (32, 64, 128, 256, 512)
RESULTS_FORMAT = "headkv-ablation/1"


def configurations(ablation: str, classifications=None, statistics=None, budgets=BUDGETS,
                   layer_losses=None) -> list[tuple[str, str]]:
    """(name, group) of every configuration of `ablation` (all, sink_importance, window_size, head_aware, groups)."""
    sink_importance = [(f"A_window_{w}", "A") for w in (64, 128, 256, 512)] + [
        (f"B_streaming_{w}", "B") for w in (64, 128, 256, 512)
    ]
    window_size = [(f"B_streaming_{w}", "B") for w in budgets]
    head_aware = []
    if classifications is not None:
        head_aware = (
            [("head_aware", "head_aware")]
            + [(f"K_uniform{w}_aware", "K") for w in (64, 128)]
            + [(f"I_pos{p}_mix{m}_g128", "I") for p in (128, 256, 512) for m in (64, 128)]
            + [("J_pos64_mix64_g128", "J"), ("J_pos128_mix128_g64", "J")]
        )
    groups = []
    if classifications is not None:
        groups = [(f"G_conf{t:g}_base{b}", "G") for b in (64, 128) for t in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8)]
    from_budget = [(f"from_budget_{b}", "from_budget") for b in budgets] if statistics is not None else []
    if statistics is not None and layer_losses is not None:
        from_budget += [(f"from_budget_measured_{b}", "from_budget_measured") for b in budgets]
    chosen = {
        "sink_importance": sink_importance,
        "window_size": window_size,
        "head_aware": head_aware,
        "groups": groups,
        "all": [("full", "full")] + sink_importance + window_size + head_aware + groups + from_budget,
    }
    if ablation not in chosen:
        raise ValueError(f"ablation must be one of {sorted(chosen)}, got {ablation!r}")
    if ablation in ("head_aware", "groups") and classifications is None:
        raise ValueError(f"ablation {ablation!r} needs --classifications (a head_classifications.json)")
    unique = list(dict.fromkeys(chosen[ablation]))
    return unique


# The inputs each group's profiles are built from, by the flags of `headkv ablate` that give them.
INPUT_FLAGS = {"head_aware": "--classifications", "G": "--classifications", "I": "--classifications",
               "J": "--classifications", "K": "--classifications", "from_budget": "--statistics",
               "from_budget_measured": "--statistics and --layer-losses"}


def build_profile(name: str, num_layers: int, num_heads: int, classifications=None, statistics=None,
                  length: int | None = None, layer_losses=None) -> Profile:
    """The profile of configuration `name`; `length` is the evaluated context (what a full head costs);
    `layer_losses` prices the from_budget_measured configurations (headkv calibrate)."""
    if name == "full":
        return Profile.full(num_layers, num_heads)
    if name == "head_aware":
        return Profile.head_aware(classifications)
    if name.startswith("from_budget_measured_"):
        return Profile.from_budget(statistics, mean_tokens=int(name.rsplit("_", 1)[1]), length=length,
                                   layer_losses=layer_losses)
    if name.startswith("from_budget_"):
        return Profile.from_budget(statistics, mean_tokens=int(name.rsplit("_", 1)[1]), length=length)
    return Profile.from_group_name(name, classifications, num_layers, num_heads)


def _digest(value) -> str | None:
    """A short content hash of an input: a file's bytes, or a JSON-able object; None for none given."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            data = f.read()
    else:
        try:
            data = json.dumps(value, sort_keys=True).encode()
        except TypeError:  # an object without a stable serialisation: only its type can be compared
            data = type(value).__qualname__.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def input_fingerprints(windows, classifications, statistics, layer_losses) -> dict:
    """What the results of a run depend on besides the configuration: the evaluated tokens (text, offset,
    window length and count) and the input files, each as a short hash."""
    tokens = hashlib.sha256()
    for window in windows:
        tokens.update(window.to(torch.int64).cpu().numpy().tobytes())
        tokens.update(b"|")
    return {"tokens": tokens.hexdigest()[:16], "classifications": _digest(classifications),
            "statistics": _digest(statistics), "layer_losses": _digest(layer_losses)}


def run_ablation(model, input_ids, output_dir, *, ablation="all", classifications=None, statistics=None,
                 model_name="model", budgets=BUDGETS, backend="auto", progress=True, layer_losses=None,
                 resume=True) -> dict:
    """Evaluate every configuration on `input_ids` (a sequence, a batch or a list of windows); results go to
    `output_dir/ablation_results.json` after each one. `resume`: continue the results found there (of the same
    model and inputs); False starts over, the earlier file replaced only once the first new result is written."""
    windows = [input_ids] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1 else list(input_ids)
    length = max(int(w.numel()) for w in windows)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "ablation_results.json")
    inputs = input_fingerprints(windows, classifications, statistics, layer_losses)
    if resume and os.path.exists(path):
        results = read_json(path, hint="; use another --output-dir or --force")
        if not isinstance(results, dict):
            results = {}
        if results.get("format") != RESULTS_FORMAT or results.get("model") != model_name:
            raise ValueError(f"{path} holds results of another run (model {results.get('model')!r}); use another "
                             "--output-dir or --force")
        # resuming adds configurations; every row must come from the same tokens and the same inputs
        if "inputs" not in results:
            raise ValueError(f"{path} was written before results recorded what they were measured on, so resuming "
                             "cannot tell whether it is the same evaluation; use --force to start over")
        changed = sorted(key for key in inputs if results["inputs"].get(key) != inputs[key])
        if changed:
            raise ValueError(f"{path} holds results of another evaluation (it differs in: {', '.join(changed)}); "
                             "use another --output-dir, or --force to start over")
    else:
        results = {"format": RESULTS_FORMAT, "model": model_name, "tokens": sum(int(w.numel()) for w in windows),
                   "windows": len(windows), "window_tokens": length, "inputs": inputs,
                   "created": datetime.datetime.now().isoformat(timespec="seconds"), "configs": []}
    done = {c["name"] for c in results["configs"]}
    todo = [c for c in configurations(ablation, classifications, statistics, budgets, layer_losses)
            if c[0] not in done]
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    # every profile is built and checked against the model before the first evaluation, so inputs of another
    # model (or a budget no head can meet) fail at once, naming the input, not after hours of other rows
    profiles = {}
    for name, group in todo:
        try:
            profiles[name] = build_profile(name, layers, heads, classifications, statistics, length, layer_losses)
            profiles[name].check_model(model)
        except ValueError as exc:
            flags = INPUT_FLAGS.get(group)
            raise ValueError(f"{flags + ': ' if flags else ''}configuration {name}: {exc}") from None
    for name, group in tqdm(todo, desc="ablation", disable=not progress):
        profile = profiles[name]
        result = evaluate(model, windows, profile, backend=backend)
        results["configs"].append({
            "name": name, "group": group, "parameters": profile.meta, "perplexity": result.perplexity,
            "accuracy": result.accuracy, "effective_context": result.effective_context, "tokens": result.tokens,
            "kv_fraction": profile.summary(length)["kv_fraction"], "seconds": result.seconds,
            "model": model_name, "commit": provenance.commit(),
        })
        write_json_atomic(path, results)
    return results
