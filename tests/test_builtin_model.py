"""The built-in model: loads with no network, generates text, and reproduces the numbers of its model card."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from headkv_engine import zoo

pytestmark = pytest.mark.skipif(not zoo.builtin_available(), reason="the built-in model files are not installed")


def metrics():
    with open(os.path.join(zoo.BUILTIN_DIR, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def card():
    with open(os.path.join(zoo.BUILTIN_DIR, "MODEL_CARD.md"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def builtin():
    return zoo.load_builtin_model()


@pytest.fixture(scope="module")
def heldout_ids(builtin):
    _, tokenizer = builtin
    return torch.tensor(tokenizer(zoo.heldout_text(), add_special_tokens=False)["input_ids"])


def consecutive_windows(ids, count, length):
    """BOS + (length - 1) tokens each, taken back to back from the start of `ids`."""
    body = length - 1
    rows = torch.stack([ids[i * body : (i + 1) * body] for i in range(count)])
    return torch.cat([torch.zeros(count, 1, dtype=torch.long), rows], dim=1)


def test_loads_offline_and_generates():
    """A fresh interpreter with HF_HUB_OFFLINE=1 and every socket connection refused."""
    script = textwrap.dedent(f"""
        import json
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network access during load_builtin_model")
        socket.socket.connect = socket.socket.connect_ex = refuse
        import torch
        import headkv_engine as hk
        from headkv_engine import zoo
        zoo.BUILTIN_DIR = {zoo.BUILTIN_DIR!r}
        model, tokenizer = hk.load_builtin_model()
        from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast
        assert isinstance(model, GPTNeoXForCausalLM) and not model.training
        assert isinstance(tokenizer, PreTrainedTokenizerFast)
        ids = zoo.encode(tokenizer, "And God said, Let there be")
        out = model.generate(ids[None], max_new_tokens=12, do_sample=False)
        print(json.dumps(tokenizer.decode(out[0, ids.numel():])))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    continuation = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(continuation.strip()) > 0


def test_architecture_and_weights(builtin):
    model, tokenizer = builtin
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == ("gpt_neox", 6, 8, 256)
    assert cfg.use_parallel_residual and cfg.max_position_embeddings == 2048
    assert model.gpt_neox.layers[0].attention.rotary_ndims == cfg.hidden_size // cfg.num_attention_heads // 4
    assert tokenizer.convert_tokens_to_ids(zoo.BOS_TOKEN) == 0 and len(tokenizer) == cfg.vocab_size
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(os.path.join(zoo.BUILTIN_DIR, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in list(f.keys())} == {"F16"}
    assert os.path.getsize(os.path.join(zoo.BUILTIN_DIR, "model.safetensors")) < 25 * 2**20
    assert 50_000 <= len(zoo.heldout_text()) <= 100_000


def test_heldout_perplexity_matches_card(builtin, heldout_ids):
    model, _ = builtin
    stated = metrics()["heldout_txt"]
    ids = consecutive_windows(heldout_ids, stated["windows"], stated["window_tokens"])
    with torch.no_grad():
        loss = sum(model(row[None], labels=row[None]).loss.item() for row in ids) / len(ids)
    assert loss == pytest.approx(stated["loss"], abs=2e-3)
    assert f"{stated['ppl']:.2f}" in card() and f"{stated['loss']:.4f}" in card()
    assert math.exp(loss) < 0.1 * model.config.vocab_size  # far from a uniform guess: a trained model


def test_head_statistics_match_card(builtin, heldout_ids):
    """First-token (sink) mass and mass on the last 8 keys per head, from the eager attention probabilities."""
    model, _ = builtin
    stated = metrics()["heldout_txt"]
    ids = consecutive_windows(heldout_ids, stated["sink_windows"], stated["sink_window_tokens"])
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads)
    first, local = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    q0 = stated["sink_from"]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for row in ids:
                for layer, a in enumerate(model(row[None], output_attentions=True).attentions):
                    p = a[0].double()
                    first[layer] += p[:, q0:, 0].mean(-1) / len(ids)
                    recent = [p[:, q, q - 7 : q + 1].sum(-1) for q in range(q0, row.numel())]
                    local[layer] += torch.stack(recent, -1).mean(-1) / len(ids)
    finally:
        model.set_attn_implementation(previous)
    torch.testing.assert_close(first, torch.tensor(stated["sink_mass"], dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(local, torch.tensor(stated["local_mass"], dtype=torch.float64), atol=2e-3, rtol=0)
    text = card()
    for row in stated["sink_mass"] + stated["local_mass"]:
        assert " | ".join(f"{v:.3f}" for v in row) in text
    assert f"heads above 0.3: {stated['heads_above_0.3']} of" in text
