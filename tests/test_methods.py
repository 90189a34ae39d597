"""The seeds' API: compress a dense cache, continue with the patched model, and the L2 baselines."""

import pytest
import torch
from reference_model import tiny_model

import headkv_engine as hk
from headkv_engine.methods import HeadAwareCompressor, fix_size_l2, head_aware_compress, l2_compress, streaming_llm
from headkv_engine.utils import get_cache_info


def test_compress_then_continue_equals_patched_model(tmp_path):
    """Layer 0 keeps everything, so the dense prefix holds the same keys and values as a patched prefill."""
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    classifications = {"classifications": [
        {"layer_idx": 1, "head_idx": h, "head_type": t, "confidence": 0.9, "compression_strategy": s,
         "sink_size": 4, "recommended_window": w, "use_full_cache": s == "none", "can_prune": s == "prune"}
        for h, (t, s, w) in enumerate([("sink_positional", "sink_window", 8), ("true_positional", "window_only", 8),
                                        ("dead", "prune", -1), ("gathering", "none", -1)])
    ] + [{"layer_idx": 0, "head_idx": h, "head_type": "gathering", "confidence": 0.9, "compression_strategy": "none",
          "recommended_window": -1, "use_full_cache": True, "can_prune": False} for h in range(4)]}
    compressor = HeadAwareCompressor.from_classifications(classifications)
    assert compressor.get_head_config(1, 0).window_size == 8 and compressor.get_head_config(1, 0).keep_sinks
    assert compressor.get_compression_summary()["compressed_heads"] == 3

    dense = model(ids[:, :16], use_cache=True).past_key_values
    cache = compressor.compress(dense)
    assert isinstance(cache, hk.HeadKVCache) and compressor.compress(cache) is cache
    with hk.patch_model(model, compressor.profile, backend="torch"):
        continued = model(ids[:, 16:], cache=cache).logits
        patched = model(ids).logits[:, 16:]
    torch.testing.assert_close(continued, patched, atol=1e-4, rtol=0)
    info = get_cache_info(cache)
    assert info["type"] == "HeadKVCache" and info["seq_length"] == 24 and info["nbytes"] == cache.nbytes()


def test_functional_compressors_keep_what_they_say():
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    dense = model(ids, use_cache=True).past_key_values
    assert torch.equal(head_aware_compress(dense, default_window_size=8).kept_tokens(0), torch.full((1, 4), 12))
    assert torch.equal(streaming_llm(dense, sink_size=2, window_size=5).kept_tokens(1), torch.full((1, 4), 7))
    assert get_cache_info(dense)["seq_length"] == 30


def test_l2_baselines_keep_lowest_norm_keys():
    keys = torch.randn(1, 2, 10, 4)
    keys[0, 0, 3] *= 0.01  # the smallest key of head 0
    values = torch.randn(1, 2, 10, 4)
    layers = [(keys, values), (keys, values), (keys, values)]
    cache = fix_size_l2(layers, max_tokens=3, skip_layers=1)
    assert cache.layers[0].keys.shape[2] == 10 and cache.layers[2].keys.shape[2] == 3
    norms = keys[0, 0].norm(dim=-1)
    kept = cache.layers[2].keys[0, 0]
    assert torch.equal(kept, keys[0, 0, norms.topk(3, largest=False).indices.sort().values])
    assert l2_compress(layers, keep_ratio=0.5).layers[2].keys.shape[2] == 5


def test_shifted_compression_continues_like_the_shifted_patched_model():
    """A cache compressed for position_mode='shifted' continues like a shifted prefill (layer 0 keeps
    everything, so the dense prefix holds the patched prefill's keys); a mode that differs from the patch's is
    refused."""
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    profile = hk.Profile(2, 4, 16, heads={(1, h): hk.HeadPolicy.make("sink_window", 2, 5) for h in range(4)})
    dense = model(ids[:, :16], use_cache=True).past_key_values
    compressor = HeadAwareCompressor(profile, position_mode="shifted")
    with hk.patch_model(model, profile, backend="torch", position_mode="shifted"):
        continued = model(ids[:, 16:], cache=compressor.compress(dense)).logits
        patched = model(ids).logits[:, 16:]
    torch.testing.assert_close(continued, patched, atol=1e-4, rtol=0)
    absolute = HeadAwareCompressor(profile).compress(model(ids[:, :16], use_cache=True).past_key_values)
    with hk.patch_model(model, profile, backend="torch", position_mode="shifted"):
        with pytest.raises(ValueError, match="built for position_mode='absolute' and the model is patched with "
                                             "'shifted'"):
            model(ids[:, 16:], cache=absolute)


def test_seed_signature_of_head_aware_compress():
    """Seed 002: head_aware_compress(past_key_values, classifications_path, compressor, ..., skip_layers)."""
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    dense = model(ids, use_cache=True).past_key_values
    compressor = HeadAwareCompressor(hk.Profile.streaming_llm(2, 4, sink_size=2, window_size=3))
    assert compressor.get_compression_summary()["compressible_heads"] == 8
    cache = head_aware_compress(dense, compressor=compressor, skip_layers=[0])
    assert torch.equal(cache.kept_tokens(0), torch.full((1, 4), 30))  # skipped: full
    assert torch.equal(cache.kept_tokens(1), torch.full((1, 4), 5))
    assert torch.equal(head_aware_compress(dense, None, compressor).kept_tokens(0), torch.full((1, 4), 5))
    with pytest.raises(ValueError, match=r"skip_layers: expected layers in 0..1, got 2"):
        head_aware_compress(dense, skip_layers=[2])


def test_from_dense_refuses_what_is_not_a_filled_cache_of_the_profile():
    profile = hk.Profile.full(2, 4, head_dim=16)
    keys = torch.zeros(1, 4, 3, 16)
    with pytest.raises(ValueError, match="expected head_dim 16"):
        hk.HeadKVCache.from_dense(profile, [(keys[..., :8], keys[..., :8])] * 2)
    with pytest.raises(ValueError, match="layer 1 holds keys/values of shapes"):
        hk.HeadKVCache.from_dense(profile, [(keys, keys), (keys[:, :, :2], keys[:, :, :2])])
    with pytest.raises(ValueError, match="a filled cache"):
        hk.HeadKVCache.from_dense(profile, [(None, None)] * 2)
