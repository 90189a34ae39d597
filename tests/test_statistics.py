"""head_statistics: the CPU kernel and the chunked reference against a brute-force definition (SPEC 5)."""

import math

import pytest
import torch
from reference_model import tiny_model

import headkv_engine as hk
from headkv_engine.ops.statistics import add_sums, head_statistics, log2_bins


def brute_force(q, k, scale, sink_size=4, local_window=8, recent_ratio=0.1):
    """Per-head means from the full attention matrix, the way the seed computed them."""
    heads, tokens, _ = q.shape
    scores = (q.double() @ k.double().transpose(1, 2)) * scale
    scores = scores.masked_fill(torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1), float("-inf"))
    att = torch.softmax(scores, -1)
    out = {"entropy": [], "max": [], "regions": torch.zeros(heads, 4), "relative": torch.zeros(heads, 64), "n": 0}
    for t in range(sink_size + local_window, tokens):
        p = att[:, t, : t + 1]
        out["entropy"].append(-(p * p.clamp_min(1e-300).log()).sum(-1))
        out["max"].append(p.max(-1).values)
        recent_start = t + 1 - math.ceil(recent_ratio * (t + 1))
        for j in range(t + 1):
            region = 0 if j < sink_size else 1 if j > t - local_window else 2 if j >= recent_start else 3
            out["regions"][:, region] += p[:, j]
            out["relative"][:, min(t - j, 63)] += p[:, j]
        out["n"] += 1
    return out


@pytest.mark.parametrize("backend,isa", [("torch", "native"), ("cpu", "native"), ("cpu", "baseline")],
                         indirect=["isa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_brute_force(backend, isa, dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(3, 70, 16, generator=gen) * 2).to(dtype) for _ in range(2))
    sums = head_statistics(q, k, 0, scale=0.25, backend=backend)
    want = brute_force(q.float(), k.float(), 0.25)
    n = want["n"]
    assert torch.equal(sums["count"], torch.full((3,), float(n), dtype=torch.float64))
    torch.testing.assert_close(sums["entropy"] / n, torch.stack(want["entropy"], 1).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(sums["max_prob"] / n, torch.stack(want["max"], 1).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(sums["regions"].float() / n, want["regions"] / n, atol=1e-4, rtol=0)
    torch.testing.assert_close(sums["relative"].float() / n, want["relative"] / n, atol=1e-4, rtol=0)
    torch.testing.assert_close(sums["log2"].sum(1), sums["count"])  # every row's mass lands in one bin
    torch.testing.assert_close(sums["sinks"][:, 2], sums["regions"][:, 0])  # first 4 keys = sink region


@pytest.mark.parametrize("tokens", [5, 12, 13])
def test_short_sequences_and_chunks(tokens):
    """Fewer tokens than sink + local window: nothing counted; chunks add up to one pass."""
    gen = torch.Generator().manual_seed(tokens)
    q, k = (torch.randn(2, tokens, 8, generator=gen) for _ in range(2))
    whole = head_statistics(q, k, 0, scale=0.3, backend="cpu")
    assert int(whole["count"][0]) == max(0, tokens - 12)
    split = tokens // 2
    first = head_statistics(q[:, :split], k[:, :split], 0, scale=0.3, backend="cpu")
    second = head_statistics(q[:, split:], k, split, scale=0.3, backend="cpu")
    total = add_sums(first, second)
    for key in whole:
        torch.testing.assert_close(total[key], whole[key], atol=1e-9, rtol=0)


def test_log2_bins():
    assert [log2_bins(d) for d in (0, 1, 2, 3, 4, 1023, 1024)] == [1, 2, 3, 3, 4, 11, 12]


def test_analyze_chunked_equals_one_pass_and_sequences_add():
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(3))
    one = hk.analyze(model, ids, chunk_size=90, progress=False, backend="torch")
    chunked = hk.analyze(model, ids, chunk_size=25, progress=False, backend="cpu")
    assert len(one.statistics) == 8 and one.model_info["tokens"] == 180
    for a, b in zip(one.statistics, chunked.statistics):
        assert (a.layer_idx, a.head_idx) == (b.layer_idx, b.head_idx)
        assert a.mean_entropy == pytest.approx(b.mean_entropy, abs=1e-5)
        assert a.position_preference == pytest.approx(b.position_preference, abs=1e-5)
        assert a.num_queries == 2 * (90 - 12)
        assert sum(a.relative_position_dist) == pytest.approx(1.0, abs=1e-6)
        assert sum(a.position_preference.values()) == pytest.approx(1.0, abs=1e-6)
    assert "forward" not in vars(model.gpt_neox.layers[0].attention)  # the capture is removed


def test_analysis_does_not_change_the_model_output():
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    from headkv_engine.analysis.analyzer import capture_queries_and_keys  # noqa: PLC0415

    before = model(ids).logits
    seen = []
    with capture_queries_and_keys(model, lambda layer, q, k, start, scale: seen.append((layer, q.shape, k.shape))):
        from transformers.cache_utils import DynamicCache  # noqa: PLC0415

        cache = DynamicCache(config=model.config)
        during = torch.cat([model(ids[:, :15], cache=cache).logits, model(ids[:, 15:], cache=cache).logits], 1)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=0)
    assert seen[0] == (0, (4, 15, 16), (4, 15, 16)) and seen[-1] == (1, (4, 25, 16), (4, 40, 16))


def test_save_round_trip(tmp_path):
    from headkv_engine.analysis import load_statistics  # noqa: PLC0415

    model = tiny_model(2, 4, 16)
    result = hk.analyze(model, torch.randint(0, 97, (50,)), progress=False)
    path = result.save(tmp_path)
    stats, info = load_statistics(path)
    assert stats == result.statistics
    assert info["num_layers"] == 2 and info["tokens"] == 50 and info["backend"] in ("cpu", "torch")


def test_non_finite_statistics_round_trip_as_nan(tmp_path):
    """save writes a NaN statistic as null (strict JSON); load reads it back as NaN instead of refusing it."""
    from headkv_engine.analysis import load_statistics  # noqa: PLC0415

    result = hk.analyze(tiny_model(1, 2, 16), torch.randint(0, 97, (30,)), progress=False)
    result.statistics[1].mean_entropy = float("nan")
    result.statistics[1].position_preference["recent"] = float("nan")
    result.statistics[1].relative_position_dist[3] = float("inf")
    result.statistics[1].sink_mass_by_size[4] = float("nan")
    result.statistics[1].distance_mass_log2[2] = float("nan")
    path = result.save(tmp_path)
    stats, _ = load_statistics(path)
    assert math.isnan(stats[1].mean_entropy) and math.isnan(stats[1].position_preference["recent"])
    assert math.isnan(stats[1].relative_position_dist[3]) and math.isnan(stats[1].sink_mass_by_size[4])
    assert math.isnan(stats[1].distance_mass_log2[2])
    assert stats[0] == result.statistics[0]
    hk.Profile.from_budget(path, 8, length=30)  # the budget planner reads the file too (was a TypeError on null)


@pytest.mark.parametrize("field, value, expected", [
    ("layer_idx", 1.0, "layer_idx: expected an integer >= 0, got 1.0"),
    ("relative_position_dist", [0.5, 0.5], "relative_position_dist: expected a list of 64 numbers (layer 0, head 1)"),
    ("sink_mass_by_size", [0.1], "sink_mass_by_size: expected an object"),
    ("mass_by_query_position", [{"positions": [0, 1]}], "mass_by_query_position: expected a list of objects"),
    ("position_preference", {"sink": 0.5, "local": 0.5, "recent": "0.2", "global": 0.0},
     "position_preference: expected an object with a number for each of ['sink', 'local', 'recent', 'global']"),
])
def test_load_names_the_file_entry_and_field(tmp_path, field, value, expected):
    import json  # noqa: PLC0415

    from headkv_engine.analysis import load_statistics  # noqa: PLC0415

    path = hk.analyze(tiny_model(1, 2, 16), torch.randint(0, 97, (30,)), progress=False).save(tmp_path)
    data = json.loads(open(path).read())
    data["head_statistics"][1][field] = value
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError) as error:
        load_statistics(path)
    assert str(error.value).startswith(f"{path}: head_statistics[1]: {expected}"), error.value
