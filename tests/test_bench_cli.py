"""`headkv bench` (headkv_engine.e2e_bench): its inputs, its warm-up and its memory figures, in process."""

import json

import pytest
import torch

from headkv_engine import e2e_bench
from headkv_engine.cli import build_parser, main
from headkv_engine.patching import is_patched


def bench_args(model_dir, text_file, *extra):
    return build_parser().parse_args(["bench", "--model", str(model_dir), "--text-file", str(text_file),
                                      "--num-samples", "2", "--max-tokens", "40", "--max-new-tokens", "3",
                                      "--budget", "12", "--device", "cpu", *extra])


@pytest.mark.parametrize("method", ["full", "streaming_llm", "fix_size_l2"])
def test_each_method_is_warmed_up_in_the_state_it_is_measured_in(model_dir, text_file, monkeypatch, method):
    calls = []
    generate = e2e_bench._generate

    def recording(model, prompt, new_tokens, compress=None):
        calls.append((is_patched(model), compress is not None, prompt.numel()))
        return generate(model, prompt, new_tokens, compress)

    monkeypatch.setattr(e2e_bench, "_generate", recording)
    row = e2e_bench.worker(bench_args(model_dir, text_file, "--method", method))
    state = (method == "streaming_llm", method == "fix_size_l2")
    # the warm-up (first call), then the two measured prompts: all in the same state, at the measured length
    assert calls == [(*state, 40)] * 3
    assert row["prompts"] == 2 and row["peak_memory_mb"] >= 0


def test_peak_memory_is_the_measured_runs_own():
    held = torch.ones(64 * 2**20, dtype=torch.uint8)  # a peak before the measurement (as loading a model makes)
    held.add_(1)
    del held
    memory = e2e_bench.PeakMemory(torch.device("cpu"))
    assert memory.kind == "rss_peak"
    during = torch.ones(24 * 2**20, dtype=torch.uint8)
    during.add_(1)
    peak = memory.peak_mb()
    del during
    assert 16 <= peak < 56  # the 24 MiB of the run, not the earlier peak
    assert memory.peak_mb() > 16  # a peak, not the present memory (the kernel's counters are exact to ~1 MiB)


def test_peak_memory_without_a_resettable_peak_never_goes_negative(monkeypatch):
    monkeypatch.setattr(e2e_bench, "_reset_peak_rss", lambda: False)  # macOS: getrusage's lifetime peak only
    memory = e2e_bench.PeakMemory(torch.device("cpu"))
    assert memory.kind == "rss_peak_growth" and memory.kind in e2e_bench.PEAK_MEMORY
    assert memory.peak_mb() >= 0


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a method ran before the inputs were checked")

    monkeypatch.setattr(e2e_bench.subprocess, "run", refuse)


def test_inputs_checked_before_any_method_runs(model_dir, text_file, tmp_path, no_subprocess):
    def refused(*extra):
        with pytest.raises(ValueError) as error:
            e2e_bench.run(bench_args(model_dir, text_file, *extra, "--output-dir", str(tmp_path / "b")))
        return str(error.value)

    assert refused() == "--method head_aware needs --classifications (a head_classifications.json)"
    assert refused("--method", "from_budget") == "--method from_budget needs --statistics (a head_statistics.json)"
    missing = str(tmp_path / "missing.json")
    assert refused("--compare-all", "--statistics", missing) == f"--statistics: {missing!r} is not a file"
    assert refused("--method", "streaming_llm", "--budget", "4").startswith("--budget: must exceed the 4")
    assert refused("--method", "l2_compress", "--budget", "40").startswith(
        "--budget: expected fewer kept tokens than the prompt's --max-tokens (40), got 40")
    classifications = tmp_path / "head_classifications.json"  # of a model with 3 layers; the tiny one has 2
    classifications.write_text(json.dumps({"classifications": [
        {"layer_idx": layer, "head_idx": head, "compression_strategy": "none"} for layer in range(3)
        for head in range(4)]}))
    assert refused("--classifications", str(classifications)) == (
        f"--classifications: {classifications}: model.num_layers: profile has 3, the model has 2")
    broken = tmp_path / "head_statistics.json"
    broken.write_text("{")
    assert refused("--method", "from_budget", "--statistics", str(broken)).startswith(
        f"--statistics: {broken}: not a JSON file")
    assert refused("--method", "full", "--max-tokens", "500").startswith("--max-tokens: the text has 400 tokens")
    short = tmp_path / "short.txt"
    short.write_text(" ".join(["the"] * 60))
    with pytest.warns(UserWarning, match="--num-samples: 2 prompts of 40 tokens .* holds only 1"):
        with pytest.raises(AssertionError, match="before the inputs were checked"):  # checked, then the run
            e2e_bench.run(build_parser().parse_args(
                ["bench", "--model", str(model_dir), "--text-file", str(short), "--method", "full",
                 "--num-samples", "2", "--max-tokens", "40", "--output-dir", str(tmp_path / "b")]))


def test_bench_command_names_the_missing_flag(model_dir, text_file, tmp_path, capsys, no_subprocess):
    assert main(["bench", "--model", str(model_dir), "--text-file", str(text_file), "--max-tokens", "40",
                 "--output-dir", str(tmp_path / "b")]) == 2
    assert "--method head_aware needs --classifications" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the output directory is made


def test_results_say_what_the_memory_figure_is(tmp_path):
    row = {"method": "full", "model": "m", "prompts": 1, "prompt_tokens": 8, "new_tokens": 2, "budget": None,
           "ttft_ms": 1.0, "tpot_ms": 1.0, "throughput_tok_s": 1.0, "peak_memory_mb": 3.0, "peak_memory": "rss_peak",
           "kv_bytes": 10, "backend": "torch", "date": "d", "machine": "m", "torch": "t", "transformers": "t",
           "headkv_engine": "h", "commit": "c", "tpot_speedup_vs_full": 1.0, "kv_fraction_of_full": 1.0}
    stale = tmp_path / ".bench_results.md.a1b2c3d4"  # the temporary of an interrupted earlier write
    stale.write_text("")
    e2e_bench._write([row], tmp_path)
    assert not stale.exists()
    md = (tmp_path / "bench_results.md").read_text()
    assert f"Peak memory: {e2e_bench.PEAK_MEMORY['rss_peak']}, in MiB" in md
