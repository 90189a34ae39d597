"""Where a result was measured: the commit of the code and the processor, recorded beside every figure."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def commit() -> str:
    """The short commit of this checkout; $HEADKV_COMMIT where the tree has no .git (a copy sent to another
    machine); "unknown" for an installed package."""
    if os.environ.get("HEADKV_COMMIT"):
        return os.environ["HEADKV_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return run.stdout.strip() or "unknown"


def processor(device="cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
