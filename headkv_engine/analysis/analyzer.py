"""hk.analyze: per-head attention statistics of a GPTNeoX on real text, without attention matrices.

The model runs unpatched, chunk by chunk through a DynamicCache; while it runs, every attention module is
replaced by a capturing forward that computes the same output (scaled dot-product attention) and hands its
post-rotary queries and all keys so far to the `head_statistics` op. No `output_attentions`, no [T, T] matrix.
"""

from __future__ import annotations

import contextlib
import os
import time
import types
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from headkv_engine import __version__
from headkv_engine.analysis.statistics import OCTAVE_FIELDS, HeadStatistics, from_sums, save_statistics
from headkv_engine.backends import resolve_backend
from headkv_engine.ops.statistics import add_sums, empty_sums, head_statistics
from headkv_engine.patching import install_forward, is_patched, restore_forward


@dataclass
class AnalysisResult:
    """`statistics`: one HeadStatistics per head, layer-major; `model_info`: what was analysed and how."""

    statistics: list[HeadStatistics]
    model_info: dict
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def save(self, output_dir) -> str:
        """Write `head_statistics.json` (seed 000 schema plus provenance) into output_dir; returns its path."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "head_statistics.json")
        save_statistics(self.statistics, self.model_info, path)
        return path


def _capturing_forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kwargs):
    batch, tokens = hidden_states.shape[:2]
    qkv = self.query_key_value(hidden_states).view(batch, tokens, -1, 3 * self.head_size).transpose(1, 2)
    query, key, value = qkv.chunk(3, dim=-1)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys, values = layer_past.update(key, value, self.layer_idx)
    start = keys.shape[2] - tokens
    self._headkv_capture(self.layer_idx, query[0], keys[0], start, self.scaling)
    if start == 0:  # the first piece: plain causal attention (the fast path of scaled_dot_product_attention)
        visible = None
    else:  # query start + i sees keys 0..start + i
        positions = torch.arange(keys.shape[2], device=keys.device)
        visible = positions[None, :] <= positions[start:, None]
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible,
                                                           is_causal=start == 0, scale=self.scaling)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    return self.dense(out), None


@contextlib.contextmanager
def capture_queries_and_keys(model, callback):
    """Within the block, every attention module of `model` calls callback(layer, q [H, Tq, D], k [H, Tk, D],
    start, scale) with its post-rotary queries and all keys so far."""
    if is_patched(model):
        raise RuntimeError("analyze needs an unpatched model; call headkv_engine.unpatch_model(model) first")
    base = getattr(model, "gpt_neox", model)
    saved = []
    try:
        for layer in base.layers:
            layer.attention._headkv_capture = callback
            # (under accelerate's hooks, if any: they keep moving the inputs; a wrapper set before is restored)
            saved.append(install_forward(layer.attention, types.MethodType(_capturing_forward, layer.attention)))
        yield
    finally:
        for record in saved:
            del restore_forward(record)._headkv_capture


def _sequences(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        rows = [input_ids] if input_ids.dim() == 1 else list(input_ids)
    else:
        rows = [torch.as_tensor(row) for row in input_ids]
    if not rows or any(row.dim() != 1 or row.numel() == 0 for row in rows):
        raise ValueError("input_ids: expected token ids [T], [batch, T] or a list of 1-D sequences")
    return rows


def octave_pieces(first: int, end: int):
    """Split query positions first .. end - 1 at powers of two: (first, end) of every piece, each within one
    octave (position 0, or 2^(b-1) .. 2^b - 1)."""
    while first < end:
        boundary = 1 if first == 0 else 1 << first.bit_length()
        yield first, min(end, boundary)
        first = min(end, boundary)


@torch.no_grad()
def analyze(model, input_ids, *, sink_size: int = 4, local_window: int = 8, recent_ratio: float = 0.1,
            chunk_size: int = 512, backend: str = "auto", progress: bool = True, model_name: str | None = None
            ) -> AnalysisResult:
    """Statistics of every head of `model` (GPTNeoXForCausalLM / GPTNeoXModel) over the given sequences (SPEC 5).

    input_ids: one sequence [T], equal-length sequences [batch, T] (no padding), or a list of 1-D sequences of
    any lengths. Each sequence runs through the model body in pieces of `chunk_size` tokens with a cache; the
    statistics are means over every query at position >= sink_size + local_window of every sequence. `backend`
    picks the statistics kernel (auto: the C++ kernel on CPU, Triton on CUDA, Metal on MPS); the model itself
    runs unpatched.
    """
    config = model.config
    if getattr(config, "model_type", None) != "gpt_neox":
        raise TypeError("analyze supports GPTNeoX models (model_type 'gpt_neox'), got "
                        f"{getattr(config, 'model_type', None)!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if sink_size < 0 or local_window < 1:
        raise ValueError(f"sink_size must be >= 0 and local_window >= 1, got {sink_size} and {local_window}")
    sequences = _sequences(input_ids)
    if max(row.numel() for row in sequences) <= sink_size + local_window:
        raise ValueError(f"input_ids: no query to analyse; the statistics start at position sink_size + "
                         f"local_window = {sink_size + local_window}, so give a sequence longer than that")
    device = next(model.parameters()).device
    backend = resolve_backend(backend, device)  # fails here, before the run, if it is unavailable
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    sums = [empty_sums(heads, 1) for _ in range(layers)]
    octaves = [{} for _ in range(layers)]  # per layer: {octave: sums of the budget fields}

    def add(layer, q, k, start, scale):
        # one call per query-position octave, so that from_budget can tell what a shorter context sees
        for first, end in octave_pieces(start, start + q.shape[1]):
            part = head_statistics(q[:, first - start : end - start], k[:, :end], first, scale=scale,
                                   sink_size=sink_size, local_window=local_window, recent_ratio=recent_ratio,
                                   backend=backend)
            part = {key: value.cpu() for key, value in part.items()}
            sums[layer] = add_sums(sums[layer], part)
            octave = first.bit_length()
            budget_part = {key: part[key] for key in OCTAVE_FIELDS}
            seen = octaves[layer].get(octave)
            octaves[layer][octave] = budget_part if seen is None else add_sums(seen, budget_part)

    body = getattr(model, "gpt_neox", model)  # the statistics need no logits: skip the LM head
    total = sum(-(-row.numel() // chunk_size) for row in sequences)
    began = time.perf_counter()
    with capture_queries_and_keys(model, add), tqdm(total=total, desc="analyze", disable=not progress) as bar:
        for ids in sequences:
            cache = DynamicCache(config=config)
            for start in range(0, ids.numel(), chunk_size):
                body(ids[None, start : start + chunk_size].to(device), cache=cache, use_cache=True)
                bar.update(1)
    statistics = [s for layer in range(layers) for s in from_sums(sums[layer], layer, octaves[layer])]
    model_info = {
        "num_layers": layers, "num_heads": heads, "sink_size": sink_size, "local_window": local_window,
        "recent_ratio": recent_ratio, "model": model_name or getattr(config, "_name_or_path", "") or "gpt_neox",
        "tokens": int(sum(row.numel() for row in sequences)), "sequences": len(sequences),
        "queries_per_head": int(sums[0]["count"][0]), "chunk_size": chunk_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "backend": backend, "headkv_engine_version": __version__,
    }
    return AnalysisResult(statistics, model_info, seconds=time.perf_counter() - began)
