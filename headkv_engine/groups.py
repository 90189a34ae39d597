"""Profiles of the ablation groups of seed 004 (Pythia-2.8b experiment report), built from a classification.

Every group keeps 4 sink tokens plus a window, as StreamingLLM does, except group A (window only).
Heads are grouped by their legacy type: `positional` (refined: sink_positional, true_positional), `mixed`
(refined: sink_mixed, mixed) and `gathering`; `dead` heads are pruned in the head-aware groups.

| group | name | policy |
|---|---|---|
| A | `A_window_{w}` | window_only(w) for every head |
| B | `B_streaming_{c}` | sink 4 + window c-4 for every head (StreamingLLM at budget c) |
| G | `G_conf{t}_base{b}` | heads with confidence >= t: sink 4 + their type's window; the others sink 4 + window b |
| I | `I_pos{a}_mix{b}_g{c}` | sink 4 + window a / b / c by type (the "inverse" group: large positional windows) |
| J | `J_pos{a}_mix{b}_g{c}` | the same rule, with small gathering windows |
| K | `K_uniform{w}_aware` | sink 4 + window w for every head, dead heads pruned |

The type windows of group G are positional 16, mixed 64, gathering 256 (`CONFIDENT_WINDOWS`).

Effective contexts then match the report: K_uniform64_aware = 68, B_streaming_64 = 64.
"""

from __future__ import annotations

import re

from headkv_engine.profile import HeadPolicy, Profile, ProfileError, _read_json, is_int

SINK = 4
LEGACY_TYPE = {
    "positional": "positional",
    "sink_positional": "positional",
    "true_positional": "positional",
    "mixed": "mixed",
    "sink_mixed": "mixed",
    "gathering": "gathering",
    "dead": "dead",
}
CONFIDENT_WINDOWS = {"positional": 16, "mixed": 64, "gathering": 256}

_NAMES = [
    (re.compile(r"A_window_(\d+)$"), "window_only"),
    (re.compile(r"B_streaming_(\d+)$"), "streaming"),
    (re.compile(r"G_conf(\d+(?:\.\d+)?)_base(\d+)$"), "confidence"),
    (re.compile(r"[IJ]_pos(\d+)_mix(\d+)_g(\d+)$"), "by_type"),
    (re.compile(r"K_uniform(\d+)_aware$"), "uniform_aware"),
]


def load_classifications(source) -> list[dict]:
    """Per-head classification dicts (seed 000 schema) from a path, a parsed file, or a list."""
    if isinstance(source, list):
        entries = source
    else:
        data = source if isinstance(source, dict) else _read_json(source)
        entries = data.get("classifications") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ProfileError("classifications: expected a non-empty list of per-head objects")
    out = []
    for i, entry in enumerate(entries):
        entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        for key in ("layer_idx", "head_idx"):
            value = entry.get(key)
            if not is_int(value) or value < 0:
                raise ProfileError(f"classifications[{i}].{key}: expected an integer >= 0, got {value!r}")
        head_type = entry.get("head_type")
        if head_type not in LEGACY_TYPE:
            raise ProfileError(
                f"classifications[{i}].head_type: expected one of {sorted(LEGACY_TYPE)}, got {head_type!r}"
            )
        confidence = entry.get("confidence")
        if not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
            raise ProfileError(f"classifications[{i}].confidence: expected a number in [0, 1], got {confidence!r}")
        out.append(entry)
    return out


def _shape(entries):
    return 1 + max(e["layer_idx"] for e in entries), 1 + max(e["head_idx"] for e in entries)


def _per_head(entries, rule, name) -> Profile:
    layers, heads = _shape(entries)
    policies = {}
    for e in entries:
        kind = LEGACY_TYPE[e["head_type"]]
        policies[(e["layer_idx"], e["head_idx"])] = HeadPolicy.make("prune") if kind == "dead" else rule(kind, e)
    return Profile(layers, heads, heads=policies, meta={"source": "seed 004 ablation group", "name": name})


def confidence_based(classifications, threshold: float, base_window: int, windows=None) -> Profile:
    """Group G: confident heads get their type's window, the rest `base_window` (all with 4 sinks)."""
    windows = {**CONFIDENT_WINDOWS, **(windows or {})}
    entries = load_classifications(classifications)

    def rule(kind, entry):
        window = windows[kind] if entry["confidence"] >= threshold else base_window
        return HeadPolicy.make("sink_window", SINK, window)

    return _per_head(entries, rule, f"G_conf{threshold:g}_base{base_window}")


def by_type(classifications, positional: int, mixed: int, gathering: int, group: str = "I") -> Profile:
    """Groups I and J: a window per legacy type (all with 4 sinks)."""
    windows = {"positional": positional, "mixed": mixed, "gathering": gathering}
    entries = load_classifications(classifications)
    return _per_head(
        entries, lambda kind, _: HeadPolicy.make("sink_window", SINK, windows[kind]),
        f"{group}_pos{positional}_mix{mixed}_g{gathering}",
    )


def uniform_aware(classifications, window: int) -> Profile:
    """Group K: sink 4 + `window` for every head, dead heads pruned."""
    entries = load_classifications(classifications)
    return _per_head(entries, lambda *_: HeadPolicy.make("sink_window", SINK, window), f"K_uniform{window}_aware")


def from_group_name(name: str, classifications=None, num_layers: int | None = None, num_heads: int | None = None):
    """The profile a seed 004 configuration name describes, e.g. 'G_conf0.7_base64' or 'B_streaming_128'."""
    for pattern, kind in _NAMES:
        match = pattern.match(name)
        if not match:
            continue
        args = match.groups()
        if kind in ("window_only", "streaming"):
            if num_layers is None or num_heads is None:
                if classifications is None:
                    raise ValueError(f"{name}: give num_layers and num_heads (or classifications)")
                num_layers, num_heads = _shape(load_classifications(classifications))
            budget = int(args[0])
            if kind == "window_only":
                profile = Profile.window_only(num_layers, num_heads, window_size=budget)
            else:
                if budget <= SINK:
                    raise ValueError(f"{name}: a streaming budget must exceed the {SINK} sinks")
                profile = Profile.streaming_llm(num_layers, num_heads, sink_size=SINK, window_size=budget - SINK)
            profile.meta["name"] = name
            return profile
        if classifications is None:
            raise ValueError(f"{name}: this group needs a head classification")
        if kind == "confidence":
            return confidence_based(classifications, float(args[0]), int(args[1]))
        if kind == "by_type":
            return by_type(classifications, *(int(a) for a in args), group=name[0])
        return uniform_aware(classifications, int(args[0]))
    raise ValueError(f"unknown configuration name {name!r}: expected A_window_W, B_streaming_C, G_confT_baseB, "
                     "I_posA_mixB_gC, J_posA_mixB_gC or K_uniformW_aware")
