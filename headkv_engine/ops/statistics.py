"""head_statistics: per-head attention statistics of a block of queries (SPEC 5), without a [T, T] matrix.

For the queries at positions `q_start .. q_start + Tq - 1` of one sequence (post-rotary, [H, Tq, D]) over the
keys at positions `0 .. Tk - 1` ([H, Tk, D], Tk = q_start + Tq), every query at position q >= min_query adds to
its head's sums:

- entropy -sum p log p (and its square), max_j p_j, uniformity log(q+1) - entropy;
- the mass on four disjoint regions, first match wins: sink j < sink_size, local q - local_window < j <= q,
  recent j >= q + 1 - ceil(recent_ratio * (q + 1)), global the rest;
- `relative`: 64 bins of mass by distance d = q - j (bin 63: d >= 63);
- `log2`: mass by distance on a log scale, bin 0: d = 0, bin i >= 1: 2^(i-1) <= d < 2^i;
- `sinks`: mass on the first s keys for s in SINK_SIZES.

Sums over blocks and sequences add up; `finalize` turns them into means. Accumulation is in float64.
"""

from __future__ import annotations

import math

import torch

from headkv_engine.backends import resolve_backend
from headkv_engine.kernel_sources import triton_launcher
from headkv_engine.ops._checks import FLOAT_DTYPES, check_kernel_inputs, check_tensor

RELATIVE_BINS = 64
SINK_SIZES = (1, 2, 4, 8, 16)
REGIONS = ("sink", "local", "recent", "global")


def log2_bins(max_distance: int) -> int:
    """Number of log2 distance bins that cover distances 0 .. max_distance."""
    return 1 if max_distance < 1 else 2 + int(math.floor(math.log2(max_distance)))


def empty_sums(heads: int, log2: int, device="cpu") -> dict:
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    return {
        "count": zeros(heads), "entropy": zeros(heads), "entropy_sq": zeros(heads), "max_prob": zeros(heads),
        "uniformity": zeros(heads), "regions": zeros(heads, len(REGIONS)), "relative": zeros(heads, RELATIVE_BINS),
        "log2": zeros(heads, log2), "sinks": zeros(heads, len(SINK_SIZES)),
    }


def add_sums(total: dict, part: dict) -> dict:
    """total + part, key by key (the log2 histogram padded to the longer of the two)."""
    out = {}
    for key, value in part.items():
        mine = total[key]
        if key == "log2" and mine.shape[1] != value.shape[1]:
            width = max(mine.shape[1], value.shape[1])
            mine = torch.nn.functional.pad(mine, (0, width - mine.shape[1]))
            value = torch.nn.functional.pad(value, (0, width - value.shape[1]))
        out[key] = mine + value
    return out


def head_statistics_reference(q, k, q_start, *, scale, sink_size, local_window, recent_ratio, min_query,
                              query_block=128):
    """The definition in plain PyTorch, a block of queries at a time (fp64 probabilities)."""
    heads, tokens_q, _ = q.shape
    tokens_k = k.shape[1]
    sums = empty_sums(heads, log2_bins(tokens_k - 1), q.device)
    keys = k.double()
    j = torch.arange(tokens_k, device=q.device)
    for start in range(0, tokens_q, query_block):
        pos = q_start + torch.arange(start, min(start + query_block, tokens_q), device=q.device)  # [Qb]
        take = pos >= min_query
        if not take.any():
            continue
        pos = pos[take]
        scores = torch.einsum("hqd,hkd->hqk", q[:, start : start + query_block][:, take].double(), keys) * scale
        causal = j[None, :] <= pos[:, None]  # [Qb, Tk]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
        entropy = -plogp.sum(-1)  # [H, Qb]
        distance = pos[:, None] - j[None, :]
        recent_start = pos + 1 - torch.ceil(recent_ratio * (pos + 1).double()).long()
        sink = j[None, :] < sink_size
        local = ~sink & (distance < local_window) & causal
        recent = ~sink & ~local & (j[None, :] >= recent_start[:, None]) & causal
        other = causal & ~sink & ~local & ~recent
        regions = torch.stack([(probs * m).sum(-1) for m in (sink & causal, local, recent, other)], dim=-1)
        rel_bin = distance.clamp(0, RELATIVE_BINS - 1)
        log_bin = torch.where(distance > 0, torch.floor(torch.log2(distance.clamp(min=1).double())).long() + 1, 0)
        log_bin = log_bin.clamp(max=sums["log2"].shape[1] - 1)
        flat = probs.masked_fill(~causal, 0)
        sums["count"] += take.sum()
        sums["entropy"] += entropy.sum(-1)
        sums["entropy_sq"] += (entropy**2).sum(-1)
        sums["max_prob"] += probs.max(-1).values.sum(-1)
        sums["uniformity"] += (torch.log((pos + 1).double())[None] - entropy).sum(-1)
        sums["regions"] += regions.sum(1)
        sums["relative"] += _binned(flat, rel_bin, RELATIVE_BINS)
        sums["log2"] += _binned(flat, log_bin, sums["log2"].shape[1])
        sums["sinks"] += torch.stack([flat[..., :s].sum((-1, -2)) for s in SINK_SIZES], dim=-1)
    return sums


def _binned(probs, bins, width):
    """Sum of probs [H, Q, K] into `width` bins given per (Q, K): [H, width]."""
    heads = probs.shape[0]
    out = torch.zeros(heads, width, dtype=torch.float64, device=probs.device)
    return out.index_add_(1, bins.flatten(), probs.reshape(heads, -1))


def head_statistics(q, k, q_start=0, *, scale, sink_size=4, local_window=8, recent_ratio=0.1, min_query=None,
                    backend="auto"):
    """Statistic sums of one sequence's query block q [H, Tq, D] (positions q_start..) over keys k [H, Tk, D]
    (positions 0..Tk-1, Tk = q_start + Tq). min_query defaults to sink_size + local_window (SPEC 5)."""
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, dim=3, dtypes=FLOAT_DTYPES, device=q.device)
    heads, tokens_q, head_dim = q.shape
    if k.shape[0] != heads or k.shape[2] != head_dim:
        raise ValueError(f"k must be [{heads}, Tk, {head_dim}] like q, got {tuple(k.shape)}")
    for name, value, least in (("q_start", q_start, 0), ("sink_size", sink_size, 0), ("local_window", local_window, 1),
                               ("min_query", min_query, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if k.shape[1] != q_start + tokens_q:
        raise ValueError(f"k must hold the {q_start + tokens_q} keys up to the last query, got {k.shape[1]}")
    if not 0 <= recent_ratio <= 1:
        raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
    min_query = sink_size + local_window if min_query is None else min_query
    kind = resolve_backend(backend, q.device)
    check_kernel_inputs(kind, q, k)
    if kind == "torch":
        return head_statistics_reference(q, k, q_start, scale=scale, sink_size=sink_size, local_window=local_window,
                                         recent_ratio=recent_ratio, min_query=min_query)
    bins = log2_bins(k.shape[1] - 1)
    if kind == "cpu":
        from headkv_engine.ops import _cpu  # noqa: PLC0415

        buffer = _cpu.head_statistics(q, k, q_start, scale, sink_size, local_window, recent_ratio, min_query, bins)
    elif kind == "triton":
        buffer = triton_launcher("statistics", "head_statistics")(
            q.contiguous(), k.contiguous(), _recent_start(q_start, tokens_q, recent_ratio, q.device), q_start,
            float(scale), sink_size, local_window, min_query, bins,
        )
    else:  # metal
        from headkv_engine.ops import _metal  # noqa: PLC0415

        # (the recent-region starts in fp64 on the host: MPS has no fp64)
        recent_start = _recent_start(q_start, tokens_q, recent_ratio, "cpu").to(q.device)
        fields = 5 + len(REGIONS) + RELATIVE_BINS + len(SINK_SIZES) + bins
        buffer = _metal.head_statistics(q, k, recent_start, q_start, float(scale), sink_size, local_window, min_query,
                                        bins, fields)
    return sums_from_buffer(buffer, bins)


def _recent_start(q_start: int, tokens_q: int, recent_ratio: float, device) -> torch.Tensor:
    """First key of each query's recent region, computed in fp64 exactly as the reference does."""
    pos = q_start + torch.arange(tokens_q, device=device)
    return pos + 1 - torch.ceil(recent_ratio * (pos + 1).double()).long()


def sums_from_buffer(buffer: torch.Tensor, bins: int) -> dict:
    """The kernels' output rows [H, fields] (count, entropy, entropy_sq, max_prob, uniformity, regions, relative
    bins, sink sizes, log2 bins) as the reference's dict of sums."""
    sums = empty_sums(buffer.shape[0], bins, buffer.device)
    sums["count"], sums["entropy"], sums["entropy_sq"] = buffer[:, 0], buffer[:, 1], buffer[:, 2]
    sums["max_prob"], sums["uniformity"] = buffer[:, 3], buffer[:, 4]
    sums["regions"] = buffer[:, 5:9]
    sums["relative"] = buffer[:, 9 : 9 + RELATIVE_BINS]
    sinks_at = 9 + RELATIVE_BINS
    sums["sinks"] = buffer[:, sinks_at : sinks_at + len(SINK_SIZES)]
    sums["log2"] = buffer[:, sinks_at + len(SINK_SIZES) :]
    return sums
