"""Seed 004's ablation groups, built as its report describes (effective contexts as its tables show)."""

import pytest

import headkv_engine as hk
from headkv_engine.profile import HeadPolicy


def seed_like_classifications():
    """1024 heads in seed 004's proportions: 370 positional, 566 mixed (confidence 0.5), 88 gathering."""
    entries = []
    for i in range(1024):
        layer, head = divmod(i, 32)
        if i < 370:
            kind, confidence = "positional", 0.9 if i < 17 else 0.3
        elif i < 370 + 566:
            kind, confidence = "mixed", 0.5
        else:
            kind, confidence = "gathering", 0.25
        entries.append({"layer_idx": layer, "head_idx": head, "head_type": kind, "confidence": confidence})
    return {"classifications": entries}


def test_reported_effective_contexts():
    cls = seed_like_classifications()
    ctx = lambda name: hk.Profile.from_group_name(name, cls).effective_context(1000)  # noqa: E731
    assert ctx("B_streaming_64") == 64
    assert ctx("A_window_512") == 512
    assert ctx("K_uniform64_aware") == 68
    assert ctx("I_pos256_mix128_g128") == pytest.approx(178.2, abs=0.1)
    assert ctx("J_pos64_mix64_g128") == pytest.approx(73.5, abs=0.1)
    assert ctx("G_conf0.7_base64") == pytest.approx(68 - 17 * 48 / 1024)  # 17 confident positional heads: 4+16


def test_group_policies_per_type():
    cls = seed_like_classifications()
    g = hk.Profile.from_group_name("G_conf0.55_base128", cls)
    assert g.policy(0, 0) == HeadPolicy("sink_window", 4, 16)  # confident positional
    assert g.policy(0, 20) == HeadPolicy("sink_window", 4, 128)  # unconfident positional
    assert g.policy(20, 0) == HeadPolicy("sink_window", 4, 128)  # mixed at 0.5 < 0.55
    i = hk.Profile.by_type(cls, 256, 128, 128)
    assert (i.policy(0, 0).window_size, i.policy(20, 0).window_size, i.policy(31, 31).window_size) == (256, 128, 128)
    assert i.meta["name"] == "I_pos256_mix128_g128"


def test_dead_heads_pruned_and_refined_types_grouped():
    cls = {"classifications": [
        {"layer_idx": 0, "head_idx": 0, "head_type": "dead", "confidence": 0.9},
        {"layer_idx": 0, "head_idx": 1, "head_type": "sink_positional", "confidence": 0.8},
        {"layer_idx": 0, "head_idx": 2, "head_type": "sink_mixed", "confidence": 0.8},
        {"layer_idx": 0, "head_idx": 3, "head_type": "true_positional", "confidence": 0.1},
    ]}
    k = hk.Profile.uniform_aware(cls, 64)
    assert k.policy(0, 0).strategy == "prune"
    j = hk.Profile.by_type(cls, 8, 32, 512, group="J")
    assert [j.policy(0, h).window_size for h in (1, 2, 3)] == [8, 32, 8]


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="unknown configuration name"):
        hk.Profile.from_group_name("Z_magic_1")
    with pytest.raises(ValueError, match="classification"):
        hk.Profile.from_group_name("K_uniform64_aware")
    with pytest.raises(hk.ProfileError, match="confidence"):
        hk.Profile.uniform_aware({"classifications": [{"layer_idx": 0, "head_idx": 0, "head_type": "mixed"}]}, 8)
    with pytest.raises(ValueError, match="unknown configuration name"):
        hk.Profile.from_group_name("G_conf0.7.1_base64", [{"layer_idx": 0, "head_idx": 0, "head_type": "mixed",
                                                            "confidence": 0.5}])
    for entry, field in (({"head_idx": 0}, "layer_idx"), ({"layer_idx": 0, "head_idx": True}, "head_idx")):
        with pytest.raises(hk.ProfileError, match=rf"classifications\[0\].{field}: expected an integer >= 0"):
            hk.Profile.uniform_aware([{**entry, "head_type": "mixed", "confidence": 0.5}], 8)
