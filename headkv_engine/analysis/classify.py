"""Head classification (SPEC 6): a type and a compression recommendation per head, with a confidence.

Rules, first match wins (thresholds configurable through `Thresholds`):

| refined type | rule | recommendation |
|---|---|---|
| dead | uniformity < 0.1 | prune |
| sink_positional | entropy < 1.5 and sink > 0.3 | sink_window(4, 8) |
| true_positional | entropy < 1.5 and sink <= 0.3 and local > 0.6 | window_only(8) |
| sink_mixed | 1.5 <= entropy < 3.0 and sink > 0.3 | sink_window(4, 24) |
| gathering | entropy >= 3.0 | full |
| mixed | otherwise | full |

`scheme="legacy"`: dead, positional (entropy < 1.5, sink_window(4, 8)), gathering (entropy >= 3.0), mixed.

Confidence: how far the head is from the thresholds that decided its type. Each threshold whose crossing
would change the type contributes the margin |x - threshold| / width (widths: 1 nat for entropy, 0.3 for
the sink and local shares, 0.1 for uniformity), and confidence = min(1, smallest margin). A head right at
such a threshold has confidence 0; one a full width away from all of them has 1. (A low-entropy `mixed`
head, for example, stays `mixed` when its entropy rises past 1.5, so only its sink, local and uniformity
margins count.)
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections import Counter
from dataclasses import asdict, dataclass

from headkv_engine.files import read_json
from headkv_engine.profile import write_json_atomic

ENTROPY_WIDTH, SHARE_WIDTH, UNIFORMITY_WIDTH = 1.0, 0.3, 0.1


class HeadType(str, enum.Enum):
    POSITIONAL = "positional"
    GATHERING = "gathering"
    DEAD = "dead"
    MIXED = "mixed"
    SINK_POSITIONAL = "sink_positional"
    TRUE_POSITIONAL = "true_positional"
    SINK_MIXED = "sink_mixed"


@dataclass(frozen=True)
class Thresholds:
    low_entropy: float = 1.5
    high_entropy: float = 3.0
    sink: float = 0.3
    local: float = 0.6
    dead_uniformity: float = 0.1
    sink_size: int = 4
    positional_window: int = 8
    mixed_window: int = 24


@dataclass
class HeadClassification:
    layer_idx: int
    head_idx: int
    head_type: str
    confidence: float
    can_prune: bool
    can_limit_window: bool
    recommended_window: int
    keep_sinks: bool
    sink_size: int
    use_full_cache: bool
    compression_strategy: str
    mean_entropy: float = 0.0
    sink_ratio: float = 0.0
    local_ratio: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _margin(value, threshold, width):
    return abs(value - threshold) / width


def _decide(stat, t: Thresholds, scheme: str):
    """(type, margins of the deciding conditions, strategy, sink, window) of one head."""
    e = stat.mean_entropy
    sink = stat.position_preference.get("sink", stat.sink_ratio)
    local = stat.position_preference.get("local", 0.0)
    u = stat.uniformity_score
    m_dead = _margin(u, t.dead_uniformity, UNIFORMITY_WIDTH)
    m_low = _margin(e, t.low_entropy, ENTROPY_WIDTH)
    m_high = _margin(e, t.high_entropy, ENTROPY_WIDTH)
    m_sink = _margin(sink, t.sink, SHARE_WIDTH)
    m_local = _margin(local, t.local, SHARE_WIDTH)
    if u < t.dead_uniformity:
        return HeadType.DEAD, [m_dead], "prune", 0, 0
    if scheme == "legacy":
        if e < t.low_entropy:
            return HeadType.POSITIONAL, [m_dead, m_low], "sink_window", t.sink_size, t.positional_window
        if e >= t.high_entropy:
            return HeadType.GATHERING, [m_dead, m_high], "none", 0, -1
        return HeadType.MIXED, [m_dead, m_low, m_high], "none", 0, -1
    if e < t.low_entropy and sink > t.sink:
        return HeadType.SINK_POSITIONAL, [m_dead, m_low, m_sink], "sink_window", t.sink_size, t.positional_window
    if e < t.low_entropy and local > t.local:
        return HeadType.TRUE_POSITIONAL, [m_dead, m_low, m_sink, m_local], "window_only", 0, t.positional_window
    if t.low_entropy <= e < t.high_entropy and sink > t.sink:
        return HeadType.SINK_MIXED, [m_dead, m_low, m_high, m_sink], "sink_window", t.sink_size, t.mixed_window
    if e >= t.high_entropy:
        return HeadType.GATHERING, [m_dead, m_high], "none", 0, -1
    if e < t.low_entropy:  # low entropy, neither sink- nor local-dominated: entropy up to 3.0 keeps it mixed
        return HeadType.MIXED, [m_dead, m_sink, m_local], "none", 0, -1
    # middle entropy, no sink: falling below low_entropy makes it true_positional only if local > threshold
    return HeadType.MIXED, [m_dead, m_high, m_sink] + ([m_low] if local > t.local else []), "none", 0, -1


def classify(statistics, scheme: str = "refined", thresholds: Thresholds | None = None) -> list[HeadClassification]:
    """One HeadClassification per HeadStatistics (SPEC 6)."""
    if scheme not in ("refined", "legacy"):
        raise ValueError(f"scheme must be 'refined' or 'legacy', got {scheme!r}")
    t = thresholds or Thresholds()
    out = []
    for stat in statistics:
        head_type, margins, strategy, sink_size, window = _decide(stat, t, scheme)
        out.append(HeadClassification(
            layer_idx=stat.layer_idx, head_idx=stat.head_idx, head_type=head_type.value,
            confidence=round(min(1.0, min(margins)), 4), can_prune=strategy == "prune",
            can_limit_window=strategy in ("sink_window", "window_only"), recommended_window=window,
            keep_sinks=strategy == "sink_window", sink_size=sink_size, use_full_cache=strategy == "none",
            compression_strategy=strategy, mean_entropy=stat.mean_entropy,
            sink_ratio=stat.position_preference.get("sink", stat.sink_ratio),
            local_ratio=stat.position_preference.get("local", 0.0),
        ))
    return out


def summarize(classifications) -> dict:
    types = Counter(c.head_type for c in classifications)
    return {
        "total_heads": len(classifications),
        "type_distribution": dict(sorted(types.items())),
        "prunable_heads": sum(c.can_prune for c in classifications),
        "limitable_heads": sum(c.can_limit_window for c in classifications),
        "compressible_heads": sum(not c.use_full_cache for c in classifications),
        "heads_needing_sinks": sum(c.keep_sinks for c in classifications),
    }


def save_classifications(classifications, path, scheme: str = "refined", thresholds: Thresholds | None = None) -> None:
    """Write `head_classifications.json` (seed 000 schema) atomically."""
    data = {
        "classifications": [c.to_dict() for c in classifications],
        "summary": summarize(classifications),
        "scheme": scheme,
        "thresholds": asdict(thresholds or Thresholds()),
    }
    write_json_atomic(os.fspath(path), data)


def load_classifications(path) -> list[HeadClassification]:
    """The classifications of a head_classifications.json (seed 000 schema); a ValueError names the file, the entry
    and the field that is missing or wrong."""
    path = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("classifications"), list):
        raise ValueError(f"{path}: expected a head_classifications.json with a 'classifications' list")
    fields = HeadClassification.__dataclass_fields__
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    types = sorted(t.value for t in HeadType)
    out = []
    for i, entry in enumerate(data["classifications"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: classifications[{i}]: expected an object, got {type(entry).__name__}")
        missing = [n for n in required if n not in entry]
        if missing:
            raise ValueError(f"{path}: classifications[{i}] lacks {missing}")
        head = f"(layer {entry['layer_idx']}, head {entry['head_idx']})"
        for key in ("layer_idx", "head_idx"):
            if not isinstance(entry[key], int) or isinstance(entry[key], bool) or entry[key] < 0:
                raise ValueError(f"{path}: classifications[{i}].{key}: expected an integer >= 0, got {entry[key]!r}")
        if entry["head_type"] not in types:
            raise ValueError(f"{path}: classifications[{i}].head_type {head}: expected one of {types}, got "
                             f"{entry['head_type']!r}")
        confidence = entry["confidence"]
        if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 <= confidence <= 1:
            raise ValueError(f"{path}: classifications[{i}].confidence {head}: expected a number in [0, 1], got "
                             f"{confidence!r}")
        out.append(HeadClassification(**{k: v for k, v in entry.items() if k in fields}))
    return out
