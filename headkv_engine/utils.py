"""Small helpers of the seeds' API (`get_cache_info`)."""

from __future__ import annotations

from headkv_engine.cache import HeadKVCache


def get_cache_info(cache) -> dict:
    """Type, layers, tokens and bytes of a KV cache (HeadKVCache, DynamicCache or legacy tuples)."""
    if isinstance(cache, HeadKVCache):
        kept = [cache.kept_tokens(layer) for layer in range(len(cache))]
        total = sum(int(k.sum()) for k in kept)
        return {
            "type": "HeadKVCache",
            "num_layers": len(cache),
            "seq_length": cache.get_seq_length(),
            "kept_tokens": total,
            "mean_kept_per_head": total / max(1, sum(k.numel() for k in kept)),
            "nbytes": cache.nbytes(),
        }
    layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
    keys = layers[0][0]
    return {
        "type": type(cache).__name__,
        "num_layers": len(layers),
        "seq_length": keys.shape[2],
        "kept_tokens": sum(k.shape[0] * k.shape[1] * k.shape[2] for k, _ in layers),
        "mean_kept_per_head": float(keys.shape[2]),
        "nbytes": sum(k.nbytes + v.nbytes for k, v in layers),
    }
