"""Where a result was measured: the commit of the code and the processor, recorded beside every figure."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def commit() -> str:
    """The short commit of this checkout, with " + uncommitted changes" when tracked files differ from it;
    $HEADKV_COMMIT where the tree has no .git (a copy sent to another machine); "unknown" for an installed
    package."""
    if os.environ.get("HEADKV_COMMIT"):
        return os.environ["HEADKV_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args) -> str:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = head and git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    return (head + (" + uncommitted changes" if dirty else "")) if head else "unknown"


def processor(device="cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (on a Mac, its chip: the GPU of MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True).stdout.strip() or platform.machine()
        except (OSError, subprocess.CalledProcessError):
            return platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
