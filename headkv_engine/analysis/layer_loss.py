"""Per-layer loss of truncated attention: what keeping only sinks + a window in one layer costs the model.

Attention statistics say what heads attend to, not what the model loses without it: a layer whose heads attend
broadly may still predict better without the far past. `measure_layer_losses` switches every head of one layer
at a time to `sink_size` sinks + a window and records the rise of the mean next-token loss (nats) over the full
cache on a calibration text, for each window of a grid. `Profile.from_budget(..., layer_losses=...)` prices its
options with them.
"""

from __future__ import annotations

import math
import os

from tqdm.auto import tqdm

from headkv_engine.evaluation import evaluate
from headkv_engine.files import read_json
from headkv_engine.profile import HeadPolicy, Profile, ProfileError, is_int

LAYER_LOSSES_FORMAT = "headkv-layer-losses/1"
WINDOWS = (16, 32, 64, 128, 192, 256, 384)


def measure_layer_losses(model, input_ids, *, sink_size: int = 4, windows=WINDOWS, backend: str = "auto",
                         progress: bool = False) -> dict:
    """{"format", "sink_size", "windows", "loss_increase": [layer][window], "tokens", "full_loss"}: the mean
    next-token loss with every head of one layer at `sink_size` + window, minus the full cache's, on `input_ids`
    (a sequence, a batch or a list of windows, as `evaluate` takes). Costs 1 + layers x len(windows) evaluations."""
    windows = sorted(int(w) for w in windows)
    if not windows or windows[0] < 1:
        raise ValueError(f"windows (--window-sizes): expected window sizes >= 1, got {windows}")
    if len(set(windows)) != len(windows):  # a repeated window would only be measured twice
        raise ValueError(f"windows (--window-sizes): expected distinct window sizes, got {windows}")
    if sink_size < 0:
        raise ValueError(f"sink_size: expected >= 0, got {sink_size}")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    full = evaluate(model, input_ids, Profile.full(layers, heads), backend=backend)
    policy = {w: HeadPolicy.keeping(sink_size, w) for w in windows}
    loss = [[0.0] * len(windows) for _ in range(layers)]
    pairs = [(layer, k) for layer in range(layers) for k in range(len(windows))]
    for layer, k in tqdm(pairs, desc="layer losses", disable=not progress):
        profile = Profile(layers, heads, heads={(layer, h): policy[windows[k]] for h in range(heads)})
        loss[layer][k] = evaluate(model, input_ids, profile, backend=backend).nll - full.nll
    return {"format": LAYER_LOSSES_FORMAT, "sink_size": sink_size, "windows": windows, "loss_increase": loss,
            "tokens": full.tokens, "full_loss": full.nll}


def load_layer_losses(layer_losses, num_layers: int | None = None) -> dict:
    """A layer-losses dict from a path or a dict, checked; with `num_layers`, also that it has one row per layer
    of that model. Errors name the file."""
    where = ""
    if isinstance(layer_losses, (str, bytes)) or hasattr(layer_losses, "__fspath__"):
        path = os.fsdecode(layer_losses)
        where = f" (in {path})"
        layer_losses = read_json(path, error=ProfileError, what="layer_losses: ")
    if not isinstance(layer_losses, dict) or layer_losses.get("format") != LAYER_LOSSES_FORMAT:
        raise ProfileError(f"layer_losses: expected a {LAYER_LOSSES_FORMAT!r} file from `headkv calibrate`{where}")
    windows, loss = layer_losses.get("windows"), layer_losses.get("loss_increase")
    if not isinstance(windows, list) or not windows or not all(is_int(w) and w >= 1 for w in windows):
        raise ProfileError(f"layer_losses.windows: expected a non-empty list of window sizes >= 1, got "
                           f"{windows!r}{where}")
    if len(set(windows)) != len(windows):
        raise ProfileError(f"layer_losses.windows: expected distinct window sizes, got {windows!r}{where}")
    if not isinstance(loss, list) or not loss or any(not isinstance(row, list) or len(row) != len(windows)
                                                     for row in loss):
        raise ProfileError(f"layer_losses.loss_increase: expected one row of {len(windows)} values per layer{where}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for row in loss
               for v in row):
        raise ProfileError(f"layer_losses.loss_increase: expected finite numbers{where}")
    if num_layers is not None and len(loss) != num_layers:
        raise ProfileError(f"layer_losses.loss_increase: expected one row per layer of the model ({num_layers}), "
                           f"got {len(loss)} (model {layer_losses.get('model')!r}){where}")
    return layer_losses


def layer_loss(layer_losses: dict, layer: int, window: int) -> float:
    """The measured loss of `layer` at the measured window nearest to `window` (the smaller one on a tie)."""
    windows = layer_losses["windows"]
    if not 0 <= layer < len(layer_losses["loss_increase"]):
        rows = len(layer_losses["loss_increase"])
        raise ProfileError(f"layer_losses: no row for layer {layer} (the file has {rows})")
    k = min(range(len(windows)), key=lambda i: abs(windows[i] - window))
    return float(layer_losses["loss_increase"][layer][k])
