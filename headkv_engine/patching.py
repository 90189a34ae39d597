"""patch_model / unpatch_model: run a Hugging Face model under a profile, and undo it exactly.

Patching sets instance attributes only (the module classes are untouched, nothing happens at import time);
unpatching puts back what the instances held before (a wrapper's instance-level `forward`, or nothing, so the
class methods run again). Accelerate's hooks (device_map, offloading) stay in place around the patched forwards.
"""

from __future__ import annotations

import types

from headkv_engine import gpt_neox
from headkv_engine.backends import BACKENDS, resolve_backend
from headkv_engine.profile import Profile, ProfileError

POSITION_MODES = ("absolute", "shifted")
# model_type -> module providing base_model, attention_modules, model_forward, attention_forward
SUPPORTED = {"gpt_neox": gpt_neox}


class _Absent:
    """Marks "the instance had no such attribute"; one object, kept by copy, deepcopy and pickle."""

    def __reduce__(self):
        return "_ABSENT"

    def __repr__(self):
        return "_ABSENT"


_ABSENT = _Absent()


class PatchHandle:
    """What `patch_model` did to a model; `unpatch()` (or leaving the `with` block) undoes it."""

    def __init__(self, model, profile: Profile, backend: str, position_mode: str, model_type: str):
        self.model = model
        self.profile = profile
        self.backend = backend
        self.position_mode = position_mode
        self._model_type = model_type  # (a name, not the module: a patched model stays deep-copyable)
        self.active = False
        self._host_inv_freq = None  # (key, float64 host copy of the rotary frequencies), for shifted mode

    @property
    def _family(self):
        return SUPPORTED[self._model_type]

    def _apply(self):
        family = self._family
        base = family.base_model(self.model)
        attentions = family.attention_modules(self.model)
        # what each module's forward attribute held before (restored by unpatch())
        self._saved = [install_forward(base, types.MethodType(family.model_forward, base))]
        base._headkv_patch = self
        for attention in attentions:
            attention._headkv_rotary = base.rotary_emb
            self._saved.append(install_forward(attention, types.MethodType(family.attention_forward, attention)))
        self.model._headkv_patch = self
        self.active = True

    def unpatch(self) -> None:
        if not self.active:
            return
        base = self._family.base_model(self.model)
        for saved in self._saved:
            module = restore_forward(saved)
            if module is not base:
                del module._headkv_rotary
        del base._headkv_patch
        if self.model is not base:
            del self.model._headkv_patch
        self._saved = []
        self.active = False

    def __enter__(self):
        if not self.active:
            raise RuntimeError("this patch was undone: call headkv_engine.patch_model(model, profile) again")
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
    if is_patched(model):
        raise RuntimeError("model is already patched; call headkv_engine.unpatch_model(model) first")
    profile.check_model(model)
    rope_type = getattr(SUPPORTED[model_type].base_model(model).rotary_emb, "rope_type", "default")
    if position_mode == "shifted" and ("dynamic" in rope_type or rope_type == "longrope"):
        # shifted mode scores keys by distances within the kept cache, which holds only when a position's
        # rotation does not depend on the length seen so far
        raise ValueError(f"position_mode='shifted' needs a RoPE whose frequencies do not depend on the sequence "
                         f"length; the model's rope_type is {rope_type!r} (use 'absolute')")
    device = next(model.parameters()).device
    resolve_backend(backend, device)  # fail now, not at the first forward, if the backend cannot run here
    handle = PatchHandle(model, profile, backend, position_mode, model_type)
    handle._apply()
    return handle


def unpatch_model(model) -> None:
    """Restore a patched model exactly (its outputs equal the unpatched model's)."""
    handle = _handle_of(model)
    if handle is None:
        raise ValueError("model is not patched by headkv_engine")
    handle.unpatch()


def install_forward(module, forward):
    """Make `forward` what runs when `module` is called; returns (module, attribute, previous value).

    A module with accelerate's hooks (device_map, offloading) keeps them: its hook calls `_old_forward`, which
    is replaced instead of `forward`. Otherwise the instance's `forward` is set (a wrapper set there before is
    restored by unpatch)."""
    name = "_old_forward" if getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module) else \
        "forward"
    previous = vars(module).get(name, _ABSENT)
    setattr(module, name, forward)
    return module, name, previous


def restore_forward(saved) -> object:
    """Undo `install_forward` (its returned record); returns the module."""
    module, name, previous = saved
    if previous is _ABSENT:
        delattr(module, name)
    else:
        setattr(module, name, previous)
    return module


def is_patched(model) -> bool:
    """Whether `model`, or the base model inside it, runs under a profile."""
    return _handle_of(model) is not None


def _handle_of(model):
    """The PatchHandle of `model`, or of the base model inside it (patched on its own), else None."""
    handle = getattr(model, "_headkv_patch", None)
    if handle is None and getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED:
        handle = getattr(SUPPORTED[model.config.model_type].base_model(model), "_headkv_patch", None)
    return handle


__all__ = ["PatchHandle", "ProfileError", "patch_model", "unpatch_model"]
