"""Measured per-layer losses (analysis.layer_loss), `headkv calibrate`, and from_budget priced by them."""

import json

import pytest
import torch
from reference_model import tiny_model
from test_budget import LENGTH, statistics

import headkv_engine as hk
from headkv_engine.analysis.layer_loss import LAYER_LOSSES_FORMAT, layer_loss, load_layer_losses, measure_layer_losses
from headkv_engine.cli import main


def windows_of(tokens, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (tokens,), generator=gen) for _ in range(count)]


def test_measured_losses_are_the_loss_of_one_truncated_layer():
    model = tiny_model(2, 4, 16)
    ids = windows_of(24, 3)
    result = measure_layer_losses(model, ids, sink_size=1, windows=(64, 2, 8))
    assert result["format"] == LAYER_LOSSES_FORMAT and result["windows"] == [2, 8, 64]
    assert result["tokens"] == 3 * 23 and len(result["loss_increase"]) == 2
    full = hk.evaluate(model, ids).nll
    assert result["full_loss"] == pytest.approx(full)
    # a window longer than the windows evaluated keeps every key: nothing changes
    assert [row[2] for row in result["loss_increase"]] == pytest.approx([0.0, 0.0], abs=1e-6)
    truncated = hk.Profile(2, 4, heads={(1, h): hk.HeadPolicy.make("sink_window", 1, 2) for h in range(4)})
    assert result["loss_increase"][1][0] == pytest.approx(hk.evaluate(model, ids, truncated).nll - full, abs=1e-6)
    assert abs(result["loss_increase"][1][0]) > 1e-4  # a 3-token layer does change this random model


def constructed_losses(good_layer=0):
    """Layer `good_layer` predicts better the less it sees; the other one loses with every token dropped."""
    helps, hurts = [-0.5, -0.2, 0.0], [2.0, 0.5, 0.0]
    rows = [helps, hurts] if good_layer == 0 else [hurts, helps]
    return {"format": LAYER_LOSSES_FORMAT, "sink_size": 4, "windows": [4, 64, 512], "loss_increase": rows}


@pytest.mark.parametrize("good_layer", [0, 1])
def test_from_budget_priced_by_layer_losses_follows_them(good_layer):
    budget = 200
    kl = hk.Profile.from_budget(statistics(), mean_tokens=budget, length=LENGTH)
    priced = hk.Profile.from_budget(statistics(), mean_tokens=budget, length=LENGTH,
                                    layer_losses=constructed_losses(good_layer), kl_weight=0.001)
    assert priced.effective_context(LENGTH) <= budget
    kept = [sum(priced.policy(layer, h).kept_tokens(LENGTH) for h in range(4)) for layer in range(2)]
    assert kept[good_layer] < kept[1 - good_layer]  # the layer that gains from less context is given less
    assert priced.to_dict()["heads"] != kl.to_dict()["heads"]
    assert priced.meta["price"] == "layer_loss + 0.001 x kl" and kl.meta["price"] == "kl"


def test_layer_loss_takes_the_nearest_measured_window():
    losses = constructed_losses()
    # 34 is as near to 4 as to 64: the smaller window, the dearer price
    assert [layer_loss(losses, 1, w) for w in (1, 4, 34, 35, 200, 400, 4096)] == [2.0, 2.0, 2.0, 0.5, 0.5, 0.0, 0.0]


def test_bad_layer_losses_are_clear_errors():
    with pytest.raises(hk.ProfileError, match="layer_losses: expected a 'headkv-layer-losses/1'"):
        load_layer_losses({"windows": [4], "loss_increase": [[0.0]]})
    ragged = {**constructed_losses(), "loss_increase": [[0.0, 0.0], [0.0, 0.0, 0.0]]}
    with pytest.raises(hk.ProfileError, match="layer_losses.loss_increase: expected one row of 3"):
        load_layer_losses(ragged)
    for field, bad, message in (("windows", 5, "layer_losses.windows: expected a non-empty list"),
                                ("windows", [4, "x", 512], "layer_losses.windows"),
                                ("loss_increase", [["a", 0.0, 0.0]] * 2, "expected finite numbers"),
                                ("loss_increase", [[float("nan"), 0.0, 0.0]] * 2, "expected finite numbers"),
                                ("loss_increase", 3, "expected one row of 3 values per layer")):
        with pytest.raises(hk.ProfileError, match=message):
            load_layer_losses({**constructed_losses(), field: bad})
    with pytest.raises(hk.ProfileError, match="no row for layer -1"):
        layer_loss(constructed_losses(), -1, 64)
    one_layer = {**constructed_losses(), "loss_increase": [[0.0, 0.0, 0.0]]}
    with pytest.raises(hk.ProfileError, match=r"one row per layer of the analysed model \(2\), got 1"):
        hk.Profile.from_budget(statistics(), mean_tokens=64, length=LENGTH, layer_losses=one_layer)
    with pytest.raises(hk.ProfileError, match="no row for layer 1"):
        layer_loss(one_layer, 1, 64)
    three_layers = {**constructed_losses(), "loss_increase": [[0.0, 0.0, 0.0]] * 3}  # another model's file
    with pytest.raises(hk.ProfileError, match=r"analysed model \(2\), got 3"):
        hk.Profile.from_budget(statistics(), mean_tokens=64, length=LENGTH, layer_losses=three_layers)
    with pytest.raises(hk.ProfileError, match="kl_weight"):
        hk.Profile.from_budget(statistics(), mean_tokens=64, length=LENGTH, layer_losses=constructed_losses(),
                               kl_weight=-1)


def test_layer_losses_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(hk.ProfileError, match=rf"layer_losses: {broken}: not a JSON file"):
        load_layer_losses(str(broken))
    repeated = tmp_path / "repeated.json"
    repeated.write_text(json.dumps({**constructed_losses(), "windows": [4, 4, 512]}))
    with pytest.raises(hk.ProfileError, match=rf"expected distinct window sizes, got \[4, 4, 512\] \(in {repeated}\)"):
        load_layer_losses(repeated)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(constructed_losses()))
    assert load_layer_losses(good, num_layers=2)["windows"] == constructed_losses()["windows"]
    with pytest.raises(hk.ProfileError, match=rf"one row per layer of the model \(3\), got 2 .*\(in {good}\)"):
        load_layer_losses(good, num_layers=3)


def test_repeated_window_sizes_refused_before_measuring():
    model = tiny_model(2, 4, 16)
    with pytest.raises(ValueError, match=r"\(--window-sizes\): expected distinct window sizes, got \[4, 8, 8\]"):
        measure_layer_losses(model, torch.arange(12), windows=(8, 4, 8))


def test_calibrate_command_and_ablate_with_layer_losses(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "layer_losses.json"
    args = ["calibrate", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
            "--windows", "2", "--window-sizes", "4", "16", "--output", str(output)]
    assert main(args) == 0
    written = json.loads(output.read_text())
    assert written["windows"] == [4, 16] and len(written["loss_increase"]) == 2 and written["tokens"] == 78
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # not overwritten...
    assert main([*args, "--force"]) == 0  # ...unless asked

    analysis = tmp_path / "analysis"
    assert main(["analyze", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
                 "--output-dir", str(analysis)]) == 0
    ablation = tmp_path / "ablation"
    cmd = ["ablate", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
           "--offset", "80", "--ablation", "all", "--budgets", "8", "--statistics",
           str(analysis / "head_statistics.json"), "--layer-losses", str(output), "--output-dir", str(ablation)]
    assert main(cmd) == 0
    results = json.loads((ablation / "ablation_results.json").read_text())
    row = next(c for c in results["configs"] if c["name"] == "from_budget_measured_8")
    assert row["parameters"]["price"].startswith("layer_loss") and row["effective_context"] <= 8
    assert next(c for c in results["configs"] if c["name"] == "from_budget_8")["parameters"]["price"] == "kl"
    assert "from_budget (measured layer losses) vs StreamingLLM" in (ablation / "ablation_report.md").read_text()
    no_statistics = [a for a in cmd if a != str(analysis / "head_statistics.json") and a != "--statistics"]
    assert main([*no_statistics, "--force"]) == 2
    assert "--layer-losses" in capsys.readouterr().err
