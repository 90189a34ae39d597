"""headkv-engine: head-aware KV-cache compression for GPTNeoX (Pythia) models.

    import headkv_engine as hk
    profile = hk.Profile.uniform(num_layers, num_heads, strategy="sink_window", sink_size=4, window_size=60)
    with hk.patch_model(model, profile):
        out = model.generate(input_ids, max_new_tokens=64)   # the cache is a ragged hk.HeadKVCache
"""

__version__ = "0.1.0"  # before the imports: submodules record it in their outputs

from headkv_engine.analysis import (
    AnalysisResult,
    AttentionAnalyzer,
    HeadClassification,
    HeadStatistics,
    HeadType,
    Thresholds,
    analyze,
    classify,
    save_classifications,
)
from headkv_engine.backends import available_backends, cpu_unavailable_reason
from headkv_engine.cache import HeadKVCache
from headkv_engine.evaluation import EvalResult, evaluate
from headkv_engine.patching import PatchHandle, patch_model, unpatch_model
from headkv_engine.profile import HeadPolicy, Profile, ProfileError
from headkv_engine.zoo import load_builtin_model

__all__ = [
    "AnalysisResult",
    "AttentionAnalyzer",
    "EvalResult",
    "HeadClassification",
    "HeadStatistics",
    "HeadType",
    "Thresholds",
    "analyze",
    "classify",
    "save_classifications",
    "HeadKVCache",
    "HeadPolicy",
    "PatchHandle",
    "Profile",
    "ProfileError",
    "available_backends",
    "cpu_unavailable_reason",
    "evaluate",
    "load_builtin_model",
    "patch_model",
    "unpatch_model",
]
