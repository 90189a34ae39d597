"""Backend selection: which implementation computes an op.

`torch` is the pure-PyTorch reference (any device), `cpu` the compiled C++ extension
(`headkv_engine._C`), `triton` and `metal` the GPU backends. `auto` picks the fastest one
available for the tensors' device and says so once when it has to fall back.
"""

from __future__ import annotations

import functools
import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "metal")


@functools.cache
def load_cpu_extension():
    """Import the compiled extension; returns (module, None) or (None, reason)."""
    try:
        from headkv_engine import _C  # noqa: PLC0415
    except ImportError as exc:  # not built, or built for another Python
        return None, f"the compiled extension headkv_engine._C could not be imported ({exc})"
    return _C, None


def cpu_unavailable_reason() -> str | None:
    """None when the `cpu` backend works, else a sentence saying why it does not."""
    return load_cpu_extension()[1]


def available_backends() -> list[str]:
    names = ["torch"]
    if cpu_unavailable_reason() is None:
        names.append("cpu")
    return names


@functools.cache
def _warn_auto_fallback(reason: str) -> None:
    warnings.warn(f"headkv_engine: backend 'auto' uses 'torch' on CPU because {reason}", RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend name into the one that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            reason = cpu_unavailable_reason()
            if reason is None:
                return "cpu"
            _warn_auto_fallback(reason)
            return "torch"
        # GPU kernels come with their own backends; until they are present the reference runs there.
        return "torch"
    if backend == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend 'cpu' is unavailable: {reason}. Reinstall with `pip install .`")
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got device {device}")
    if backend in ("triton", "metal"):
        raise NotImplementedError(f"backend {backend!r} is not part of this build; use 'torch' or 'auto'")
    return backend
