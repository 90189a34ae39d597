"""Where the Triton and Metal kernel sources are, and how their Python launchers are imported.

An installed wheel carries them as `headkv_engine/kernels/`; a source checkout has them at `kernels/` beside
the package. They are imported under private names, never as a top-level `kernels` module.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

_PACKAGE = pathlib.Path(__file__).resolve().parent


def kernels_dir() -> pathlib.Path:
    for candidate in (_PACKAGE / "kernels", _PACKAGE.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kernel sources not found in {_PACKAGE / 'kernels'} or {_PACKAGE.parent / 'kernels'}")


@functools.cache
def triton_module(name: str):
    """The launcher module kernels/triton/<name>.py, imported as headkv_engine._triton_<name>."""
    path = kernels_dir() / "triton" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"headkv_engine._triton_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def triton_launcher(name: str, function: str):
    """`function` of kernels/triton/<name>.py, run eagerly even inside torch.compile: the launchers compute
    grids and tile sizes on the host, which a traced graph would not redo per call."""
    import torch  # noqa: PLC0415

    return torch.compiler.disable(getattr(triton_module(name), function))


def triton_autotune_enabled() -> bool:
    """HEADKV_TRITON_AUTOTUNE=0 turns the Triton launchers' default tuning off (fixed tiles), e.g. for correctness
    tests on a GPU, where tuning every shape's key would cost more than the tests."""
    import os  # noqa: PLC0415

    return os.environ.get("HEADKV_TRITON_AUTOTUNE", "1") != "0"
