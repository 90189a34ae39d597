"""Argument checks shared by the ops: what every backend may assume about its inputs."""

from __future__ import annotations

import torch

# what the torch reference takes; the compiled, Triton and Metal kernels take KERNEL_FLOAT_DTYPES
# (check_kernel_inputs refuses the rest once the backend is known)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t: torch.Tensor, *, dim: int, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_pools(k_pool, v_pool, head_dim: int, device) -> None:
    check_tensor("k_pool", k_pool, dim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_pool", v_pool, dim=2, dtypes=FLOAT_DTYPES, device=device)
    check_shape("v_pool", v_pool, k_pool.shape)
    if k_pool.shape[1] != head_dim:
        raise ValueError(f"k_pool rows must have head_dim={head_dim} values, got {k_pool.shape[1]}")
    if v_pool.dtype != k_pool.dtype:
        raise TypeError(f"v_pool dtype {v_pool.dtype} must equal k_pool dtype {k_pool.dtype}")


def check_index(name: str, t: torch.Tensor, shape: tuple, device) -> None:
    check_tensor(name, t, dim=len(shape), dtypes=(torch.int64,), device=device)
    check_shape(name, t, shape)


def check_fill(fill, num_heads: int, head_dim: int, device) -> None:
    if fill is None:
        return
    check_tensor("fill", fill, dim=2, device=device)
    check_shape("fill", fill, (num_heads, head_dim))


def rows_checked_here(kind: str, device: torch.device) -> bool:
    """Whether the dispatcher checks in Python that the rows lie in the pools: for the torch reference, and for the
    GPU kernels run on CPU tensors (Triton's interpreter, the Metal emulator), where reading the indices is free.
    The C++ kernels check it themselves; launches on a GPU take it as given (a read would synchronise)."""
    return kind == "torch" or (kind in ("triton", "metal") and device.type == "cpu")


def check_rows_in_pools(base: torch.Tensor, length: torch.Tensor, num_rows: int) -> None:
    """Each head's rows base .. base + length lie inside the pools' `num_rows` rows.

    Reads the index tensors: the dispatchers call it where `rows_checked_here` says so.
    """
    # (base > num_rows - length, not base + length > num_rows: the sum of two huge values wraps)
    bad = (length < 0) | (length > num_rows) | ((length > 0) & ((base < 0) | (base > num_rows - length)))
    if bool(bad.any()):
        b, h = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"base/length: rows base .. base + length of (sequence {b}, head {h}) (base {int(base[b, h])}, length "
            f"{int(length[b, h])}) fall outside the pools' {num_rows} rows"
        )


def mark_positions_checked(positions: torch.Tensor) -> None:
    """Record that `positions` are padding-then-consecutive (HeadKVCache builds them so), at the tensor's current
    version: every layer's prefill and append of a step then skip the check, which on a GPU reads values back."""
    positions._headkv_checked_version = positions._version


def check_block_positions(positions: torch.Tensor) -> None:
    """A block's positions [B, T]: each row is -1 (left padding), then consecutive positions.

    The kernels derive each column's position from the block's last one. A one-token block (a decode step) is
    not read: on a GPU that would cost a synchronisation per step.
    """
    if positions.shape[1] < 2:
        return  # one column is padding-then-consecutive whatever it holds (and decode steps stay free of a check)
    if getattr(positions, "_headkv_checked_version", None) == positions._version:
        return
    if positions.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # no value can be read back under CUDA graph capture: the graph replays a launch checked eagerly
    broken = torch.zeros_like(positions, dtype=torch.bool)  # [B, T]: column t does not follow column t - 1
    broken[:, 1:] = (positions[:, :-1] >= 0) & (positions[:, 1:] != positions[:, :-1] + 1)
    broken |= positions < -1
    if bool(broken.any()):
        row, col = (int(i) for i in broken.nonzero()[0])
        shown = positions[row, max(0, col - 3) : col + 3].tolist()
        raise ValueError(
            "positions: each row must be -1 (left padding) followed by consecutive positions; row "
            f"{row} has {int(positions[row, col])} at column {col} (columns {max(0, col - 3)}..: {shown})"
        )


def check_kernel_inputs(kind: str, *tensors) -> None:
    """What the compiled, Triton and Metal kernels cannot take, refused once the backend is resolved:
    float64 tensors, and inputs that record gradients (they have no backward: autograd could not connect their
    output to its inputs, a silent zero gradient)."""
    if kind == "torch":
        return
    for t in tensors:
        if t is not None and t.dtype not in KERNEL_FLOAT_DTYPES:
            raise TypeError(f"backend {kind!r} computes in {[str(d) for d in KERNEL_FLOAT_DTYPES]}, got {t.dtype}: "
                            "use backend='torch' (the reference) for this dtype, or cast the model")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"backend {kind!r} computes no gradients, and an input requires grad: call it under "
                         "torch.no_grad() (inference), or use backend='torch' (training)")


def gather_slots(pool: torch.Tensor, base: torch.Tensor, length: torch.Tensor):
    """Rows base..base+length of `pool` for every (sequence, head), padded: ([B, H, L, ...], valid [B, H, L])."""
    max_len = int(length.max()) if length.numel() else 0
    offsets = torch.arange(max_len, device=base.device)
    valid = offsets < length[..., None]
    index = torch.where(valid, base[..., None] + offsets, 0)
    rows = pool[index]
    # padded slots are zeros, not row 0: that row is another head's, and a NaN there would reach this head's
    # output through a zero attention weight (0 * NaN)
    return rows.masked_fill(~valid.view(*valid.shape, *(1,) * (pool.dim() - 1)), 0), valid
