"""`headkv demo` end to end on the built-in model, in a shortened setting."""

import json
import time

import pytest
import torch
from reference_model import tiny_model

from headkv_engine import loading
from headkv_engine.cli import main


def test_demo_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output-dir", str(out), "--analysis-tokens", "300", "--eval-tokens", "100", "--eval-windows", "2",
            "--decode-context", "96", "--new-tokens", "3", "--budgets", "16", "48"]
    assert main(args) == 0
    results = json.loads((out / "demo_results.json").read_text())
    names = {c["name"] for c in results["configs"]}
    # the built-in model's shipped calibration adds the measured-loss rows
    assert names == {"full", "head_aware", "B_streaming_16", "B_streaming_48", "from_budget_16", "from_budget_48",
                     "from_budget_measured_16", "from_budget_measured_48"}
    assert all(c["tokens"] == 2 * 99 and c["perplexity"] > 1 for c in results["configs"])
    # 3 analysis windows of 100 tokens (BOS + 99 of the text), then the evaluation: no token is in both
    assert (results["analysis"]["tokens"], results["analysis"]["sequences"]) == (300, 3)
    assert results["eval_offset"] == 3 * 99
    assert next(c for c in results["configs"] if c["name"] == "from_budget_16")["effective_context"] <= 16
    decode = results["decode"]
    assert decode["from_budget_16"]["kv_bytes"] < decode["full"]["kv_bytes"]
    assert decode["full"]["kv_bytes_kept"] == decode["full"]["kv_bytes"]  # the dense cache holds no spare room
    assert all(v["kv_bytes_kept"] <= v["kv_bytes"] for v in decode.values())
    report = (out / "report.md").read_text()
    assert "## Perplexity at equal budget" in report and "B_streaming_48" in report
    kept = decode["from_budget_16"]["kv_bytes_kept"]
    assert f"| from_budget_16 | {decode['from_budget_16']['ms_per_token']:.2f} | {kept:,} |" in report
    assert "`from_budget_measured` is at or below StreamingLLM's perplexity at" in report
    for name in ("ppl_vs_context.png", "analysis/head_statistics.json", "analysis/entropy_heatmap.png",
                 "profiles/from_budget_16.json"):
        assert (out / name).stat().st_size > 0, name
    assert main(args) == 2  # results are not overwritten without --force
    assert "--force" in capsys.readouterr().err


def test_demo_analysis_and_evaluation_never_overlap(tmp_path):
    """--eval-tokens above --analysis-tokens: one analysis window of the evaluated length, evaluation after it."""
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--analysis-tokens", "60", "--eval-tokens", "80",
                 "--eval-windows", "1", "--decode-context", "32", "--new-tokens", "1", "--budgets", "16"]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert (results["analysis"]["tokens"], results["eval_offset"]) == (80, 79)


def test_demo_bad_budget(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--budgets", "4"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--layer-losses", str(tmp_path / "none.json")]) == 2
    assert "--layer-losses" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything is written
    for flag, value, expected in (("--eval-tokens", "0", ">= 2"), ("--new-tokens", "0", ">= 1"),
                                  ("--eval-windows", "-1", ">= 1"), ("--analysis-tokens", "x", ">= 2")):
        assert main(["demo", "--output-dir", str(tmp_path / "d"), flag, value]) == 2
        assert f"argument {flag}: expected an integer {expected}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bench_compares_with_the_full_cache(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--method", "streaming_llm", "--budget", "24", "--num-samples", "1", "--max-tokens", "64",
            "--max-new-tokens", "3", "--output-dir", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "bench_results.json").read_text())
    assert [r["method"] for r in rows] == ["full", "streaming_llm"]
    full, streaming = rows
    assert streaming["kv_bytes"] < full["kv_bytes"] and streaming["kv_fraction_of_full"] < 1
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["throughput_tok_s"] > 0 for r in rows)
    md = (out / "bench_results.md").read_text()
    assert "| streaming_llm | 24 |" in md
    assert all(r["peak_memory"] == "rss_peak" and r["peak_memory_mb"] >= 0 for r in rows)
    assert "Peak memory: peak resident memory during generation (VmHWM" in md
    assert main(args) == 2  # results are not overwritten without --force
    assert "--force" in capsys.readouterr().err
    assert main([*args[:-2], "--max-new-tokens", "1", "--output-dir", str(tmp_path / "b1")]) == 2
    assert "argument --max-new-tokens: expected an integer >= 2, got 1" in capsys.readouterr().err


def test_builtin_head_types_match_the_model_card():
    """The model card's head-type counts are what the analysis finds (bench/builtin_head_types.py wrote them)."""
    import os  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    from headkv_engine import zoo  # noqa: PLC0415

    path = os.path.join(zoo.BUILTIN_DIR, "head_types.json")
    if not os.path.exists(path):
        pytest.fail("head_types.json is missing: run bench/builtin_head_types.py after exporting the model")
    import sys  # noqa: PLC0415

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from builtin_head_types import HEADING, head_types  # noqa: PLC0415

    recorded = json.loads(open(path).read())
    assert head_types()["counts"] == recorded["counts"]
    card = open(os.path.join(zoo.BUILTIN_DIR, "MODEL_CARD.md")).read()
    assert HEADING in card and all(f"| {k} | {v} |" in card for k, v in recorded["counts"].items())


def test_bench_memory_reading_works_without_proc(monkeypatch):
    """`headkv bench` on macOS: no /proc, ru_maxrss in bytes; the reading falls back to the rise of the peak."""
    import builtins
    import resource

    from headkv_engine import e2e_bench

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    linux = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert e2e_bench._peak_rss_mb() == pytest.approx(linux, rel=0.05)
    memory = e2e_bench.PeakMemory(torch.device("cpu"))
    assert memory.kind == "rss_peak_growth" and memory.peak_mb() >= 0
    monkeypatch.setattr(e2e_bench.sys, "platform", "darwin")
    assert e2e_bench._peak_rss_mb() == pytest.approx(linux / 1024, rel=0.05)  # the same count, read as bytes


def tiny_demo_args(model_dir, text_file, out, *extra):
    """`headkv demo` on the tiny saved model of conftest: seconds, not a minute."""
    return ["demo", "--model", str(model_dir), "--text-file", str(text_file), "--output-dir", str(out),
            "--analysis-tokens", "80", "--eval-tokens", "40", "--eval-windows", "2", "--decode-context", "32",
            "--new-tokens", "2", *extra]


def test_force_removes_an_earlier_runs_results_only(model_dir, text_file, tmp_path):
    out = tmp_path / "demo"
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "8", "12")) == 0
    (out / "notes.txt").write_text("mine")  # files of the user's stay
    (out / "profiles" / "mine.json").write_text("{}")
    (out / "profiles" / ".from_budget_8.json.abc1_3xy.json").write_text("")  # an interrupted write's temporary
    (out / "profiles" / "from_budget_my_tuned.json").write_text("{}")  # the user's, though named alike
    began = time.perf_counter()
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "10", "--force")) == 0
    seconds = time.perf_counter() - began
    profiles = sorted(p.name for p in (out / "profiles").iterdir())
    assert profiles == ["B_streaming_10.json", "from_budget_10.json", "from_budget_my_tuned.json", "full.json",
                        "head_aware.json", "mine.json"]
    assert (out / "notes.txt").read_text() == "mine"
    # the evaluation's own time, not the whole demo's
    results = json.loads((out / "demo_results.json").read_text())
    assert 0 < results["evaluation_seconds"] < seconds / 2
    assert f"4 profiles evaluated in {results['evaluation_seconds']:.0f} s" in (out / "report.md").read_text()
    # every file the demo wrote is one of its known outputs (so --force can find them again)
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {
        "notes.txt", "profiles/mine.json", "profiles/from_budget_my_tuned.json"}
    assert all(loading.is_output(f, loading.OUTPUTS["demo"]) for f in written), written


def test_output_names_are_those_the_writers_write(tmp_path):
    """loading.OUTPUTS lists what analyze and validate write (their writers return the names)."""
    from headkv_engine.analysis import analyze, write_analysis  # noqa: PLC0415
    from headkv_engine.analysis.report import write_validation  # noqa: PLC0415

    model = tiny_model(2, 4, 16, vocab=97)
    result = analyze(model, torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0)),
                     backend="torch")
    assert set(write_analysis(result, tmp_path / "a")) == {n for n in loading.OUTPUTS["analyze"] if "/" not in n}
    names = write_validation(result.statistics, result.model_info, tmp_path / "a" / "validation")
    assert set(names) == set(loading.OUTPUTS["validate"])
    assert {f"validation/{n}" for n in names} <= set(loading.OUTPUTS["analyze"])


def test_prepare_output_dir_force_removes_known_names_only(tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    for name in ("refined_classifications.json", "validation_report.txt", "keep.txt", ".validation_report.txt.x",
                 ".validation_report.txt.a1b2c3d4"):
        (out / name).write_text("old")
    (out / "entropy_by_type.png").mkdir()  # a directory of an output's name is not removed
    with pytest.raises(ValueError, match="--force"):
        loading.prepare_output_dir(str(out), False, loading.OUTPUTS["validate"])
    loading.prepare_output_dir(str(out), True, loading.OUTPUTS["validate"])
    # kept: a name that is no temporary of ours (".x" is not tempfile's 8 random characters)
    assert sorted(p.name for p in out.iterdir()) == [".validation_report.txt.x", "entropy_by_type.png", "keep.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output-dir: .* is not a directory"):
        loading.prepare_output_dir(str(tmp_path / "file"), True)


def test_demo_refuses_bad_inputs_before_any_result(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "demo"
    other_model = tmp_path / "layer_losses.json"  # a calibration of a 3-layer model; the tiny model has 2
    other_model.write_text(json.dumps({"format": "headkv-layer-losses/1", "windows": [4, 16], "model": "other",
                                       "loss_increase": [[0.1, 0.0]] * 3}))
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "8", "--layer-losses", str(other_model))) == 2
    err = capsys.readouterr().err
    assert "one row per layer of the model (2), got 3" in err and str(other_model) in err
    assert not out.exists()  # refused before the analysis is written; no empty directory left behind
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "8", "40")) == 2
    assert "--budgets: every budget must exceed the 4 StreamingLLM sinks and be below --eval-tokens (40" in (
        capsys.readouterr().err)
    assert not out.exists()  # the directory the refused run made is gone again


def test_a_refused_demo_under_force_keeps_the_earlier_results(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_results.json").write_text("{}")
    (out / "report.md").write_text("earlier")
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "2", "--force")) == 2
    assert "--budgets" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "earlier" and (out / "demo_results.json").exists()


def test_remove_outputs_does_not_enter_a_linked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "full.json").write_text("the user's")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "profiles").symlink_to(elsewhere)
    (out / "report.md").write_text("old")
    assert loading.remove_outputs(str(out), loading.OUTPUTS["demo"]) == [str(out / "report.md")]
    assert (elsewhere / "full.json").read_text() == "the user's"


def test_demo_refuses_to_write_through_a_linked_folder(model_dir, text_file, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "demo"
    out.mkdir()
    (out / "profiles").symlink_to(elsewhere)
    assert main(tiny_demo_args(model_dir, text_file, out, "--budgets", "8", "--force")) == 2
    assert "profiles' is a link" in capsys.readouterr().err
    assert not any(elsewhere.iterdir())


def test_results_dir_removes_only_an_empty_directory_it_made(tmp_path):
    made = tmp_path / "new"
    with pytest.raises(RuntimeError), loading.results_dir(str(made), False):
        raise RuntimeError("refused input")
    assert not made.exists()
    with pytest.raises(RuntimeError), loading.results_dir(str(made), False):
        (made / "partial.json").write_text("{}")
        raise RuntimeError("failed after writing")
    assert (made / "partial.json").exists()  # what a failed run wrote stays for the user to see
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), loading.results_dir(str(kept), False):
        raise RuntimeError("refused input")
    assert kept.is_dir()  # the user's own directory is never removed
