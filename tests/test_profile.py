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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]  # the atomic write left nothing behind


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


FILL_WHERE = "heads[0]: layer 0, head 0"


@pytest.mark.parametrize(
    "fill, got",
    [
        (1.0, "got float 1.0"),
        ("0.5", "got str '0.5'"),
        ({"a": 1.0}, "got dict"),
        (["a", "b", "c", "d"], "got str 'a' at index 0"),
        ([0.0, float("nan"), 0.0, 0.0], "got nan at index 1"),
        ([0.0, 0.0, float("inf"), 0.0], "got inf at index 2"),
        ([0.0, 0.0, 0.0, float("-inf")], "got -inf at index 3"),
        ([0.0, 10**400, 0.0, 0.0], "at index 1"),
        ([True, 0.0, 0.0, 0.0], "got bool True at index 0"),
        ([0.0, None, 0.0, 0.0], "got NoneType None at index 1"),
        ([[0.0], 0.0, 0.0, 0.0], "got list .* at index 0"),
        ([], "got an empty list"),
        ([0.0, 1.0], "expected 4 floats"),  # the wrong length is still refused
    ],
)
def test_bad_fill_refused_naming_field_and_head(fill, got):
    data = profile_json(heads=[{"layer": 0, "head": 0, "strategy": "prune", "fill": fill}])
    with pytest.raises(hk.ProfileError, match=got) as info:
        hk.Profile.from_dict(data)
    message = str(info.value)
    assert message.startswith(f"fill ({FILL_WHERE}): expected")


def test_bad_fill_in_json_text_refused():
    """json.load accepts NaN and Infinity; a profile must not."""
    text = json.dumps(profile_json()).replace('"fill": null', '"fill": [0.0, NaN, 0.0, 0.0]')
    with pytest.raises(hk.ProfileError, match=r"fill \(heads\[1\]: layer 1, head 0\).*nan at index 1"):
        hk.Profile.from_dict(json.loads(text))


def test_bad_fill_refused_by_make():
    with pytest.raises(hk.ProfileError, match=r"^fill \(layer 1, head 2\): expected .* got float 1.0"):
        HeadPolicy.make("prune", fill=1.0, where="layer 1, head 2")
    with pytest.raises(hk.ProfileError, match=r"^fill: expected .* got inf at index 0"):
        HeadPolicy.make("prune", fill=(float("inf"),))


def test_good_fill_kept_as_floats(tmp_path):
    data = profile_json(heads=[{"layer": 0, "head": 0, "strategy": "prune", "fill": [0, 1, -2.5, 1e30]}])
    profile = hk.Profile.from_dict(data)
    assert profile.policy(0, 0).fill == (0.0, 1.0, -2.5, 1e30)
    assert all(type(x) is float for x in profile.policy(0, 0).fill)
    profile.save(tmp_path / "p.json")
    assert hk.Profile.load(tmp_path / "p.json") == profile


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"layer": True, "head": 0}, r"^layer \(heads\[0\]: layer True, head 0\): expected an integer, got bool True"),
        ({"layer": 0, "head": True}, r"^head \(heads\[0\]: layer 0, head True\): expected an integer, got bool True"),
        ({"layer": False, "head": 1}, r"^layer \(heads\[0\]: layer False, head 1\)"),
        ({"layer": 0, "head": 1.0}, r"^head \(heads\[0\]: layer 0, head 1.0\): expected an integer, got float"),
        ({"head": 1}, r"^layer \(heads\[0\]: layer None, head 1\)"),
    ],
)
def test_bool_or_non_integer_layer_head_refused(entry, message):
    with pytest.raises(hk.ProfileError, match=message):
        hk.Profile.from_dict(profile_json(heads=[{**entry, "strategy": "full"}]))


def test_bool_indices_refused_elsewhere():
    profile = hk.Profile.full(2, 3)
    with pytest.raises(hk.ProfileError, match=r"^layer \(head 0\)"):
        profile.policy(True, 0)
    with pytest.raises(hk.ProfileError, match=r"^head \(layer 0\)"):
        profile.policy(0, True)
    with pytest.raises(hk.ProfileError, match=r"^head \(layer 0\)"):
        hk.Profile(2, 3, heads={(0, True): HeadPolicy("full")})
    for name in ("num_layers", "num_heads", "head_dim"):
        model = {"model_type": "gpt_neox", "num_layers": 2, "num_heads": 3, "head_dim": 4, name: True}
        with pytest.raises(hk.ProfileError, match=f"^model.{name}: expected a positive integer"):
            hk.Profile.from_dict(profile_json(model=model))
    entry = {"layer_idx": True, "head_idx": 0, "compression_strategy": "none"}
    with pytest.raises(hk.ProfileError, match=r"^classifications\[0\]\.layer_idx: expected an integer"):
        hk.Profile.from_classifications({"classifications": [entry]})


def test_write_json_atomic_writes_non_finite_floats_as_null(tmp_path):
    from headkv_engine.profile import write_json_atomic

    path = tmp_path / "sub" / "results.json"
    data = {"ppl": float("inf"), "rows": [{"x": float("nan"), "y": 1.5}, (float("-inf"), 2)], "n": 3, 4: "key"}
    write_json_atomic(path, data)
    assert json.loads(path.read_text()) == {"ppl": None, "rows": [{"x": None, "y": 1.5}, [None, 2]], "n": 3, "4": "key"}
    assert data["ppl"] == float("inf")  # the caller's data is not modified
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    from headkv_engine.profile import write_json_atomic

    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"ok": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_policies_built_directly_are_checked_and_normalised():
    """HeadPolicy(...) bypasses HeadPolicy.make; the Profile checks each policy as make would."""
    profile = hk.Profile(2, 2, heads={(0, 1): HeadPolicy("prune"), (1, 0): HeadPolicy("window_only", 0, 8)})
    assert profile.policy(0, 1) == HeadPolicy("prune", 0, 0) and profile.policy(1, 0).window_size == 8
    for policy, message in ((HeadPolicy("sink_window", 4), "window_size .layer 1, head 1.: sink_window needs"),
                            (HeadPolicy("bogus", 0, 4), "strategy .layer 1, head 1.: expected one of"),
                            (HeadPolicy("window_only", 0, 0), "window_size .layer 1, head 1.: must be >= 1")):
        with pytest.raises(hk.ProfileError, match=message):
            hk.Profile(2, 2, heads={(1, 1): policy})
    with pytest.raises(hk.ProfileError, match="default"):
        hk.Profile(2, 2, default=HeadPolicy("bogus"))


def test_fill_may_be_a_tensor():
    import torch  # noqa: PLC0415

    policy = HeadPolicy.make("prune", fill=torch.tensor([0.5, -1.0]))
    assert policy.fill == (0.5, -1.0)
