"""The seeds' compression API, backed by the engine: head-aware, StreamingLLM and L2-norm baselines.

    from headkv_engine.methods import HeadAwareCompressor, head_aware_compress
    compressor = HeadAwareCompressor.from_classifications("head_classifications.json")
    cache = compressor.compress(past_key_values)   # a dense cache in, a HeadKVCache out

A patched model continues from the returned cache (`hk.patch_model(model, compressor.profile)`).
"""

from headkv_engine.methods.head_aware import (
    HeadAwareCompressor,
    HeadCompressionConfig,
    head_aware_compress,
    streaming_llm,
)
from headkv_engine.methods.l2_norm import fix_size_l2, l2_compress

__all__ = [
    "HeadAwareCompressor",
    "HeadCompressionConfig",
    "fix_size_l2",
    "head_aware_compress",
    "l2_compress",
    "streaming_llm",
]
