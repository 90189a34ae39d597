import json

import pytest

import headkv_engine as hk
from headkv_engine.profile import FORMAT, UNBOUNDED_WINDOW, HeadPolicy


def profile_json(**overrides):
    data = {
        "format": FORMAT,
        "model": {"model_type": "gpt_neox", "num_layers": 2, "num_heads": 3, "head_dim": 4},
        "default": {"strategy": "full"},
        "heads": [
            {"layer": 0, "head": 1, "strategy": "sink_window", "sink_size": 4, "window_size": 8},
            {"layer": 1, "head": 0, "strategy": "prune", "fill": None},
            {"layer": 1, "head": 2, "strategy": "window_only", "window_size": 16},
        ],
        "meta": {"source": "test"},
    }
    data.update(overrides)
    return data


def test_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    profile = hk.Profile.from_dict(profile_json())
    profile.save(path)
    loaded = hk.Profile.load(path)
    assert loaded == profile
    assert json.loads(path.read_text())["format"] == "headkv-profile/1"
    assert loaded.policy(0, 1) == HeadPolicy("sink_window", 4, 8)
    assert loaded.policy(1, 2) == HeadPolicy("window_only", 0, 16)
    assert loaded.policy(1, 0).strategy == "prune"
    assert loaded.policy(0, 0) == HeadPolicy("full")
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left nothing behind


def test_uniform_and_named_constructors():
    p = hk.Profile.uniform(3, 5, strategy="sink_window", sink_size=4, window_size=60)
    assert all(pol == HeadPolicy("sink_window", 4, 60) for _, _, pol in p.policies())
    assert hk.Profile.streaming_llm(2, 2).effective_context(1000) == 64
    assert hk.Profile.window_only(2, 2, window_size=64).effective_context(1000) == 64
    assert hk.Profile.full(2, 2).effective_context(1000) == 1000
    assert hk.Profile.uniform(1, 1, "prune").policy(0, 0).window_size == 0


def test_summary_counts_and_kept_tokens():
    profile = hk.Profile.from_dict(profile_json())
    summary = profile.summary(length=100)
    assert summary["strategies"] == {"full": 3, "sink_window": 1, "window_only": 1, "prune": 1}
    kept = profile.kept_tokens(100)
    assert kept.tolist() == [[100, 12, 100], [0, 100, 16]]
    assert summary["mean_kept_tokens"] == pytest.approx(kept.double().mean().item())
    assert profile.kept_tokens(5).tolist() == [[5, 5, 5], [0, 5, 5]]


def test_layer_tensors_encoding():
    sink, window, fill = hk.Profile.from_dict(profile_json()).layer_tensors(1)
    assert sink.tolist() == [0, 0, 0]
    assert window.tolist() == [0, UNBOUNDED_WINDOW, 16]
    assert fill is None


@pytest.mark.parametrize(
    "head, message",
    [
        ({"layer": 0, "head": 0, "strategy": "sliding"}, "strategy"),
        ({"layer": 0, "head": 0, "strategy": "sink_window", "sink_size": 4, "window_size": 0}, "window_size"),
        ({"layer": 0, "head": 0, "strategy": "window_only", "window_size": -3}, "window_size"),
        ({"layer": 0, "head": 0, "strategy": "window_only"}, "window_size"),
        ({"layer": 0, "head": 0, "strategy": "sink_window", "sink_size": -1, "window_size": 4}, "sink_size"),
        ({"layer": 0, "head": 3, "strategy": "full"}, "head"),
        ({"layer": 2, "head": 0, "strategy": "full"}, "layer"),
        ({"layer": 0, "head": 0, "strategy": "prune", "fill": [0.0, 1.0]}, "fill"),
        ({"layer": 0, "head": 0, "strategy": "full", "fill": [0.0] * 4}, "fill"),
    ],
)
def test_bad_head_refused_naming_field_and_head(head, message):
    data = profile_json(heads=[head])
    with pytest.raises(hk.ProfileError, match=message) as info:
        hk.Profile.from_dict(data)
    assert f"head {head['head']}" in str(info.value) or "head" in message


def test_duplicate_head_refused():
    heads = [{"layer": 0, "head": 1, "strategy": "full"}, {"layer": 0, "head": 1, "strategy": "prune"}]
    with pytest.raises(hk.ProfileError, match="duplicate head"):
        hk.Profile.from_dict(profile_json(heads=heads))


def test_wrong_format_refused():
    with pytest.raises(hk.ProfileError, match="format"):
        hk.Profile.from_dict(profile_json(format="headkv-profile/0"))


def test_model_mismatch_refused():
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=16, num_attention_heads=4, num_hidden_layers=2)
    hk.Profile.full(2, 4, head_dim=4).check_model(config)
    with pytest.raises(hk.ProfileError, match="model.num_layers"):
        hk.Profile.full(3, 4).check_model(config)
    with pytest.raises(hk.ProfileError, match="model.head_dim"):
        hk.Profile.full(2, 4, head_dim=8).check_model(config)


def test_from_classifications(tmp_path):
    classifications = {
        "classifications": [
            {"layer_idx": 0, "head_idx": 0, "head_type": "sink_positional", "compression_strategy": "sink_window",
             "sink_size": 4, "recommended_window": 8, "can_prune": False, "use_full_cache": False},
            {"layer_idx": 0, "head_idx": 1, "head_type": "true_positional", "compression_strategy": "window_only",
             "recommended_window": 8, "can_prune": False, "use_full_cache": False},
            {"layer_idx": 1, "head_idx": 0, "head_type": "gathering", "compression_strategy": "none",
             "recommended_window": -1, "can_prune": False, "use_full_cache": True},
            {"layer_idx": 1, "head_idx": 1, "head_type": "dead", "compression_strategy": "prune",
             "recommended_window": -1, "can_prune": True, "use_full_cache": False},
        ],
        "summary": {"total_heads": 4},
    }
    path = tmp_path / "head_classifications.json"
    path.write_text(json.dumps(classifications))
    p = hk.Profile.from_classifications(path)
    assert (p.num_layers, p.num_heads) == (2, 2)
    assert p.policy(0, 0) == HeadPolicy("sink_window", 4, 8)
    assert p.policy(0, 1) == HeadPolicy("window_only", 0, 8)
    assert p.policy(1, 0) == HeadPolicy("full")
    assert p.policy(1, 1).strategy == "prune"
    assert p.meta["type_distribution"]["dead"] == 1

    bad = json.loads(path.read_text())
    bad["classifications"][0]["recommended_window"] = -1
    with pytest.raises(hk.ProfileError, match="window_size .*layer 0, head 0"):
        hk.Profile.from_classifications(bad)
