"""Profiles: what every attention head of a model keeps of its past (SPEC sections 1, 3 and 7).

A `Profile` maps (layer, head) to a `HeadPolicy`; heads not listed take the profile's default.
It is the one object `patch_model` takes, and it round-trips through JSON (`headkv-profile/1`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from headkv_engine.files import atomic_path, read_json

FORMAT = "headkv-profile/1"
STRATEGIES = ("full", "sink_window", "window_only", "prune")
# Window of a `full` head in the kernels' integer encoding: longer than any sequence.
UNBOUNDED_WINDOW = 1 << 40


class ProfileError(ValueError):
    """A profile (or its JSON) is invalid; the message names the field and the head."""


@dataclass(frozen=True)
class HeadPolicy:
    """What one head keeps: `strategy` with `sink_size` (S) and `window_size` (W), `fill` for pruned heads.

    full: every past token (window_size None); sink_window: the first S and the last W tokens;
    window_only: the last W tokens; prune: nothing, the head outputs `fill` (zeros when None).
    """

    strategy: str = "full"
    sink_size: int = 0
    window_size: int | None = None
    fill: tuple[float, ...] | None = None

    @staticmethod
    def make(strategy: str, sink_size: int | None = None, window_size: int | None = None, fill=None, where: str = ""):
        """Build and validate a policy; `where` names the head in error messages."""
        where = f" ({where})" if where else ""
        if strategy not in STRATEGIES:
            raise ProfileError(f"strategy{where}: expected one of {STRATEGIES}, got {strategy!r}")
        if strategy in ("sink_window", "window_only"):
            if window_size is None or not isinstance(window_size, int) or isinstance(window_size, bool):
                raise ProfileError(
                    f"window_size{where}: {strategy} needs an integer window_size >= 1, got {window_size!r}"
                )
            if window_size <= 0:
                raise ProfileError(f"window_size{where}: must be >= 1 for {strategy}, got {window_size}")
        if strategy == "sink_window":
            sink_size = 4 if sink_size is None else sink_size
            if not isinstance(sink_size, int) or isinstance(sink_size, bool) or sink_size < 0:
                raise ProfileError(f"sink_size{where}: expected an integer >= 0, got {sink_size!r}")
        elif sink_size not in (None, 0):
            raise ProfileError(
                f"sink_size{where}: only sink_window keeps sinks, got sink_size={sink_size} for {strategy}"
            )
        if fill is not None and strategy != "prune":
            raise ProfileError(f"fill{where}: only pruned heads have a fill, got one for {strategy}")
        return HeadPolicy(
            strategy=strategy,
            sink_size=sink_size if strategy == "sink_window" else 0,
            window_size={"full": None, "prune": 0}.get(strategy, window_size),
            fill=None if fill is None else _check_fill_values(fill, where),
        )

    @staticmethod
    def keeping(sink_size: int, window_size: int | None) -> HeadPolicy:
        """The policy that keeps `sink_size` sinks and the last `window_size` tokens: full when window_size is
        None, window_only when there are no sinks, sink_window otherwise."""
        if window_size is None:
            return HeadPolicy.make("full")
        if sink_size:
            return HeadPolicy.make("sink_window", sink_size, window_size)
        return HeadPolicy.make("window_only", None, window_size)

    def kept_tokens(self, length: int) -> int:
        """Tokens this head holds after `length` tokens (SPEC 2 table)."""
        if self.strategy == "full":
            return length
        return min(length, self.sink_size + self.window_size)

    def budget(self, length: int) -> int:
        """The head's budget as seed 004 counts effective context: S+W, W, T or 0."""
        return length if self.strategy == "full" else self.sink_size + self.window_size

    def to_json(self) -> dict:
        out = {"strategy": self.strategy}
        if self.strategy == "sink_window":
            out["sink_size"] = self.sink_size
        if self.strategy in ("sink_window", "window_only"):
            out["window_size"] = self.window_size
        if self.strategy == "prune":
            out["fill"] = None if self.fill is None else list(self.fill)
        return out


def _check_fill_values(fill, where: str) -> tuple[float, ...]:
    """`fill` as a tuple of floats; it must be a non-empty list (or tuple) of finite real numbers."""
    expected = "expected null or a non-empty list of finite numbers (one per head_dim)"
    if hasattr(fill, "tolist") and getattr(fill, "ndim", None) == 1:  # a 1-D tensor or numpy array
        fill = fill.tolist()
    if not isinstance(fill, (list, tuple)):
        raise ProfileError(f"fill{where}: {expected}, got {type(fill).__name__} {reprlib.repr(fill)}")
    if not fill:
        raise ProfileError(f"fill{where}: {expected}, got an empty list")
    values = []
    for i, x in enumerate(fill):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ProfileError(f"fill{where}: {expected}, got {type(x).__name__} {reprlib.repr(x)} at index {i}")
        try:
            value = float(x)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ProfileError(f"fill{where}: {expected}, got {reprlib.repr(x)} at index {i}")
        values.append(value)
    return tuple(values)


def _checked_policy(policy, where: str) -> HeadPolicy:
    if not isinstance(policy, HeadPolicy):
        raise ProfileError(f"policy ({where}): expected a HeadPolicy, got {type(policy).__name__}")
    return HeadPolicy.make(policy.strategy, policy.sink_size, policy.window_size, policy.fill, where=where)


def is_int(value) -> bool:
    """An int that is not a bool (`isinstance(True, int)` holds in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _policy_from_json(entry: dict, where: str) -> HeadPolicy:
    if not isinstance(entry, dict):
        raise ProfileError(f"{where}: expected an object, got {type(entry).__name__}")
    if "strategy" not in entry:
        raise ProfileError(f"strategy ({where}): missing")
    return HeadPolicy.make(
        entry["strategy"], entry.get("sink_size"), entry.get("window_size"), entry.get("fill"), where=where
    )


@dataclass
class Profile:
    """One `HeadPolicy` per head of a model, plus the model's shape and free-form provenance (`meta`)."""

    num_layers: int
    num_heads: int
    head_dim: int | None = None
    default: HeadPolicy = field(default_factory=HeadPolicy)
    heads: dict[tuple[int, int], HeadPolicy] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_type: str = "gpt_neox"

    def __post_init__(self):
        for name in ("num_layers", "num_heads"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ProfileError(f"model.{name}: expected a positive integer, got {value!r}")
        if self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim <= 0):
            raise ProfileError(f"model.head_dim: expected a positive integer or null, got {self.head_dim!r}")
        # every policy checked (and normalised) as HeadPolicy.make would: one built directly, like
        # HeadPolicy("prune"), must not fail later inside a forward, nor HeadPolicy("bogus") run at all
        self.default = _checked_policy(self.default, "default")
        heads = {}
        for key, policy in self.heads.items():
            layer, head = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
            self._check_head(layer, head)
            heads[key] = _checked_policy(policy, f"layer {layer}, head {head}")
            self._check_fill(heads[key], f"layer {layer}, head {head}")
        self.heads = heads
        self._check_fill(self.default, "default")

    def _check_head(self, layer, head):
        if not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ProfileError(f"layer (head {head}): expected 0 <= layer < {self.num_layers}, got {layer!r}")
        if not (is_int(head) and 0 <= head < self.num_heads):
            raise ProfileError(f"head (layer {layer}): expected 0 <= head < {self.num_heads}, got {head!r}")

    def _check_fill(self, policy: HeadPolicy, where: str):
        if policy.fill is not None and self.head_dim is not None and len(policy.fill) != self.head_dim:
            raise ProfileError(f"fill ({where}): expected {self.head_dim} floats (head_dim), got {len(policy.fill)}")

    # --- constructors -------------------------------------------------------------------------------------

    @classmethod
    def uniform(cls, num_layers, num_heads, strategy="sink_window", sink_size=4, window_size=60, head_dim=None):
        """Every head gets the same policy."""
        policy = HeadPolicy.make(
            strategy,
            sink_size if strategy == "sink_window" else None,
            window_size if strategy in ("sink_window", "window_only") else None,
            where="uniform",
        )
        return cls(num_layers, num_heads, head_dim, default=policy, meta={"source": f"uniform {strategy}"})

    @classmethod
    def full(cls, num_layers, num_heads, head_dim=None):
        """The uncompressed baseline: every head keeps everything."""
        return cls.uniform(num_layers, num_heads, "full", head_dim=head_dim)

    @classmethod
    def window_only(cls, num_layers, num_heads, window_size=64, head_dim=None):
        """Seed 004 group A: the last W tokens only."""
        return cls.uniform(num_layers, num_heads, "window_only", window_size=window_size, head_dim=head_dim)

    @classmethod
    def streaming_llm(cls, num_layers, num_heads, sink_size=4, window_size=60, head_dim=None):
        """Seed 004 group B, StreamingLLM (Xiao et al., 2024): S attention sinks + the last W tokens."""
        return cls.uniform(num_layers, num_heads, "sink_window", sink_size, window_size, head_dim=head_dim)

    @classmethod
    def for_model(cls, model, strategy="full", **kwargs):
        """A uniform profile shaped like `model` (a GPTNeoX model or its config)."""
        shape = model_shape(model)
        return cls.uniform(shape["num_layers"], shape["num_heads"], strategy, head_dim=shape["head_dim"], **kwargs)

    @classmethod
    def from_classifications(cls, source, num_layers=None, num_heads=None, head_dim=None):
        """A profile from a `head_classifications.json` (seed 000 schema), path or parsed dict.

        Each head follows its `compression_strategy`: prune, sink_window (sink_size, recommended_window),
        window_only (recommended_window); `none` / `full` (or use_full_cache) keeps the full cache.
        """
        data = _read_json(source) if not isinstance(source, dict) else source
        entries = data.get("classifications") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ProfileError("classifications: expected a non-empty list of per-head objects")
        for i, c in enumerate(entries):
            for key in ("layer_idx", "head_idx"):
                if not is_int(c.get(key)) or c.get(key) < 0:
                    raise ProfileError(
                        f"classifications[{i}].{key}: expected an integer >= 0, got {c.get(key)!r}"
                    )
        num_layers = num_layers or 1 + max(c["layer_idx"] for c in entries)
        num_heads = num_heads or 1 + max(c["head_idx"] for c in entries)
        heads = {}
        for c in entries:
            where = f"layer {c['layer_idx']}, head {c['head_idx']}"
            key = (c["layer_idx"], c["head_idx"])
            if key in heads:
                raise ProfileError(f"classifications ({where}): duplicate head")
            heads[key] = _policy_from_classification(c, where)
        types = Counter(c.get("head_type", "?") for c in entries)
        meta = {"source": "head_classifications", "type_distribution": dict(types)}
        if isinstance(source, (str, os.PathLike)):
            meta["classifications_file"] = os.fspath(source)
        return cls(num_layers, num_heads, head_dim, heads=heads, meta=meta)

    @classmethod
    def head_aware(cls, classifications, **kwargs):
        """The seed's recommended policies per head type (seed 000/002): a profile from a classification."""
        return cls.from_classifications(classifications, **kwargs)

    @classmethod
    def confidence_based(cls, classifications, threshold: float, base_window: int, windows=None):
        """Seed 004 group G (`G_conf{threshold}_base{base_window}`); see headkv_engine.groups."""
        from headkv_engine import groups  # noqa: PLC0415

        return groups.confidence_based(classifications, threshold, base_window, windows)

    @classmethod
    def by_type(cls, classifications, positional: int, mixed: int, gathering: int, group: str = "I"):
        """Seed 004 groups I / J (`I_pos{a}_mix{b}_g{c}`): a window per head type, 4 sinks each."""
        from headkv_engine import groups  # noqa: PLC0415

        return groups.by_type(classifications, positional, mixed, gathering, group)

    @classmethod
    def uniform_aware(cls, classifications, window: int):
        """Seed 004 group K (`K_uniform{w}_aware`): sink 4 + window w everywhere, dead heads pruned."""
        from headkv_engine import groups  # noqa: PLC0415

        return groups.uniform_aware(classifications, window)

    @classmethod
    def from_group_name(cls, name: str, classifications=None, num_layers=None, num_heads=None):
        """The profile a seed 004 configuration name describes (A_window_512, B_streaming_64, G_conf0.7_base64...)."""
        from headkv_engine import groups  # noqa: PLC0415

        return groups.from_group_name(name, classifications, num_layers, num_heads)

    @classmethod
    def from_budget(cls, statistics, mean_tokens: float, length: int | None = None, sink_size: int | None = None,
                    layer_losses=None, kl_weight: float | None = None):
        """Every head's sink and window chosen to cover the most attention mass under a mean budget of
        `mean_tokens` kept tokens (see headkv_engine.budget); `statistics` from hk.analyze or its JSON;
        `layer_losses` (`headkv calibrate`) prices the options by measured loss instead."""
        from headkv_engine import budget  # noqa: PLC0415

        weight = budget.LAYER_LOSS_KL_WEIGHT if kl_weight is None else kl_weight
        return budget.from_budget(statistics, mean_tokens, length=length, sink_size=sink_size,
                                  layer_losses=layer_losses, kl_weight=weight)

    # --- queries ------------------------------------------------------------------------------------------

    def policy(self, layer: int, head: int) -> HeadPolicy:
        self._check_head(layer, head)
        return self.heads.get((layer, head), self.default)

    def policies(self):
        """(layer, head, policy) for every head, layer-major."""
        for layer in range(self.num_layers):
            for head in range(self.num_heads):
                yield layer, head, self.policy(layer, head)

    def kept_tokens(self, length: int) -> torch.Tensor:
        """Tokens kept per head after `length` tokens: LongTensor [num_layers, num_heads]."""
        out = torch.zeros(self.num_layers, self.num_heads, dtype=torch.long)
        for layer, head, policy in self.policies():
            out[layer, head] = policy.kept_tokens(length)
        return out

    def effective_context(self, length: int) -> float:
        """Mean per-head budget as seed 004 counts it (SPEC 7)."""
        return sum(p.budget(length) for _, _, p in self.policies()) / (self.num_layers * self.num_heads)

    def summary(self, length: int = 2048) -> dict:
        """Counts per strategy, and the mean kept tokens per head and KV fraction at `length` tokens."""
        counts = Counter(p.strategy for _, _, p in self.policies())
        kept = self.kept_tokens(length).double()
        return {
            "num_heads": self.num_layers * self.num_heads,
            "strategies": {s: counts.get(s, 0) for s in STRATEGIES},
            "length": length,
            "mean_kept_tokens": kept.mean().item(),
            "kv_fraction": kept.mean().item() / length if length else 0.0,
            "effective_context": self.effective_context(length),
        }

    def layer_tensors(self, layer: int, device=None):
        """Kernel encoding of one layer: sink_size [H], window_size [H] (int64), fill [H, D] or None."""
        sinks, windows, fills = [], [], []
        for head in range(self.num_heads):
            p = self.policy(layer, head)
            sinks.append(p.sink_size)
            windows.append(UNBOUNDED_WINDOW if p.strategy == "full" else p.window_size)
            fills.append(p.fill)
        sink_t = torch.tensor(sinks, dtype=torch.long, device=device)
        window_t = torch.tensor(windows, dtype=torch.long, device=device)
        if all(f is None for f in fills):
            return sink_t, window_t, None
        dim = len(next(f for f in fills if f is not None))
        fill_t = torch.tensor([f if f is not None else [0.0] * dim for f in fills], dtype=torch.float32, device=device)
        return sink_t, window_t, fill_t

    def check_model(self, model) -> None:
        """Raise ProfileError unless this profile was made for a model of `model`'s shape."""
        shape = model_shape(model)
        if self.model_type != shape["model_type"]:
            raise ProfileError(
                f"model.model_type: profile is for {self.model_type!r}, model is {shape['model_type']!r}"
            )
        for name in ("num_layers", "num_heads", "head_dim"):
            mine = getattr(self, name)
            if mine is not None and mine != shape[name]:
                raise ProfileError(f"model.{name}: profile has {mine}, the model has {shape[name]}")
        for layer, head, policy in self.policies():
            if policy.fill is not None and len(policy.fill) != shape["head_dim"]:
                raise ProfileError(
                    f"fill (layer {layer}, head {head}): expected {shape['head_dim']} floats, got {len(policy.fill)}"
                )

    # --- JSON ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        heads = [
            {"layer": layer, "head": head, **policy.to_json()}
            for (layer, head), policy in sorted(self.heads.items())
        ]
        model = {"model_type": self.model_type, "num_layers": self.num_layers, "num_heads": self.num_heads,
                 "head_dim": self.head_dim}
        return {"format": FORMAT, "model": model, "default": self.default.to_json(), "heads": heads, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"profile: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ProfileError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
        model = data.get("model")
        if not isinstance(model, dict):
            raise ProfileError("model: expected an object with model_type, num_layers, num_heads, head_dim")
        default = _policy_from_json(data.get("default", {"strategy": "full"}), "default")
        profile = cls(
            num_layers=model.get("num_layers"),
            num_heads=model.get("num_heads"),
            head_dim=model.get("head_dim"),
            default=default,
            meta=data.get("meta") or {},
            model_type=model.get("model_type", "gpt_neox"),
        )
        entries = data.get("heads", [])
        if not isinstance(entries, list):
            raise ProfileError("heads: expected a list")
        for i, entry in enumerate(entries):
            layer, head = (entry.get(k) if isinstance(entry, dict) else None for k in ("layer", "head"))
            where = f"heads[{i}]: layer {layer}, head {head}"
            for name, value in (("layer", layer), ("head", head)):
                if not is_int(value):
                    raise ProfileError(f"{name} ({where}): expected an integer, got {type(value).__name__} {value!r}")
            profile._check_head(layer, head)
            if (layer, head) in profile.heads:
                raise ProfileError(f"head ({where}): duplicate head")
            policy = _policy_from_json(entry, where)
            profile._check_fill(policy, where)
            profile.heads[(layer, head)] = policy
        return profile

    @classmethod
    def load(cls, path) -> Profile:
        return cls.from_dict(_read_json(path))

    def save(self, path) -> None:
        """Write the profile JSON atomically (a temp file renamed into place)."""
        write_json_atomic(path, self.to_dict())


def _policy_from_classification(c: dict, where: str) -> HeadPolicy:
    strategy = c.get("compression_strategy", "none")
    window = c.get("recommended_window", -1)
    if strategy == "prune" or c.get("can_prune"):
        return HeadPolicy.make("prune", where=where)
    if strategy in ("none", "full") or c.get("use_full_cache"):
        return HeadPolicy.make("full", where=where)
    if strategy == "sink_window":
        return HeadPolicy.make("sink_window", c.get("sink_size", 4), window, where=where)
    if strategy == "window_only":
        return HeadPolicy.make("window_only", None, window, where=where)
    raise ProfileError(
        f"compression_strategy ({where}): expected none/full/sink_window/window_only/prune, got {strategy!r}"
    )


def model_shape(model) -> dict:
    """model_type, num_layers, num_heads, head_dim of a GPTNeoX model or config."""
    config = getattr(model, "config", model)
    heads = config.num_attention_heads
    return {
        "model_type": getattr(config, "model_type", "gpt_neox"),
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


def _read_json(path):
    return read_json(path, error=ProfileError)


def write_json_atomic(path, data) -> None:
    """Write JSON to `path` via a temp file in the same directory and an atomic rename.

    Non-finite floats (a NaN statistic, an infinite perplexity) are written as null, so the file is always
    strict JSON (allow_nan=False refuses anything else that would not be)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite_or_null(data), f, indent=2, allow_nan=False)
        f.write("\n")


def _finite_or_null(value):
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value
