"""Classification rules at and around every threshold (SPEC 6), and the confidence."""

import json

import pytest

import headkv_engine as hk
from headkv_engine.analysis.classify import Thresholds


def stat(entropy=2.0, sink=0.1, local=0.2, uniformity=1.0, layer=0, head=0):
    rest = max(0.0, 1 - sink - local)
    return hk.HeadStatistics(
        layer_idx=layer, head_idx=head, mean_entropy=entropy, std_entropy=0.1, max_attention_mean=0.5,
        position_preference={"sink": sink, "local": local, "recent": 0.0, "global": rest}, sink_ratio=sink,
        uniformity_score=uniformity, relative_position_dist=[1 / 64] * 64,
    )


def kind(**kw):
    return hk.classify([stat(**kw)])[0]


@pytest.mark.parametrize("kw, expected", [
    (dict(uniformity=0.099), "dead"),
    (dict(uniformity=0.1, entropy=4.0), "gathering"),
    (dict(entropy=1.49, sink=0.31), "sink_positional"),
    (dict(entropy=1.49, sink=0.3, local=0.61), "true_positional"),
    (dict(entropy=1.49, sink=0.3, local=0.6), "mixed"),
    (dict(entropy=1.5, sink=0.31), "sink_mixed"),
    (dict(entropy=2.99, sink=0.31), "sink_mixed"),
    (dict(entropy=2.99, sink=0.3), "mixed"),
    (dict(entropy=3.0, sink=0.9), "gathering"),
])
def test_refined_rules(kw, expected):
    assert kind(**kw).head_type == expected


def test_recommendations():
    c = kind(entropy=1.0, sink=0.6)
    assert (c.compression_strategy, c.sink_size, c.recommended_window, c.keep_sinks) == ("sink_window", 4, 8, True)
    c = kind(entropy=1.0, sink=0.1, local=0.8)
    assert (c.compression_strategy, c.recommended_window, c.keep_sinks) == ("window_only", 8, False)
    c = kind(entropy=2.0, sink=0.5)
    assert (c.compression_strategy, c.recommended_window) == ("sink_window", 24)
    c = kind(entropy=3.5)
    assert c.use_full_cache and c.recommended_window == -1 and c.compression_strategy == "none"
    c = kind(uniformity=0.01)
    assert c.can_prune and c.compression_strategy == "prune"


def test_legacy_scheme():
    stats = [stat(entropy=1.0, head=0), stat(entropy=2.0, head=1), stat(entropy=3.2, head=2),
             stat(uniformity=0.0, head=3)]
    assert [c.head_type for c in hk.classify(stats, scheme="legacy")] == ["positional", "mixed", "gathering", "dead"]
    with pytest.raises(ValueError, match="scheme"):
        hk.classify(stats, scheme="new")


def test_confidence_follows_the_margins():
    at_threshold = kind(entropy=1.5 - 1e-9, sink=0.9).confidence
    far = kind(entropy=0.2, sink=0.9, uniformity=3.0).confidence
    assert at_threshold == pytest.approx(0.0, abs=1e-6)
    assert far == 1.0
    values = {kind(entropy=e, sink=0.9).confidence for e in (0.6, 0.9, 1.2, 1.4)}
    assert len(values) == 4  # not a constant per type
    assert all(0 <= c.confidence <= 1 for c in hk.classify([stat(entropy=e / 10) for e in range(50)]))


def test_confidence_counts_only_thresholds_that_change_the_type():
    # low-entropy mixed: entropy rising past 1.5 keeps it mixed, so 1.49 is not a near miss
    assert kind(entropy=1.49, sink=0.0, local=0.0).confidence == 1.0
    # middle-entropy mixed with local > 0.6: falling below 1.5 would make it true_positional
    near = kind(entropy=1.51, sink=0.0, local=0.9)
    assert near.head_type == "mixed" and near.confidence == pytest.approx(0.01, abs=1e-6)
    assert kind(entropy=1.51, sink=0.0, local=0.3).confidence == 1.0
    # legacy mixed keeps both entropy margins
    assert hk.classify([stat(entropy=1.51)], scheme="legacy")[0].confidence == pytest.approx(0.01, abs=1e-6)


def test_thresholds_are_configurable():
    assert kind(entropy=1.7, sink=0.5).head_type == "sink_mixed"
    c = hk.classify([stat(entropy=1.7, sink=0.5)], thresholds=Thresholds(low_entropy=2.0))[0]
    assert c.head_type == "sink_positional"


def test_save_and_reclassify(tmp_path):
    stats = [stat(entropy=1.0, sink=0.6, head=0), stat(entropy=3.5, head=1)]
    path = tmp_path / "head_classifications.json"
    hk.save_classifications(hk.classify(stats), path)
    data = json.loads(path.read_text())
    assert data["summary"]["type_distribution"] == {"gathering": 1, "sink_positional": 1}
    assert data["summary"]["limitable_heads"] == 1
    profile = hk.Profile.from_classifications(path)
    assert profile.policy(0, 0).strategy == "sink_window" and profile.policy(0, 1).strategy == "full"


@pytest.mark.parametrize("field, value, expected", [
    ("layer_idx", "0", "classifications[1].layer_idx: expected an integer >= 0, got '0'"),
    ("head_idx", -1, "classifications[1].head_idx: expected an integer >= 0, got -1"),
    ("confidence", 1.5, "classifications[1].confidence (layer 0, head 1): expected a number in [0, 1], got 1.5"),
    ("head_type", "positional2", "classifications[1].head_type (layer 0, head 1): expected one of ['dead', "),
])
def test_load_refuses_bad_fields(tmp_path, field, value, expected):
    from headkv_engine.analysis import load_classifications  # noqa: PLC0415

    path = tmp_path / "head_classifications.json"
    hk.save_classifications(hk.classify([stat(head=0), stat(head=1)]), path)
    assert len(load_classifications(path)) == 2
    data = json.loads(path.read_text())
    data["classifications"][1][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        load_classifications(path)
    assert str(error.value).startswith(f"{path}: {expected}")
