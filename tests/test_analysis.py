"""Head analysis: the statistics kernel against its reference on odd shapes, hk.analyze edge cases, the seed's
AttentionAnalyzer, statistics files without the optional histograms, reports and figures."""

import json
import math

import matplotlib.image
import pytest
import torch
from reference_model import tiny_model, wrap_forward
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import headkv_engine as hk
from headkv_engine.analysis import load_classifications, load_statistics, write_analysis, write_validation
from headkv_engine.cli import main
from headkv_engine.ops.statistics import REGIONS, head_statistics, head_statistics_reference

CASES = [  # heads, q_start, tokens_q, head_dim, sink_size, local_window, recent_ratio, min_query, dtype
    (3, 0, 70, 16, 4, 8, 0.1, None, torch.float32),
    (2, 37, 29, 8, 0, 1, 0.0, None, torch.float32),  # no sink, window of one, no recent region
    (1, 5, 80, 24, 16, 3, 1.0, 0, torch.float16),  # every query counted, sink wider than early rows
    (4, 130, 3, 16, 4, 8, 0.5, None, torch.bfloat16),  # a short block late in a long sequence
    (2, 0, 9, 4, 4, 8, 0.1, None, torch.float32),  # shorter than sink + window: nothing counted
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}-start{c[1]}-Tq{c[2]}-{str(c[8])[6:]}")
def test_cpu_kernel_matches_reference(case):
    heads, start, tokens_q, head_dim, sink, local, recent, min_query, dtype = case
    gen = torch.Generator().manual_seed(tokens_q)
    q = (torch.randn(heads, tokens_q, head_dim, generator=gen) * 2).to(dtype)
    k = (torch.randn(heads, start + tokens_q, head_dim, generator=gen) * 2).to(dtype)
    kw = dict(scale=head_dim**-0.5, sink_size=sink, local_window=local, recent_ratio=recent, min_query=min_query)
    want = head_statistics(q, k, start, backend="torch", **kw)
    got = head_statistics(q, k, start, backend="cpu", **kw)
    assert set(got) == set(want)
    assert torch.equal(got["count"], want["count"])
    count = want["count"].clamp(min=1)[:, None]
    for key in want:
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key].reshape(heads, -1) / count, want[key].reshape(heads, -1) / count,
                                   atol=2e-6, rtol=0, msg=key)


def test_reference_histograms_by_definition():
    """Regions, 64-bin and log2 histograms, sink masses of the reference against per-key loops."""
    gen = torch.Generator().manual_seed(7)
    start, tokens_q, sink, local, recent = 20, 50, 3, 5, 0.3
    q, k = torch.randn(1, tokens_q, 8, generator=gen) * 3, torch.randn(1, start + tokens_q, 8, generator=gen) * 3
    sums = head_statistics_reference(q, k, start, scale=0.5, sink_size=sink, local_window=local, recent_ratio=recent,
                                     min_query=0, query_block=16)
    regions, relative = torch.zeros(4, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    log2 = torch.zeros(sums["log2"].shape[1], dtype=torch.float64)
    sinks = torch.zeros(5, dtype=torch.float64)
    for i in range(tokens_q):
        t = start + i
        p = torch.softmax(q[0, i].double() @ k[0, : t + 1].double().T * 0.5, -1)
        for j in range(t + 1):
            d = t - j
            region = 0 if j < sink else 1 if d < local else 2 if j >= t + 1 - math.ceil(recent * (t + 1)) else 3
            regions[region] += p[j]
            relative[min(d, 63)] += p[j]
            log2[d.bit_length()] += p[j]  # bin i >= 1: 2^(i-1) <= d < 2^i
            for z, s in enumerate((1, 2, 4, 8, 16)):
                sinks[z] += p[j] if j < s else 0
    for key, value in (("regions", regions), ("relative", relative), ("log2", log2), ("sinks", sinks)):
        torch.testing.assert_close(sums[key][0], value, atol=1e-10, rtol=0, msg=key)
    assert sums["log2"].shape[1] == (start + tokens_q - 1).bit_length() + 1


def test_op_rejects_bad_inputs():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="keys up to the last query"):
        head_statistics(q, k, 0, scale=1.0, backend="torch")
    with pytest.raises(ValueError, match="recent_ratio"):
        head_statistics(q, k, 1, scale=1.0, recent_ratio=1.5, backend="torch")
    with pytest.raises(ValueError, match="k must be"):
        head_statistics(q, torch.randn(3, 6, 8), 1, scale=1.0, backend="torch")


def test_analyze_list_of_sequences_bf16_and_errors():
    model = tiny_model(2, 4, 16)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (40, 13, 70)]
    one = hk.analyze(model, rows, chunk_size=32, progress=False, backend="cpu")
    parts = [hk.analyze(model, row, chunk_size=64, progress=False, backend="torch") for row in (rows[0], rows[2])]
    first = one.statistics[5]
    assert first.num_queries == (40 - 12) + (13 - 12) + (70 - 12)
    assert one.model_info["sequences"] == 3 and one.model_info["tokens"] == 123
    # the means over three sequences are the query-weighted means of the per-sequence means (13 adds one query)
    assert first.mean_entropy == pytest.approx(
        (parts[0].statistics[5].mean_entropy * 28 + parts[1].statistics[5].mean_entropy * 58) / 86, abs=0.02)
    half = hk.analyze(tiny_model(2, 4, 16, dtype=torch.bfloat16), rows[2], progress=False, backend="cpu")
    assert half.model_info["dtype"] == "bfloat16"
    assert half.statistics[5].mean_entropy == pytest.approx(parts[1].statistics[5].mean_entropy, abs=0.05)
    with pytest.raises(ValueError, match="no query to analyse"):
        hk.analyze(model, torch.arange(12), progress=False)
    with pytest.MonkeyPatch.context() as env, pytest.raises(RuntimeError, match="backend 'metal' is unavailable"):
        env.setenv("HEADKV_METAL_EMULATE", "0")  # checked before the run
        hk.analyze(model, rows[0], progress=False, backend="metal")
    with pytest.raises(ValueError, match="chunk_size"):
        hk.analyze(model, rows[0], chunk_size=0, progress=False)


def test_analyze_keeps_instance_forwards_and_refuses_patched_models():
    """A forward set on an attention instance (a hook, a wrapper) runs again after analyze; a model whose inner
    GPTNeoXModel is patched is refused like a patched one."""
    model = tiny_model(2, 4, 16)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2))
    attention = model.gpt_neox.layers[1].attention
    calls = wrap_forward(attention)
    wrapped = attention.forward
    hk.analyze(model, ids, progress=False)
    assert attention.forward is wrapped and "_headkv_capture" not in vars(attention)
    calls.clear()
    model(ids[None])
    assert calls == [1]  # the wrapper runs again
    del attention.forward
    with hk.patch_model(model.gpt_neox, hk.Profile.full(2, 4), backend="torch"):
        with pytest.raises(RuntimeError, match="unpatched model"):
            hk.analyze(model, ids, progress=False)


@pytest.fixture(scope="module")
def result():
    model = tiny_model(2, 4, 16)
    return hk.analyze(model, torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(1)),
                      progress=False)


def test_mass_by_query_position_adds_up_to_the_overall_means(result):
    for stat in result.statistics:
        octaves = stat.mass_by_query_position
        assert [o["positions"] for o in octaves] == [[8, 16], [16, 32], [32, 64]]  # queries 12 .. 59
        counts = torch.tensor([o["num_queries"] for o in octaves], dtype=torch.float64)
        assert counts.tolist() == [2 * 4, 2 * 16, 2 * 28] and counts.sum() == stat.num_queries  # 2 sequences
        width = len(stat.distance_mass_log2)
        histograms = torch.tensor([o["distance_mass_log2"] + [0.0] * (width - len(o["distance_mass_log2"]))
                                   for o in octaves], dtype=torch.float64)
        assert (counts @ histograms / counts.sum()).tolist() == pytest.approx(stat.distance_mass_log2, abs=1e-12)
        for size, mass in stat.sink_mass_by_size.items():
            by_octave = torch.tensor([o["sink_mass_by_size"][size] for o in octaves], dtype=torch.float64)
            assert float(counts @ by_octave / counts.sum()) == pytest.approx(mass, abs=1e-12)
        assert len(octaves[0]["distance_mass_log2"]) == (15).bit_length() + 1  # distances < 16 in [8, 16)


def test_statistics_file_documents_its_fields_and_old_files_load(result, tmp_path):
    path = result.save(tmp_path)
    data = json.loads(open(path).read())
    entry = data["head_statistics"][0]
    assert set(entry) - {"layer_idx", "head_idx"} <= set(data["field_definitions"])  # every field explained
    assert sum(entry["distance_mass_log2"]) == pytest.approx(1.0, abs=1e-9)
    assert entry["sink_mass_by_size"]["4"] == pytest.approx(entry["position_preference"]["sink"], abs=1e-9)
    assert len(entry["distance_mass_log2"]) == (60 - 1).bit_length() + 1
    # a seed-format file: no optional histograms, no definitions
    for e in data["head_statistics"]:
        del e["distance_mass_log2"], e["sink_mass_by_size"], e["mass_by_query_position"], e["num_queries"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model_info": data["model_info"], "head_statistics": data["head_statistics"]}))
    stats, info = load_statistics(old)
    assert stats[0].distance_mass_log2 is None and stats[0].sink_mass_by_size is None
    assert stats[0].mass_by_query_position is None
    assert "distance_mass_log2" not in stats[0].to_dict()
    assert [c.head_type for c in hk.classify(stats)] == [c.head_type for c in hk.classify(result.statistics)]
    old.write_text(json.dumps({"head_statistics": [{"layer_idx": 0}]}))
    with pytest.raises(ValueError, match="mean_entropy"):
        load_statistics(old)


def test_reports_and_validation_of_stored_classifications(result, tmp_path):
    files = write_analysis(result, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in files)
    summary = (tmp_path / "analysis_summary.txt").read_text()
    assert "COMPRESSIBLE HEADS" in summary and f"tokens: {result.model_info['tokens']}" in summary
    # validate the stored classifications without --reclassify: one head edited to disagree with the rules
    stored = json.loads((tmp_path / "head_classifications.json").read_text())
    stored["classifications"][3]["head_type"] = "dead"
    (tmp_path / "head_classifications.json").write_text(json.dumps(stored))
    assert main(["validate", "--results-dir", str(tmp_path)]) == 0
    report = (tmp_path / "validation" / "validation_report.txt").read_text()
    assert "AGREEMENT WITH THE REFINED RULES: 7 of 8 heads" in report and "L00 H03: dead ->" in report
    assert not (tmp_path / "validation" / "refined_classifications.json").exists()
    del stored["classifications"][0]["confidence"]
    (tmp_path / "head_classifications.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"classifications\[0\] lacks \['confidence'\]"):
        load_classifications(tmp_path / "head_classifications.json")


def test_attention_analyzer_seed_api(tmp_path):
    words = "the head attends to first last token sink window".split()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    analyzer = hk.AttentionAnalyzer(tiny_model(2, 4, 16), tokenizer, device="cpu", sink_size=2, local_window=4,
                                    recent_ratio=0.2)
    stats, classifications = analyzer.analyze(" ".join(words * 20), max_tokens=50, chunk_size=16)
    assert len(stats) == len(classifications) == 8 and stats[0].num_queries == 50 - 6
    assert isinstance(classifications[0], hk.HeadClassification)
    analyzer.save_results(stats, classifications, tmp_path)
    saved, info = load_statistics(tmp_path / "head_statistics.json")
    assert saved == stats and (info["sink_size"], info["local_window"], info["recent_ratio"]) == (2, 4, 0.2)
    assert len(load_classifications(tmp_path / "head_classifications.json")) == 8
    assert (tmp_path / "entropy_heatmap.png").exists()


def synthetic(layers, heads):
    gen = torch.Generator().manual_seed(0)
    out = []
    for layer in range(layers):
        for head in range(heads):
            shares = torch.rand(4, generator=gen)
            shares = (shares / shares.sum()).tolist()
            rel = torch.rand(64, generator=gen)
            out.append(hk.HeadStatistics(
                layer, head, 4 * torch.rand(1, generator=gen).item(), 0.1, 0.3, dict(zip(REGIONS, shares)),
                shares[0], 0.2 + torch.rand(1, generator=gen).item(), (rel / rel.sum()).tolist()))
    return out


def test_figures_of_a_32x32_model(tmp_path):
    """1024 heads (a 2.8b model): the stacked-share figure wraps into rows of 8 layers."""
    stats = synthetic(32, 32)
    files = write_validation(stats, {}, tmp_path)
    from headkv_engine.analysis.plots import analysis_figures  # noqa: PLC0415

    files += analysis_figures(stats, tmp_path)
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
    tall = matplotlib.image.imread(tmp_path / "position_preference.png").shape[0]
    analysis_figures(synthetic(4, 8), tmp_path)
    assert tall > 2.5 * matplotlib.image.imread(tmp_path / "position_preference.png").shape[0]


def test_dataset_source_fails_clearly_without_the_package_or_network(tmp_path):
    from headkv_engine import loading  # noqa: PLC0415

    with pytest.raises(ValueError, match="--dataset"):
        loading.load_text(None, "wikitext:wikitext-2-raw-v1")  # no `datasets` package, or no network here
    with pytest.raises(ValueError, match="--text-file"):
        loading.load_text(str(tmp_path / "missing.txt"))


def test_cli_model_without_tokenizer(tmp_path, capsys):
    tiny_model(1, 2, 8).save_pretrained(tmp_path / "model")
    assert main(["analyze", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_validation_of_legacy_classifications(tmp_path):
    stats = synthetic(2, 4)
    legacy = hk.classify(stats, scheme="legacy")
    assert any(c.head_type == "positional" for c in legacy)
    write_validation(stats, {}, tmp_path, legacy)
    assert "AGREEMENT WITH THE LEGACY RULES: 8 of 8 heads" in (tmp_path / "validation_report.txt").read_text()
