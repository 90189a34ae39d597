"""HeadAwareCompressor and head_aware_compress (seeds 002 / 003), over `Profile` and `HeadKVCache`.

A dense cache is compressed as if its tokens had been prefilled under the profile, so its keys must be rotated
at each sequence's real-token positions: what `generate()` builds, and what a forward of a left-padded batch
builds with `position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)` (without them transformers rotates at
column indices, padding included). Pass the batch's `attention_mask` to the compressor, and continue with the
model patched under the same profile and position mode.
"""

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

    def __init__(self, profile: Profile, backend: str = "auto", position_mode: str = "absolute"):
        self.profile = profile
        self.backend = backend
        self.position_mode = position_mode

    @classmethod
    def from_classifications(cls, path, backend: str = "auto", position_mode: str = "absolute") -> HeadAwareCompressor:
        return cls(Profile.from_classifications(path), backend=backend, position_mode=position_mode)

    @classmethod
    def from_model_config(cls, config, default_strategy="sink_window", sink_size=4, window_size=8, backend="auto",
                          position_mode="absolute"):
        shape = model_shape(config)
        profile = Profile.uniform(
            shape["num_layers"], shape["num_heads"], default_strategy, sink_size=sink_size,
            window_size=window_size, head_dim=shape["head_dim"],
        )
        return cls(profile, backend=backend, position_mode=position_mode)

    def compress(self, past_key_values, attention_mask=None) -> HeadKVCache:
        """A dense cache (DynamicCache or legacy ((k, v), ...) tuples) -> HeadKVCache; a HeadKVCache is
        returned as it is, since the patched model keeps it compressed at every step."""
        if isinstance(past_key_values, HeadKVCache):
            return past_key_values
        return HeadKVCache.from_dense(
            self.profile, past_key_values, attention_mask=attention_mask, position_mode=self.position_mode,
            backend=self.backend,
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
        summary["compressible_heads"] = summary["compressed_heads"]  # seed 003's name
        summary["window_settings"] = {f"{s}(sink={k}, window={w})": n for (s, k, w), n in sorted(windows.items())}
        return summary


def head_aware_compress(
    past_key_values,
    classifications_path=None,
    compressor: HeadAwareCompressor | None = None,
    num_layers=None,
    num_heads=None,
    default_sink_size=4,
    default_window_size=8,
    skip_layers=(),
    attention_mask=None,
    position_mode="absolute",
    backend="auto",
) -> HeadKVCache:
    """Compress a dense cache per head (seed 002's signature): with `compressor` as configured, else from a
    classification file, else sink + window everywhere; the layers in `skip_layers` keep their full cache."""
    if compressor is None:
        if classifications_path is not None:
            profile = Profile.from_classifications(classifications_path)
        else:
            if num_layers is None or num_heads is None:
                num_layers, num_heads = _dense_shape(past_key_values)
            profile = Profile.uniform(num_layers, num_heads, "sink_window", default_sink_size, default_window_size)
        compressor = HeadAwareCompressor(profile, backend=backend, position_mode=position_mode)
    if skip_layers:
        compressor = HeadAwareCompressor(_with_full_layers(compressor.profile, skip_layers), compressor.backend,
                                         compressor.position_mode)
    return compressor.compress(past_key_values, attention_mask=attention_mask)


def _with_full_layers(profile: Profile, layers) -> Profile:
    """`profile` with every head of `layers` full."""
    layers = sorted(set(int(layer) for layer in layers))
    for layer in layers:
        if not 0 <= layer < profile.num_layers:
            raise ValueError(f"skip_layers: expected layers in 0..{profile.num_layers - 1}, got {layer}")
    heads = {(layer, head): policy for layer, head, policy in profile.policies()}
    heads.update({(layer, head): HeadPolicy.make("full") for layer in layers for head in range(profile.num_heads)})
    return Profile(profile.num_layers, profile.num_heads, profile.head_dim, heads=heads,
                   meta={**profile.meta, "skip_layers": layers})


def streaming_llm(past_key_values, sink_size=4, window_size=508, attention_mask=None, position_mode="absolute",
                  backend="auto") -> HeadKVCache:
    """The StreamingLLM baseline (Xiao et al., 2024): every head keeps `sink_size` sinks + `window_size` recent.
    StreamingLLM's own position shift is position_mode="shifted" (patch the model with the same mode)."""
    layers, heads = _dense_shape(past_key_values)
    profile = Profile.streaming_llm(layers, heads, sink_size=sink_size, window_size=window_size)
    compressor = HeadAwareCompressor(profile, backend=backend, position_mode=position_mode)
    return compressor.compress(past_key_values, attention_mask=attention_mask)


def _dense_shape(past_key_values):
    layers = [(layer.keys, layer.values) for layer in past_key_values.layers] if hasattr(past_key_values, "layers") \
        else list(past_key_values)
    return len(layers), layers[0][0].shape[1]
