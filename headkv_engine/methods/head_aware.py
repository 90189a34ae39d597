"""HeadAwareCompressor and head_aware_compress (seeds 002 / 003), over `Profile` and `HeadKVCache`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from headkv_engine.cache import HeadKVCache
from headkv_engine.profile import HeadPolicy, Profile, model_shape


@dataclass
class HeadCompressionConfig:
    """One head's compression setting, in the seed's terms."""

    layer_idx: int
    head_idx: int
    strategy: str = "full"  # "sink_window", "window_only", "full", "prune"
    keep_sinks: bool = True
    sink_size: int = 4
    window_size: int = 8

    @classmethod
    def from_policy(cls, layer: int, head: int, policy: HeadPolicy) -> HeadCompressionConfig:
        return cls(
            layer_idx=layer,
            head_idx=head,
            strategy=policy.strategy,
            keep_sinks=policy.strategy == "sink_window" and policy.sink_size > 0,
            sink_size=policy.sink_size,
            window_size=-1 if policy.window_size is None else policy.window_size,
        )


class HeadAwareCompressor:
    """Compresses dense KV caches into the ragged per-head layout described by a `Profile`."""

    def __init__(self, profile: Profile, backend: str = "auto"):
        self.profile = profile
        self.backend = backend

    @classmethod
    def from_classifications(cls, path, backend: str = "auto") -> HeadAwareCompressor:
        return cls(Profile.from_classifications(path), backend=backend)

    @classmethod
    def from_model_config(cls, config, default_strategy="sink_window", sink_size=4, window_size=8, backend="auto"):
        shape = model_shape(config)
        profile = Profile.uniform(
            shape["num_layers"], shape["num_heads"], default_strategy, sink_size=sink_size,
            window_size=window_size, head_dim=shape["head_dim"],
        )
        return cls(profile, backend=backend)

    def compress(self, past_key_values, attention_mask=None) -> HeadKVCache:
        """A dense cache (DynamicCache or legacy ((k, v), ...) tuples) -> HeadKVCache; a HeadKVCache is
        returned as it is, since the patched model keeps it compressed at every step."""
        if isinstance(past_key_values, HeadKVCache):
            return past_key_values
        return HeadKVCache.from_dense(
            self.profile, past_key_values, attention_mask=attention_mask, backend=self.backend
        )

    def get_head_config(self, layer_idx: int, head_idx: int) -> HeadCompressionConfig:
        return HeadCompressionConfig.from_policy(layer_idx, head_idx, self.profile.policy(layer_idx, head_idx))

    def get_compression_summary(self, length: int = 2048) -> dict:
        summary = self.profile.summary(length)
        windows = Counter(
            (p.strategy, p.sink_size, p.window_size) for _, _, p in self.profile.policies() if p.strategy != "full"
        )
        summary["total_heads"] = summary.pop("num_heads")
        summary["strategy_counts"] = summary.pop("strategies")
        summary["compressed_heads"] = summary["total_heads"] - summary["strategy_counts"]["full"]
        summary["window_settings"] = {f"{s}(sink={k}, window={w})": n for (s, k, w), n in sorted(windows.items())}
        return summary


def head_aware_compress(
    past_key_values,
    classifications_path=None,
    num_layers=None,
    num_heads=None,
    default_sink_size=4,
    default_window_size=8,
    attention_mask=None,
) -> HeadKVCache:
    """Compress a dense cache per head: from a classification file, or sink + window everywhere."""
    if classifications_path is not None:
        compressor = HeadAwareCompressor.from_classifications(classifications_path)
    else:
        if num_layers is None or num_heads is None:
            num_layers, num_heads = _dense_shape(past_key_values)
        profile = Profile.uniform(num_layers, num_heads, "sink_window", default_sink_size, default_window_size)
        compressor = HeadAwareCompressor(profile)
    return compressor.compress(past_key_values, attention_mask=attention_mask)


def streaming_llm(past_key_values, sink_size=4, window_size=508, attention_mask=None) -> HeadKVCache:
    """The StreamingLLM baseline (Xiao et al., 2024): every head keeps `sink_size` sinks + `window_size` recent."""
    layers, heads = _dense_shape(past_key_values)
    profile = Profile.streaming_llm(layers, heads, sink_size=sink_size, window_size=window_size)
    return HeadAwareCompressor(profile).compress(past_key_values, attention_mask=attention_mask)


def _dense_shape(past_key_values):
    layers = [(layer.keys, layer.values) for layer in past_key_values.layers] if hasattr(past_key_values, "layers") \
        else list(past_key_values)
    return len(layers), layers[0][0].shape[1]
