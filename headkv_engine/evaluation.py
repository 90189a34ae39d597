"""Perplexity and next-token accuracy of a model under a profile (SPEC section 7).

Because prefill applies each head's mask exactly as token-by-token decoding would (SPEC 2), a whole text is
evaluated in one masked pass (`mode="one_pass"`, optionally in `chunk_size` pieces through the cache);
`mode="stepwise"` feeds one token at a time, the way generation sees it, and serves as the check.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from headkv_engine.patching import patch_model
from headkv_engine.profile import Profile

MODES = ("one_pass", "stepwise")


@dataclass
class EvalResult:
    """perplexity = exp(mean NLL of tokens 1..T-1); accuracy = share of them that are the arg-max prediction;
    effective_context = mean per-head budget (S+W, W, T or 0); tokens = predicted tokens over all sequences."""

    perplexity: float
    accuracy: float
    effective_context: float
    tokens: int
    nll: float
    mode: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sequences(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [T] or [batch, T], got shape {tuple(input_ids.shape)}")
        rows = list(input_ids)
    else:
        rows = [torch.as_tensor(row) for row in input_ids]
    if not rows:
        raise ValueError("input_ids: expected at least one sequence, got none")
    for i, row in enumerate(rows):
        if row.dim() != 1 or row.numel() < 2:
            raise ValueError(f"input_ids[{i}]: expected a sequence of at least 2 tokens, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise ValueError(f"input_ids[{i}]: expected integer token ids, got dtype {row.dtype}")
    return [row.long() for row in rows]


@torch.no_grad()
def _sequence_logits(model, ids: torch.Tensor, mode: str, chunk_size: int | None) -> torch.Tensor:
    """Logits [T, V] of one sequence, computed through the (patched) model's cache."""
    step = 1 if mode == "stepwise" else (chunk_size or ids.numel())
    cache, pieces = None, []
    for start in range(0, ids.numel(), step):
        out = model(ids[None, start : start + step], cache=cache, use_cache=True)
        cache = out.cache
        pieces.append(out.logits[0].float())
    return torch.cat(pieces)


def evaluate(
    model,
    input_ids,
    profile: Profile | None = None,
    *,
    mode: str = "one_pass",
    chunk_size: int | None = None,
    backend: str = "auto",
    position_mode: str = "absolute",
    progress: bool = False,
) -> EvalResult:
    """Evaluate `model` (a GPTNeoXForCausalLM, not patched) under `profile` (full cache when None).

    input_ids: [T], [batch, T] or a list of sequences; each is evaluated from its first token.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"model: expected a GPTNeoXForCausalLM (a model with a language-model head), got "
                        f"{type(model).__name__}")
    config = model.config
    profile = profile or Profile.full(config.num_hidden_layers, config.num_attention_heads)
    sequences = _sequences(input_ids)
    device = next(model.parameters()).device
    nll_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    with patch_model(model, profile, backend=backend, position_mode=position_mode):
        for ids in tqdm(sequences, desc="evaluate", disable=not progress, leave=False):
            ids = ids.to(device)
            logits = _sequence_logits(model, ids, mode, chunk_size)[:-1]
            targets = ids[1:]
            nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    nll = nll_sum / count
    return EvalResult(
        perplexity=math.exp(nll),
        accuracy=correct / count,
        effective_context=profile.effective_context(max(ids.numel() for ids in sequences)),
        tokens=count,
        nll=nll,
        mode=mode,
        seconds=time.perf_counter() - start,
    )
