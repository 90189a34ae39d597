"""patch_model / unpatch_model: run a Hugging Face model under a profile, and undo it exactly.

Patching sets instance attributes only (the module classes are untouched, nothing happens at import time);
unpatching deletes them, so the class methods are what runs again.
"""

from __future__ import annotations

import types

from headkv_engine import gpt_neox
from headkv_engine.backends import BACKENDS, resolve_backend
from headkv_engine.profile import Profile, ProfileError

POSITION_MODES = ("absolute", "shifted")
# model_type -> module providing base_model, attention_modules, model_forward, attention_forward
SUPPORTED = {"gpt_neox": gpt_neox}


class PatchHandle:
    """What `patch_model` did to a model; `unpatch()` (or leaving the `with` block) undoes it."""

    def __init__(self, model, profile: Profile, backend: str, position_mode: str, family):
        self.model = model
        self.profile = profile
        self.backend = backend
        self.position_mode = position_mode
        self._family = family
        self.active = False

    def _apply(self):
        family = self._family
        base = family.base_model(self.model)
        base._headkv_patch = self
        base.forward = types.MethodType(family.model_forward, base)
        for attention in family.attention_modules(self.model):
            attention._headkv_rotary = base.rotary_emb
            attention.forward = types.MethodType(family.attention_forward, attention)
        self.model._headkv_patch = self
        self.active = True

    def unpatch(self) -> None:
        if not self.active:
            return
        family = self._family
        base = family.base_model(self.model)
        for attention in family.attention_modules(self.model):
            del attention.forward, attention._headkv_rotary
        del base.forward, base._headkv_patch
        if self.model is not base:
            del self.model._headkv_patch
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False

    def __repr__(self):
        return (
            f"PatchHandle(model={type(self.model).__name__}, backend={self.backend!r}, "
            f"position_mode={self.position_mode!r}, active={self.active}, "
            f"profile={self.profile.summary()['strategies']})"
        )


def patch_model(model, profile: Profile, backend: str = "auto", position_mode: str = "absolute") -> PatchHandle:
    """Make `model` (GPTNeoXForCausalLM or GPTNeoXModel) keep, per head, only what `profile` says.

    backend: 'auto' | 'torch' | 'cpu' (SPEC 1); position_mode: 'absolute' (default, equals dense attention
    under per-head masks) or 'shifted' (StreamingLLM's positions, for going past the trained length).
    Returns a PatchHandle, also usable as a context manager.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise TypeError(
            f"patch_model supports model_type in {sorted(SUPPORTED)}, got {model_type!r} ({type(model).__name__})"
        )
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a headkv_engine.Profile, got {type(profile).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
    if getattr(model, "_headkv_patch", None) is not None:
        raise RuntimeError("model is already patched; call headkv_engine.unpatch_model(model) first")
    profile.check_model(model)
    device = next(model.parameters()).device
    resolve_backend(backend, device)  # fail now, not at the first forward, if the backend cannot run here
    handle = PatchHandle(model, profile, backend, position_mode, SUPPORTED[model_type])
    handle._apply()
    return handle


def unpatch_model(model) -> None:
    """Restore a patched model exactly (its outputs equal the unpatched model's)."""
    handle = getattr(model, "_headkv_patch", None)
    if handle is None:
        raise ValueError("model is not patched by headkv_engine")
    handle.unpatch()


__all__ = ["PatchHandle", "ProfileError", "patch_model", "unpatch_model"]
