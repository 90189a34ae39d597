import os
import sys

import pytest
import torch

# Triton kernels run on CPU under the interpreter; the switch must be set before triton is first imported
# (transformers may import it while the test modules load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Metal kernels run CPU tensors through the C++ emulator of headkv_engine.metal_emulator (the model tests on CPU);
# on a Mac, MPS tensors still run on the GPU.
os.environ.setdefault("HEADKV_METAL_EMULATE", "1")

# tests/ holds shared helpers (reference_model.py) imported by the test modules.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=["native", "baseline"])
def isa(request, monkeypatch):
    """Which build of the C++ kernels runs: the one the CPU picks (AVX2 where it has it) or the baseline ISA."""
    if request.param == "baseline":
        monkeypatch.setenv("HEADKV_CPU_BASELINE", "1")
    else:
        monkeypatch.delenv("HEADKV_CPU_BASELINE", raising=False)
    return request.param


# --- a tiny GPTNeoX saved with a word-level tokenizer, and a text of its words (the command-line tests) -----

WORDS = "the a head attends to first last token sink window cache of and is in on".split()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from reference_model import tiny_model  # noqa: PLC0415
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    path = tmp_path_factory.mktemp("tiny-gpt-neox")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    tiny_model(2, 4, 16, vocab=97).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (400,), generator=gen).tolist()]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(words))
    return path
