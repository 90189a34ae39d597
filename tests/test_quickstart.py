"""`headkv quickstart` on its random tiny model."""

from headkv_engine import quickstart


def test_kv_bytes_are_reported_at_the_length_measured():
    result = quickstart.run(context=64, new_tokens=4, backend="torch")
    # the caches are measured after the prompt and the timed decode steps (one untimed first)
    assert result["kv_tokens"] == 64 + 4 + 1
    config = quickstart.random_gpt_neox().config
    per_token = 2 * config.num_hidden_layers * config.hidden_size * 4  # K and V, float32
    assert result["dense_kv_bytes"] == per_token * result["kv_tokens"]
    assert "KV bytes at 69 tokens (64-token prompt + 5 decoded): dense" in quickstart.report(result)
    assert result["full_profile_matches_unpatched"]
