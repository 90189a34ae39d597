"""Backend selection, and the package working without its compiled extension."""

import subprocess
import sys
import textwrap

import pytest
import torch

from headkv_engine import backends


def test_cpu_backend_available_here():
    """The README's install builds the extension: its absence is a failure, not a skip."""
    assert backends.cpu_unavailable_reason() is None
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert "cpu" in backends.available_backends("cpu")


def test_without_the_extension_import_works_and_auto_warns_once():
    script = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "headkv_engine._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        import headkv_engine as hk
        from headkv_engine.backends import resolve_backend
        reason = hk.cpu_unavailable_reason()
        assert reason and "headkv_engine._C" in reason, reason
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
        assert len([w for w in caught if "backend 'auto' uses 'torch'" in str(w.message)]) == 1
        try:
            resolve_backend("cpu", torch.device("cpu"))
        except RuntimeError as exc:
            assert "backend 'cpu' is unavailable" in str(exc)
        else:
            raise AssertionError("backend 'cpu' resolved without the extension")
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_unknown_and_unavailable_backends_are_named(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_backend("fast", torch.device("cpu"))
    monkeypatch.delenv("HEADKV_METAL_EMULATE")
    with pytest.raises(RuntimeError, match="backend 'metal' is unavailable: Metal runs on Apple MPS devices"):
        backends.resolve_backend("metal", torch.device("cpu"))
