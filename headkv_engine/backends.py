"""Backend selection: which implementation computes an op.

`torch` is the pure-PyTorch reference (any device), `cpu` the compiled C++ extension
(`headkv_engine._C`), `triton` and `metal` the GPU backends. `auto` picks the fastest one
available for the tensors' device and says so once when it has to fall back.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else why not."""
    return _triton_reason(device.type, os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _triton_reason(device_type: str, interpret: bool) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'headkv-engine[cuda]')"
    if device_type == "cuda" or (device_type == "cpu" and interpret):
        return None
    return f"Triton runs on CUDA devices (or on CPU with TRITON_INTERPRET=1), not on {device_type}"


def metal_unavailable_reason(device: torch.device) -> str | None:
    """None when the Metal kernels can run on `device`, else why not."""
    return _metal_reason(device.type, os.environ.get("HEADKV_METAL_EMULATE") == "1")


@functools.cache
def _metal_reason(device_type: str, emulate: bool) -> str | None:
    if device_type == "mps":
        if not hasattr(torch.mps, "compile_shader"):
            return f"torch {torch.__version__} has no torch.mps.compile_shader (PyTorch >= 2.7 compiles Metal sources)"
        return None
    if device_type == "cpu" and emulate:
        from headkv_engine.metal_emulator import emulation_unavailable_reason  # noqa: PLC0415

        return emulation_unavailable_reason()
    return f"Metal runs on Apple MPS devices (or on CPU with HEADKV_METAL_EMULATE=1), not on {device_type}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu" and cpu_unavailable_reason() is None:
        names.append("cpu")
    if triton_unavailable_reason(device) is None:
        names.append("triton")
    if metal_unavailable_reason(device) is None:
        names.append("metal")
    return names


@functools.cache
def _warn_auto_fallback(reason: str) -> None:
    warnings.warn(f"headkv_engine: backend 'auto' uses 'torch' because {reason}", RuntimeWarning, stacklevel=4)


# what `auto` picks per device type
AUTO_BACKENDS = {"cpu": "cpu", "cuda": "triton", "mps": "metal"}


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when the kernel backend `backend` (cpu, triton, metal) can run on `device`, else why not."""
    if backend == "cpu":
        return cpu_unavailable_reason()
    if backend == "triton":
        return triton_unavailable_reason(device)
    return metal_unavailable_reason(device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend name into the one that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return backend  # (traced by torch.compile without a graph break)
    return _resolve_kernel_backend(backend, device)


@torch.compiler.disable  # host-side choice (cached lookups Dynamo cannot trace soundly); the kernels run eagerly anyway
def _resolve_kernel_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        chosen = AUTO_BACKENDS.get(device.type)
        if chosen is None:
            _warn_auto_fallback(f"no kernel backend serves {device.type} devices in this build")
            return "torch"
        reason = unavailable_reason(chosen, device)
        if reason is None:
            return chosen
        _warn_auto_fallback(reason)
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        hint = ". Reinstall with `pip install .`" if backend == "cpu" else ""
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}{hint}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got device {device}")
    return backend
