"""The headkv command line end to end, on a tiny GPTNeoX saved to a temporary directory."""

import json

import pytest
import torch

from headkv_engine.cli import main


def test_analyze_validate_ablate(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "150",
            "--chunk-size", "64", "--output-dir", str(out)]
    assert main(args) == 0
    for name in ("head_statistics.json", "head_classifications.json", "entropy_heatmap.png", "position_preference.png",
                 "sink_ratio_analysis.png", "head_clustering.png", "relative_position_heatmap.png",
                 "analysis_summary.txt"):
        assert (out / name).stat().st_size > 0, name
    stats = json.loads((out / "head_statistics.json").read_text())
    assert stats["model_info"]["tokens"] == 150 and len(stats["head_statistics"]) == 8
    assert main(args) == 2  # an existing results directory is not overwritten...
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0  # ...unless asked

    assert main(["validate", "--results-dir", str(out), "--reclassify"]) == 0
    for name in ("refined_classifications.json", "relative_position_by_type.png", "sink_vs_local_scatter.png",
                 "entropy_by_type.png", "validation_report.txt"):
        assert (out / "validation" / name).stat().st_size > 0, name

    ablation = tmp_path / "ablation"
    cmd = ["ablate", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "120",
           "--ablation", "all", "--classifications", str(out / "head_classifications.json"),
           "--statistics", str(out / "head_statistics.json"), "--budgets", "16", "64", "--output-dir", str(ablation)]
    assert main(cmd) == 0
    results = json.loads((ablation / "ablation_results.json").read_text())
    names = {c["name"] for c in results["configs"]}
    assert {"full", "A_window_64", "B_streaming_64", "K_uniform64_aware", "G_conf0.5_base64",
            "from_budget_16", "from_budget_64", "head_aware"} <= names
    assert all(c["tokens"] == 119 and c["perplexity"] > 1 for c in results["configs"])
    budget = next(c for c in results["configs"] if c["name"] == "from_budget_16")
    assert budget["effective_context"] <= 16
    for name in ("ppl_vs_context.png", "sink_importance.png", "confidence_threshold.png", "best_configs.png",
                 "inverse_experiment.png", "ablation_report.md"):
        assert (ablation / name).stat().st_size > 0, name
    assert "B_streaming_64" in (ablation / "ablation_report.md").read_text()
    # resumable: a second run finds every configuration done
    before = (ablation / "ablation_results.json").read_text()
    assert main(cmd) == 0
    assert json.loads((ablation / "ablation_results.json").read_text()) == json.loads(before)
    # ...but not over other tokens or other inputs: rows of two evaluations are never mixed
    other_tokens = [*cmd[:cmd.index("--max-tokens") + 1], "100", *cmd[cmd.index("--max-tokens") + 2:]]
    assert main(other_tokens) == 2
    assert "differs in: tokens" in capsys.readouterr().err
    stats = json.loads((out / "head_statistics.json").read_text())
    stats["head_statistics"][0]["mean_entropy"] += 0.01
    (tmp_path / "other_statistics.json").write_text(json.dumps(stats))
    other_inputs = [*cmd[:cmd.index("--statistics") + 1], str(tmp_path / "other_statistics.json"),
                    *cmd[cmd.index("--statistics") + 2:]]
    assert main(other_inputs) == 2
    assert "differs in: statistics" in capsys.readouterr().err
    assert json.loads((ablation / "ablation_results.json").read_text()) == json.loads(before)


def test_validate_refuses_classifications_of_other_heads(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "60",
                 "--output-dir", str(out)]) == 0
    path = out / "head_classifications.json"
    data = json.loads(path.read_text())
    entries = next(k for k, v in data.items() if isinstance(v, list))
    dropped = data[entries].pop(3)
    path.write_text(json.dumps(data))
    assert main(["validate", "--results-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"layer {dropped['layer_idx']}, head {dropped['head_idx']} is analysed but not classified" in err
    assert not (out / "validation").exists()  # refused before anything is written


def test_analyze_windows(model_dir, text_file, tmp_path, capsys):
    """--windows N analyses N consecutive windows of --max-tokens as separate sequences."""
    import headkv_engine as hk  # noqa: PLC0415
    from headkv_engine import loading  # noqa: PLC0415

    out = tmp_path / "windows"
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "60",
                 "--windows", "3", "--output-dir", str(out)]) == 0
    stats = json.loads((out / "head_statistics.json").read_text())
    assert (stats["model_info"]["tokens"], stats["model_info"]["sequences"]) == (180, 3)
    model, tokenizer, _ = loading.load_model(str(model_dir))
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    direct = hk.analyze(model, torch.tensor([ids[:60], ids[60:120], ids[120:180]]), progress=False)
    for key in ("mean_entropy", "sink_ratio"):
        assert [s[key] for s in stats["head_statistics"]] == pytest.approx(
            [getattr(s, key) for s in direct.statistics], abs=1e-6)
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--windows", "0",
                 "--output-dir", str(tmp_path / "none")]) == 2
    assert "argument --windows: expected an integer >= 1, got 0" in capsys.readouterr().err
    for flag, value in (("--max-tokens", "0"), ("--max-tokens", "-5"), ("--recent-ratio", "1.5")):
        assert main(["analyze", "--model", str(model_dir), flag, value, "--output-dir", str(tmp_path / "none")]) == 2
        assert f"argument {flag}: expected" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_clear_errors(tmp_path, capsys):
    assert main(["validate", "--results-dir", str(tmp_path)]) == 2
    assert "head_statistics.json" in capsys.readouterr().err
    from transformers import GPT2Config  # noqa: PLC0415

    GPT2Config(n_layer=1, n_head=2, n_embd=8).save_pretrained(tmp_path / "gpt2")
    assert main(["analyze", "--model", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "GPTNeoX" in capsys.readouterr().err


def _ablate(model_dir, text_file, output_dir, *extra):
    """A one-configuration ablation (B_streaming_16) on a few tokens."""
    return ["ablate", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
            "--ablation", "window_size", "--budgets", "16", "--output-dir", str(output_dir), *extra]


def test_ablate_refuses_a_directory_of_other_files(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("not an ablation")
    assert main(_ablate(model_dir, text_file, out)) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(_ablate(model_dir, text_file, out, "--force")) == 0  # asked for: written beside the other file
    assert (out / "ablation_results.json").is_file() and (out / "notes.txt").is_file()
    assert main(_ablate(model_dir, text_file, out)) == 0  # its own results: resumed
    (tmp_path / "file").write_text("")
    assert main(_ablate(model_dir, text_file, tmp_path / "file")) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_ablate_force_keeps_the_results_until_new_ones_exist(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(_ablate(model_dir, text_file, out)) == 0
    before = (out / "ablation_results.json").read_text()
    failing = _ablate(tmp_path / "no-such-model", text_file, out, "--force")
    assert main(failing) == 2
    capsys.readouterr()
    assert (out / "ablation_results.json").read_text() == before  # a failed --force run removes nothing
    # --force starts over: a new evaluation (other tokens) replaces the file instead of being refused
    assert main(_ablate(model_dir, text_file, out, "--force", "--offset", "5")) == 0
    results = json.loads((out / "ablation_results.json").read_text())
    assert results["inputs"] != json.loads(before)["inputs"] and [c["name"] for c in results["configs"]] == [
        "B_streaming_16"]


@pytest.mark.parametrize("budgets", [["4"], ["64", "2"]])
def test_ablate_checks_budgets_first(model_dir, text_file, tmp_path, capsys, budgets):
    cmd = _ablate(model_dir, text_file, tmp_path / "ablation")
    cmd[cmd.index("--budgets") + 1:cmd.index("--budgets") + 2] = budgets
    assert main(cmd) == 2
    assert "--budgets: every budget must exceed the 4 StreamingLLM sinks" in capsys.readouterr().err
    assert not (tmp_path / "ablation").exists()


@pytest.fixture(scope="module")
def analysis(model_dir, text_file, tmp_path_factory):
    """An analysis directory of the tiny model; tests edit copies of it."""
    out = tmp_path_factory.mktemp("analysis") / "analysis"
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "60",
                 "--output-dir", str(out)]) == 0
    return out


def _copy(analysis, tmp_path):
    import shutil  # noqa: PLC0415

    return shutil.copytree(analysis, tmp_path / "analysis")


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _without_local(data):
    del data["head_statistics"][2]["position_preference"]["local"]


def _preference_list(data):
    data["head_statistics"][2]["position_preference"] = [0.25] * 4


def _entropy_text(data):
    data["head_statistics"][1]["mean_entropy"] = "high"


@pytest.mark.parametrize("change, field", [
    (_without_local, "head_statistics[2]: position_preference"),
    (_preference_list, "head_statistics[2]: position_preference"),
    (_entropy_text, "head_statistics[1]: mean_entropy"),
    (lambda data: data.update(head_statistics=[]), "head_statistics: expected one entry per analysed head"),
])
def test_validate_refuses_bad_statistics_before_writing(analysis, tmp_path, capsys, change, field):
    out = _copy(analysis, tmp_path)
    _edit(out / "head_statistics.json", change)
    assert main(["validate", "--results-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'head_statistics.json'}: {field}" in err, err
    assert not (out / "validation").exists()


@pytest.mark.parametrize("name", ["head_statistics.json", "head_classifications.json"])
def test_validate_names_a_file_that_is_not_json(analysis, tmp_path, capsys, name):
    out = _copy(analysis, tmp_path)
    with open(out / name, "a") as f:
        f.write("}")
    assert main(["validate", "--results-dir", str(out)]) == 2
    assert f"{out / name}: not a JSON file" in capsys.readouterr().err


def test_validate_refuses_an_unknown_head_type(analysis, tmp_path, capsys):
    out = _copy(analysis, tmp_path)
    _edit(out / "head_classifications.json", lambda data: data["classifications"][5].update(head_type="weird"))
    assert main(["validate", "--results-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"{out / 'head_classifications.json'}: classifications[5].head_type (layer 1, head 1): expected one of "
            "['dead', 'gathering', 'mixed', 'positional', 'sink_mixed', 'sink_positional', 'true_positional'], got "
            "'weird'") in err, err
    assert not (out / "validation").exists()


def test_validate_leaves_no_partial_output(analysis, tmp_path, capsys, monkeypatch):
    from headkv_engine.analysis import report  # noqa: PLC0415

    def fail(statistics, classifications, output_dir, thresholds=None):
        open(f"{output_dir}/relative_position_by_type.png", "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(report, "validation_figures", fail)
    out = _copy(analysis, tmp_path)
    assert main(["validate", "--results-dir", str(out), "--reclassify"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not (out / "validation").exists()


def test_validate_force_removes_the_outputs_of_an_earlier_reclassify(analysis, tmp_path):
    out = _copy(analysis, tmp_path)
    (out / "validation").mkdir()
    (out / "validation" / "notes.txt").write_text("kept")
    assert main(["validate", "--results-dir", str(out), "--reclassify", "--force"]) == 0
    assert (out / "validation" / "refined_classifications.json").is_file()
    assert main(["validate", "--results-dir", str(out), "--force"]) == 0
    assert not (out / "validation" / "refined_classifications.json").exists()  # not of this run
    assert (out / "validation" / "validation_report.txt").is_file() and (out / "validation" / "notes.txt").is_file()


def test_ablation_report_counts_the_predicted_tokens():
    from headkv_engine.ablation_report import markdown  # noqa: PLC0415

    row = {"name": "B_streaming_16", "group": "B", "perplexity": 9.0, "accuracy": 0.1, "effective_context": 16.0,
           "tokens": 30, "commit": "abc"}
    text = markdown({"model": "m", "tokens": 32, "windows": 2, "window_tokens": 16, "configs": [row]})
    assert "30 predicted tokens (32 tokens in 2 windows, each window's first token not predicted)" in text
    assert "32 evaluation tokens" not in text


@pytest.fixture(scope="module")
def other_analysis(tmp_path_factory):
    """An analysis of a model of another shape (3 layers, where the model of the tests has 2)."""
    from reference_model import tiny_model  # noqa: PLC0415

    import headkv_engine as hk  # noqa: PLC0415
    from headkv_engine.analysis import write_analysis  # noqa: PLC0415

    out = tmp_path_factory.mktemp("other") / "analysis"
    result = hk.analyze(tiny_model(3, 4, 16), torch.randint(0, 97, (60,)), progress=False)
    write_analysis(result, out)
    return out


@pytest.mark.parametrize("flag, name", [("--classifications", "head_classifications.json"),
                                        ("--statistics", "head_statistics.json")])
def test_ablate_refuses_inputs_of_another_model_before_evaluating(model_dir, text_file, other_analysis, tmp_path,
                                                                  capsys, flag, name):
    out = tmp_path / "ablation"
    cmd = _ablate(model_dir, text_file, out, flag, str(other_analysis / name))
    cmd[cmd.index("--ablation") + 1] = "all"
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert f"{flag}: configuration " in err and "model.num_layers: profile has 3, the model has 2" in err, err
    assert not (out / "ablation_results.json").exists()  # nothing evaluated


def test_validate_mismatch_names_the_results_dir(analysis, other_analysis, tmp_path, capsys):
    import shutil  # noqa: PLC0415

    out = _copy(analysis, tmp_path)
    shutil.copy(other_analysis / "head_classifications.json", out / "head_classifications.json")
    assert main(["validate", "--results-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--results-dir: {out / 'head_classifications.json'} is not of the heads of " in err
    assert "layer 2, head 0 is classified but not analysed" in err and "--reclassify" in err
    assert not (out / "validation").exists()


def test_analyze_force_removes_the_earlier_analysis_outputs(model_dir, text_file, analysis, tmp_path):
    out = _copy(analysis, tmp_path)
    assert main(["validate", "--results-dir", str(out)]) == 0
    (out / "notes.txt").write_text("kept")
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
                 "--output-dir", str(out), "--force"]) == 0
    assert not (out / "validation" / "validation_report.txt").exists()  # of the earlier analysis
    assert json.loads((out / "head_statistics.json").read_text())["model_info"]["tokens"] == 40
    assert (out / "notes.txt").read_text() == "kept"


def test_a_refused_run_under_force_keeps_the_earlier_results(model_dir, text_file, analysis, tmp_path, capsys):
    out = _copy(analysis, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(tmp_path / "missing.txt"),
                 "--max-tokens", "40", "--output-dir", str(out), "--force"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing removed for a run that never started


def test_calibrate_refuses_an_output_it_cannot_write_before_measuring(model_dir, text_file, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for output, why in ((tmp_path, "is a directory"), (tmp_path / "file" / "losses.json", "is not a directory")):
        assert main(["calibrate", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "20",
                     "--windows", "1", "--window-sizes", "4", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert "--output: " in err and why in err, err
        assert "Loading weights" not in err  # refused before the model is loaded
