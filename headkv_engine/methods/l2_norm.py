"""L2-norm KV compression baselines (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression"): per head, keep the cached tokens whose keys have the smallest L2 norm.

Every head of a layer keeps the same number of tokens, so the result stays a dense `DynamicCache` (kept tokens
in their original order) from which the unpatched model continues, one token per forward: the first
`skip_layers` layers keep more tokens than the others, and transformers sizes a block's attention mask by layer
0, so blocks of several tokens and `generate()` need skip_layers=0. Positions of later tokens are the caller's:
pass `position_ids` that continue the original sequence. The batch is not masked: compress caches of unpadded
sequences.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicCache


def _layers(past_key_values):
    if hasattr(past_key_values, "layers"):
        return [(layer.keys, layer.values) for layer in past_key_values.layers]
    return [tuple(layer) for layer in past_key_values]


def _keep_low_norm(keys, values, keep: int):
    if keep >= keys.shape[2]:
        return keys, values
    norms = keys.float().norm(dim=-1)  # [B, H, T]
    index = norms.topk(keep, dim=-1, largest=False).indices.sort(dim=-1).values
    gather = index[..., None].expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, gather), values.gather(2, gather)


def fix_size_l2(past_key_values, max_tokens: int = 512, skip_layers: int = 2) -> DynamicCache:
    """Keep at most `max_tokens` tokens per head (lowest key norm), leaving the first `skip_layers` layers whole."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cache = DynamicCache()
    for index, (keys, values) in enumerate(_layers(past_key_values)):
        if index >= skip_layers:
            keys, values = _keep_low_norm(keys, values, max_tokens)
        cache.update(keys, values, index)
    return cache


def l2_compress(past_key_values, keep_ratio: float = 0.5, skip_layers: int = 2) -> DynamicCache:
    """Keep the `keep_ratio` share of tokens per head with the lowest key norm (first `skip_layers` layers whole)."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    layers = _layers(past_key_values)
    keep = max(1, int(round(layers[0][0].shape[2] * keep_ratio)))
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        if index >= skip_layers:
            keys, values = _keep_low_norm(keys, values, keep)
        cache.update(keys, values, index)
    return cache
