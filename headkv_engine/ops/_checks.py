"""Argument checks shared by the ops: what every backend may assume about its inputs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def gather_slots(pool: torch.Tensor, base: torch.Tensor, length: torch.Tensor):
    """Rows base..base+length of `pool` for every (sequence, head), padded: ([B, H, L, ...], valid [B, H, L])."""
    max_len = int(length.max()) if length.numel() else 0
    offsets = torch.arange(max_len, device=base.device)
    valid = offsets < length[..., None]
    index = torch.where(valid, base[..., None] + offsets, 0)
    return pool[index], valid
