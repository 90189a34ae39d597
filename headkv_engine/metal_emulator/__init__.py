"""The Metal kernels of kernels/metal, compiled for the CPU, so that their own sources run where no Apple GPU is.

`EmulatedLibrary(source, kernel_names)` compiles a kernel source with a C++ compiler against this folder's
`metal_stdlib` (the subset of the Metal Shading Language the kernels use, as C++20) and `launch.h` (the
dispatch), and answers like the library `torch.mps.compile_shader` returns: `library.<kernel>(*tensors,
threads=..., group_size=...)`. The threadgroups run one after another, the threads of each as real threads:
barriers and SIMD-group reductions synchronise them, and between two barriers the SIMD groups take turns
(backwards in odd threadgroups), so a kernel that hands threadgroup memory between SIMD groups without a barrier
gets it wrong every time (in a dispatch of two or more threadgroups). What it cannot show: out-of-bounds reads
(no bounds checks), fast-math rounding, a missing simdgroup_barrier between lanes of one SIMD group (a real race
here too, so only sometimes wrong), and a lane that never reaches a SIMD-group reduction hangs it. It is slow:
for tests of small shapes. Compiled kernels are cached per user (cache_dir()).

The metal backend uses it for CPU tensors when HEADKV_METAL_EMULATE=1 (as Triton's interpreter serves CPU
tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
COMPILER_FLAGS = ("-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-attributes")


def compiler() -> str | None:
    """The C++ compiler the emulator uses ($CXX, else c++ / g++ / clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def emulation_unavailable_reason() -> str | None:
    return None if compiler() else "no C++ compiler found for the Metal emulator (set CXX or install g++)"


def _glue(kernel_names) -> str:
    lines = ['#include "launch.h"']
    for name in kernel_names:
        lines.append(f'extern "C" void headkv_run_{name}(void* const* buffers, const unsigned* dims) '
                     f"{{ headkv_emu::launch(&{name}, buffers, dims); }}")
        lines.append(f'extern "C" unsigned headkv_buffers_{name}() {{ return headkv_emu::buffer_count(&{name}); }}')
    return "\n".join(lines) + "\n"


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept: $XDG_CACHE_HOME (or ~/.cache)/headkv_engine/metal_emulator, private to the
    user (a shared temporary folder would let another user plant a library that this process then loads)."""
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    folder = root / "headkv_engine" / "metal_emulator"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


@functools.cache
def _build(source: str, kernel_names: tuple[str, ...]) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(emulation_unavailable_reason())
    unit = source + "\n" + _glue(kernel_names)
    shim = (HERE / "metal_stdlib").read_text() + (HERE / "launch.h").read_text()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([unit, shim, cxx, version, *COMPILER_FLAGS]).encode()).hexdigest()[:24]
    cache = cache_dir()
    library = cache / f"{key}.so"
    if not library.exists():
        with tempfile.TemporaryDirectory(dir=cache) as work:
            unit_path = pathlib.Path(work) / "unit.cpp"
            unit_path.write_text(unit)
            built = pathlib.Path(work) / "unit.so"
            result = subprocess.run([cxx, *COMPILER_FLAGS, "-I", str(HERE), str(unit_path), "-o", str(built)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"the Metal emulator could not compile the kernels:\n{result.stderr[-4000:]}")
            os.replace(built, library)  # atomic: a concurrent build of the same key finds a whole file
    return ctypes.CDLL(str(library))


class EmulatedLibrary:
    """The kernels of `source` (names listed: each is reached through a C entry point) on the CPU."""

    def __init__(self, source: str, kernel_names):
        self._lib = _build(source, tuple(kernel_names))
        self._names = frozenset(kernel_names)

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"the emulated Metal library has no kernel {name!r}")
        count = getattr(self._lib, f"headkv_buffers_{name}")
        count.restype = ctypes.c_uint
        return EmulatedKernel(getattr(self._lib, f"headkv_run_{name}"), name, count())


class EmulatedKernel:
    """One kernel: called as `kernel(*tensors, threads=..., group_size=...)`, like those of compile_shader."""

    thread_execution_width = 32  # the SIMD width the emulator's reductions span, as on Apple GPUs

    def __init__(self, entry, name: str, buffer_count: int):
        self._entry, self._name, self.buffer_count = entry, name, buffer_count

    def __call__(self, *buffers: torch.Tensor, threads, group_size) -> None:
        if len(buffers) != self.buffer_count:  # the kernel would read pointers that were never passed
            raise ValueError(f"{self._name} takes {self.buffer_count} buffers, got {len(buffers)}")
        _dispatch(self._entry, self._name, *buffers, threads=threads, group_size=group_size)


def _dispatch(entry, name: str, *buffers: torch.Tensor, threads, group_size) -> None:
    threads, group_size = _triple(threads), _triple(group_size)
    for t in buffers:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: the emulator takes contiguous CPU tensors, got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.device, t.shape)}")
    if any(n % g for n, g in zip(threads, group_size)):
        # Metal would run partial threadgroups at the edges; the kernels are launched with whole ones only
        raise ValueError(f"{name}: threads {threads} must be whole multiples of group_size {group_size}")
    groups = [n // g for n, g in zip(threads, group_size)]
    per_group = group_size[0] * group_size[1] * group_size[2]
    if group_size[1] != 1 or group_size[2] != 1:
        raise ValueError(f"{name}: the kernels use one-dimensional threadgroups, got group_size {group_size}")
    pointers = (ctypes.c_void_p * len(buffers))(*[t.data_ptr() for t in buffers])
    dims = (ctypes.c_uint * 4)(*groups, per_group)
    entry(pointers, dims)


def _triple(value) -> tuple[int, int, int]:
    value = (value,) if isinstance(value, int) else tuple(value)
    return tuple(int(v) for v in value) + (1,) * (3 - len(value))
