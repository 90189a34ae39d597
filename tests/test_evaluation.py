import math

import pytest
import torch
from reference_model import reference_logits, tiny_model
from test_model import HEAD_DIM, HEADS, LAYERS, mixed_profile

import headkv_engine as hk


@pytest.fixture(scope="module")
def model():
    return tiny_model(LAYERS, HEADS, HEAD_DIM)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(11))


def expected_metrics(model, profile, ids, mode="absolute"):
    logits = reference_logits(model, profile, ids, mode=mode)[:, :-1].float()
    targets = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    return math.exp(nll), accuracy


def test_one_pass_matches_the_masked_reference(model, ids):
    profile = mixed_profile()
    result = hk.evaluate(model, ids, profile, backend="torch")
    ppl, accuracy = expected_metrics(model, profile, ids)
    assert result.perplexity == pytest.approx(ppl, rel=1e-4)
    assert result.accuracy == pytest.approx(accuracy)
    assert result.tokens == 2 * 39
    assert result.effective_context == pytest.approx(profile.effective_context(40))
    assert "forward" not in vars(model.gpt_neox)  # evaluation unpatches the model


@pytest.mark.parametrize("position_mode", ["absolute", "shifted"])
def test_one_pass_equals_stepwise(model, ids, position_mode):
    profile = mixed_profile()
    one = hk.evaluate(model, ids, profile, backend="torch", position_mode=position_mode)
    chunked = hk.evaluate(model, ids, profile, backend="torch", position_mode=position_mode, chunk_size=7)
    step = hk.evaluate(model, ids, profile, mode="stepwise", backend="torch", position_mode=position_mode)
    assert one.perplexity == pytest.approx(step.perplexity, rel=1e-4)
    assert chunked.perplexity == pytest.approx(step.perplexity, rel=1e-4)
    assert one.accuracy == step.accuracy == chunked.accuracy


def test_full_profile_is_the_unpatched_model(model, ids):
    result = hk.evaluate(model, ids, backend="torch")
    logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert result.effective_context == 40


def test_compression_costs_perplexity(model, ids):
    full = hk.evaluate(model, ids, backend="torch")
    tight = hk.evaluate(model, ids, hk.Profile.window_only(LAYERS, HEADS, window_size=2), backend="torch")
    assert tight.perplexity != pytest.approx(full.perplexity, rel=1e-3)
    assert tight.effective_context == 2


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError, match="mode"):
        hk.evaluate(model, ids, mode="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        hk.evaluate(model, ids, chunk_size=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        hk.evaluate(model, [ids[0, :1]])


def test_bad_input_is_named():
    model = tiny_model(2, 4, 16)
    for bad, message in (([], "at least one sequence"), (torch.zeros(1, 0, dtype=torch.long), "at least 2 tokens"),
                         (torch.rand(1, 5), "integer token ids")):
        with pytest.raises(ValueError, match=message):
            hk.evaluate(model, bad)
    with pytest.raises(TypeError, match="GPTNeoXForCausalLM"):
        hk.evaluate(model.gpt_neox, torch.arange(5))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    assert hk.evaluate(model, ids.int()).nll == pytest.approx(hk.evaluate(model, ids).nll)  # int32 ids are fine


def test_unreadable_or_empty_text_file_is_named(model_dir, tmp_path):
    from headkv_engine import loading  # noqa: PLC0415

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--text-file: '.*latin1\.txt' is not UTF-8 text"):
        loading.load_text(str(latin1))
    for name, content in (("empty.txt", ""), ("blank.txt", " \n\n ")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=rf"--text-file: '.*{name}' holds no text"):
            loading.load_text(str(tmp_path / name))
    # a text of no tokens is not blamed on an offset the command may not have
    _, tokenizer, _ = loading.load_model(str(model_dir))
    with pytest.raises(ValueError, match="^the text gives no tokens$"):
        loading.encode(tokenizer, "", 8, builtin=False)
    with pytest.raises(ValueError, match="--offset: the text has only 2 tokens"):
        loading.encode(tokenizer, "the a", 8, builtin=False, offset=2)


def test_fewer_windows_than_asked_is_a_warning_naming_the_flags(model_dir, text_file):
    from headkv_engine import loading  # noqa: PLC0415

    _, tokenizer, _ = loading.load_model(str(model_dir))
    text = text_file.read_text()  # 400 tokens
    with pytest.warns(UserWarning, match=r"--windows: 10 windows of 100 tokens \(--max-tokens\) asked for from token "
                                         r"50 on, the text \(400 tokens\) holds only 3; using 3"):
        assert len(loading.encode_windows(tokenizer, text, 100, 10, builtin=False, offset=50)) == 3
    with pytest.warns(UserWarning, match="--eval-windows: 5 windows of 200 tokens \\(--eval-tokens\\) asked for, "):
        loading.encode_windows(tokenizer, text, 200, 5, builtin=False, flags=("--eval-tokens", "--eval-windows"))
    with pytest.raises(ValueError, match="--max-tokens=500: the text has 400 tokens, fewer than the 500 one window"):
        loading.encode_windows(tokenizer, text, 500, 1, builtin=False)
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all the windows asked for: no warning
        assert len(loading.encode_windows(tokenizer, text, 100, 4, builtin=False)) == 4


def test_output_file_checked_before_any_work(tmp_path):
    from headkv_engine import loading  # noqa: PLC0415

    loading.check_output_file(str(tmp_path / "new" / "deeper" / "layer_losses.json"), False)  # parents are made
    with pytest.raises(ValueError, match="--output: .* is a directory; give the file to write"):
        loading.check_output_file(str(tmp_path), True)
    existing = tmp_path / "layer_losses.json"
    existing.write_text("{}")
    with pytest.raises(ValueError, match="--output: .* exists; pass --force to overwrite it"):
        loading.check_output_file(str(existing), False)
    loading.check_output_file(str(existing), True)
    with pytest.raises(ValueError, match=r"--output: cannot write .*: '.*layer_losses\.json' is not a directory"):
        loading.check_output_file(str(existing / "sub" / "x.json"), True)
