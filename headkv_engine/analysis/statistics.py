"""HeadStatistics: what the analysis measured of one head (SPEC 5), and `head_statistics.json` I/O."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from headkv_engine.files import read_json
from headkv_engine.ops.statistics import REGIONS, SINK_SIZES
from headkv_engine.profile import write_json_atomic


@dataclass
class HeadStatistics:
    """Means over every analysed query (position q >= sink_size + local_window) of one head.

    The seed's fields (seed 000) plus two optional histograms for budget allocation (None when a file written
    without them is read): `distance_mass_log2`, the mean mass by distance d = q - j on a log scale (bin 0:
    d = 0, bin i >= 1: 2^(i-1) <= d < 2^i, as many bins as the longest analysed sequence needs; sums to 1), and
    `sink_mass_by_size`, {s: mean mass on the keys j < s} for s in 1, 2, 4, 8, 16; and the same two by query
    position, `mass_by_query_position`: one entry per octave of positions that holds analysed queries,
    {"positions": [lo, hi], "num_queries": n, "distance_mass_log2": [...], "sink_mass_by_size": {...}} over the
    queries at lo <= q < hi (hi = 2 lo), so that a budget for a shorter context can use what that context sees.
    `num_queries` counts the queries the means are over.
    """

    layer_idx: int
    head_idx: int
    mean_entropy: float
    std_entropy: float
    max_attention_mean: float
    position_preference: dict
    sink_ratio: float
    uniformity_score: float
    relative_position_dist: list
    distance_mass_log2: list | None = None
    sink_mass_by_size: dict | None = None
    mass_by_query_position: list | None = None
    num_queries: int = 0

    def to_dict(self) -> dict:
        """The JSON entry; the optional histograms are left out when absent."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> HeadStatistics:
        """An entry of head_statistics.json; a ValueError names the first missing or mistyped field."""
        names = cls.__dataclass_fields__
        if not isinstance(data, dict):
            raise ValueError(f"expected an object of per-head fields, got {type(data).__name__}")
        missing = [n for n in ("layer_idx", "head_idx", "mean_entropy", "position_preference") if n not in data]
        if missing:
            raise ValueError(f"head statistics entry lacks {missing} "
                             f"(layer {data.get('layer_idx')}, head {data.get('head_idx')})")
        data = nulls_as_nan(data)
        _check_fields(data)
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("std_entropy", 0.0)
        values.setdefault("max_attention_mean", 0.0)
        values.setdefault("sink_ratio", data["position_preference"].get("sink", 0.0))
        values.setdefault("uniformity_score", 0.0)
        values.setdefault("relative_position_dist", [])
        if values.get("sink_mass_by_size"):
            values["sink_mass_by_size"] = _sink_sizes(values["sink_mass_by_size"])
        if values.get("mass_by_query_position"):
            values["mass_by_query_position"] = [
                {**entry, "sink_mass_by_size": _sink_sizes(entry["sink_mass_by_size"])}
                for entry in values["mass_by_query_position"]
            ]
        return cls(**values)


def nulls_as_nan(data: dict) -> dict:
    """The entry with null statistics read back as NaN: save_statistics writes a non-finite value as null."""
    return {k: _null_to_nan(v) if k in SCALAR_FIELDS or k in MEASURED_FIELDS else v for k, v in data.items()}


def _null_to_nan(value):
    """`value` with every null, at any depth of lists and objects, read as NaN."""
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return [_null_to_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: _null_to_nan(v) for k, v in value.items()}
    return value


# the fields that hold measured numbers, nested in lists and objects
MEASURED_FIELDS = ("position_preference", "relative_position_dist", "distance_mass_log2", "sink_mass_by_size",
                   "mass_by_query_position")
SCALAR_FIELDS = ("mean_entropy", "std_entropy", "max_attention_mean", "sink_ratio", "uniformity_score")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(data: dict) -> None:
    """The types of the fields the reports and figures read, so that a bad file fails here, naming the field."""
    head = f"(layer {data.get('layer_idx')}, head {data.get('head_idx')})"
    for key in ("layer_idx", "head_idx"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
            raise ValueError(f"{key}: expected an integer >= 0, got {data[key]!r}")
    for key in SCALAR_FIELDS:
        if key in data and not _is_number(data[key]):
            raise ValueError(f"{key}: expected a number, got {data[key]!r} {head}")
    preference = data["position_preference"]
    if not isinstance(preference, dict) or not all(_is_number(preference.get(r)) for r in REGIONS):
        raise ValueError(f"position_preference: expected an object with a number for each of {list(REGIONS)}, got "
                         f"{preference!r} {head}")
    relative = data.get("relative_position_dist")
    if relative is not None and not (isinstance(relative, list) and len(relative) == 64
                                     and all(_is_number(v) for v in relative)):
        raise ValueError(f"relative_position_dist: expected a list of 64 numbers {head}")
    if data.get("sink_mass_by_size") is not None and not isinstance(data["sink_mass_by_size"], dict):
        raise ValueError(f"sink_mass_by_size: expected an object {{sink size: mass}} {head}")
    octaves = data.get("mass_by_query_position")
    if octaves is not None and not (isinstance(octaves, list) and all(
            isinstance(o, dict) and isinstance(o.get("sink_mass_by_size"), dict) for o in octaves)):
        raise ValueError(f"mass_by_query_position: expected a list of objects with sink_mass_by_size {head}")


def _sink_sizes(masses: dict) -> dict:
    """{sink size: mass} with int keys (JSON object keys are strings)."""
    return {int(k): float(v) for k, v in masses.items()}


# The sums kept per octave of query positions (HeadStatistics.mass_by_query_position).
OCTAVE_FIELDS = ("count", "log2", "sinks")


def _octave_entries(octaves: dict, head: int) -> list:
    entries = []
    for octave, sums in sorted(octaves.items()):
        count = float(sums["count"][head])
        if count == 0:
            continue
        low, high = (0, 1) if octave == 0 else (1 << (octave - 1), 1 << octave)
        entries.append({
            "positions": [low, high], "num_queries": int(count),
            "distance_mass_log2": (sums["log2"][head] / count).tolist(),
            "sink_mass_by_size": {s: float(sums["sinks"][head, i] / count) for i, s in enumerate(SINK_SIZES)},
        })
    return entries


def from_sums(sums: dict, layer: int, octaves: dict | None = None) -> list[HeadStatistics]:
    """HeadStatistics of every head of one layer from the summed op outputs (ops.statistics); `octaves`, the
    sums of OCTAVE_FIELDS by query-position octave b (positions 2^(b-1) .. 2^b - 1; b = 0: position 0)."""
    count = sums["count"].clamp(min=1)
    mean = lambda key: sums[key] / count  # noqa: E731
    entropy = mean("entropy")
    std = (mean("entropy_sq") - entropy**2).clamp(min=0).sqrt()
    regions = sums["regions"] / count[:, None]
    relative = sums["relative"] / count[:, None]
    log2 = sums["log2"] / count[:, None]
    sinks = sums["sinks"] / count[:, None]
    out = []
    for head in range(count.shape[0]):
        preference = {name: float(regions[head, i]) for i, name in enumerate(REGIONS)}
        out.append(HeadStatistics(
            layer_idx=layer, head_idx=head, mean_entropy=float(entropy[head]), std_entropy=float(std[head]),
            max_attention_mean=float(mean("max_prob")[head]), position_preference=preference,
            sink_ratio=preference["sink"], uniformity_score=float(mean("uniformity")[head]),
            relative_position_dist=relative[head].tolist(), distance_mass_log2=log2[head].tolist(),
            sink_mass_by_size={s: float(sinks[head, i]) for i, s in enumerate(SINK_SIZES)},
            mass_by_query_position=_octave_entries(octaves, head) if octaves else None,
            num_queries=int(sums["count"][head]),
        ))
    return out


# Written into every head_statistics.json, so the file explains its fields (readers may ignore it).
FIELD_DEFINITIONS = {
    "means_over": "every analysed query at position q >= sink_size + local_window; p = its attention row",
    "num_queries": "the number of queries the means are over",
    "mean_entropy": "mean of -sum p log p (nats)",
    "std_entropy": "population standard deviation of -sum p log p",
    "max_attention_mean": "mean of max_j p_j",
    "position_preference": "mean mass on sink (j < sink_size), local (q - local_window < j <= q), recent "
                           "(j >= q + 1 - ceil(recent_ratio * (q + 1))), global (the rest); first match wins",
    "sink_ratio": "equals position_preference.sink",
    "uniformity_score": "mean of log(q + 1) - entropy, the KL divergence from uniform attention",
    "relative_position_dist": "64 bins of mean mass by distance d = q - j; bin 63 holds d >= 63",
    "distance_mass_log2": "optional: mean mass by distance on a log scale; bin 0: d = 0, bin i >= 1: "
                          "2^(i-1) <= d < 2^i, up to the longest analysed sequence",
    "sink_mass_by_size": "optional: {s: mean mass on the keys j < s} for s in 1, 2, 4, 8, 16",
    "mass_by_query_position": "optional: distance_mass_log2 and sink_mass_by_size over the queries at positions "
                              "lo <= q < hi only, for each octave [lo, hi) of positions that holds analysed queries",
}


def save_statistics(statistics, model_info: dict, path) -> None:
    write_json_atomic(path, {"model_info": model_info, "head_statistics": [s.to_dict() for s in statistics],
                             "field_definitions": FIELD_DEFINITIONS})


def load_statistics(path) -> tuple[list[HeadStatistics], dict]:
    """(statistics, model_info) of a head_statistics.json."""
    path = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("head_statistics"), list):
        raise ValueError(f"{path}: expected a head_statistics.json with a 'head_statistics' list")
    if not data["head_statistics"]:
        raise ValueError(f"{path}: head_statistics: expected one entry per analysed head, got none")
    statistics = []
    for i, entry in enumerate(data["head_statistics"]):
        try:
            statistics.append(HeadStatistics.from_dict(entry))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: head_statistics[{i}]: {exc}") from None
    info = data.get("model_info", {})
    if not isinstance(info, dict):
        raise ValueError(f"{path}: model_info: expected an object, got {type(info).__name__}")
    return statistics, info


def as_tensor(statistics, name: str, num_layers: int, num_heads: int) -> torch.Tensor:
    """A per-head scalar field as a [layers, heads] tensor (position_preference fields as 'pref.sink' etc.)."""
    out = torch.full((num_layers, num_heads), float("nan"))
    for s in statistics:
        value = s.position_preference[name[5:]] if name.startswith("pref.") else getattr(s, name)
        out[s.layer_idx, s.head_idx] = value
    return out
