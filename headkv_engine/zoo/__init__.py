"""The built-in model: a small GPTNeoX trained by this project (see builtin/MODEL_CARD.md), loaded offline."""

from __future__ import annotations

import os

import torch

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")
BOS_TOKEN, EOS_TOKEN = "<|bos|>", "<|endoftext|>"
# The built-in model's calibration for `Profile.from_budget(..., layer_losses=...)`: each layer's loss increase at
# 4 sinks + each window, measured on training documents (bench/loss_priced_budget.py --training-corpus).
LAYER_LOSSES = os.path.join(BUILTIN_DIR, "layer_losses.json")


def builtin_available() -> bool:
    return all(
        os.path.exists(os.path.join(BUILTIN_DIR, f)) for f in ("config.json", "model.safetensors", "tokenizer.json")
    )


def load_builtin_model(dtype=torch.float32):
    """(GPTNeoXForCausalLM in eval mode, PreTrainedTokenizerFast) of the built-in model, with no network."""
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast  # noqa: PLC0415

    if not builtin_available():
        raise FileNotFoundError(f"the built-in model is missing from {BUILTIN_DIR} (config.json, model.safetensors, "
                                "tokenizer.json); reinstall headkv-engine")
    model = GPTNeoXForCausalLM.from_pretrained(BUILTIN_DIR, dtype=dtype, local_files_only=True).eval()
    model.config._name_or_path = "headkv-builtin"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(BUILTIN_DIR, "tokenizer.json"),
                                        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    return model, tokenizer


def heldout_text() -> str:
    """Held-out text of the built-in model's corpus (never trained on)."""
    with open(os.path.join(BUILTIN_DIR, "heldout.txt"), encoding="utf-8") as f:
        return f.read()


def encode(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids with the BOS first, as the built-in model was trained: LongTensor [T]."""
    ids = [tokenizer.convert_tokens_to_ids(BOS_TOKEN)] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:max_tokens] if max_tokens else ids)
