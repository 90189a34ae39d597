"""Train the built-in model: a small Pythia-architecture GPTNeoX on an offline English corpus.

    python bench/train_builtin.py corpus   --work /work/train_builtin      # texts from Debian packages
    python bench/train_builtin.py tokenizer --work /work/train_builtin     # byte-level BPE, vocab 8192
    python bench/train_builtin.py train    --work /work/train_builtin --minutes 90   # resumable
    python bench/train_builtin.py export   --work /work/train_builtin      # into headkv_engine/zoo/builtin/

The corpus comes from packages installed with apt (python3.11-doc reST sources, perl-doc pod files,
bible-kjv); every 20th document is held out. Training windows are BOS + 511 tokens, AdamW (lr 3e-3 with
warm-up and cosine decay, weight decay 0.1), batch 4 x 512, deterministic given --seed, checkpointed every
few minutes (atomic writes) so a later run continues where the last stopped. Every checkpoint logs the
held-out loss and the attention sink statistics (mass on key 0 per head).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import random
import re
import shutil
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHIP_DIR = os.path.join(HERE, "..", "headkv_engine", "zoo", "builtin")
SOURCES = {
    "python-docs": "/usr/share/doc/python3.11/html/_sources/**/*.txt",
    "perl-pod": "/usr/share/perl/*/pod/*.pod",
    "bible-kjv": None,  # printed by the `bible` program of bible-kjv, 100 verses a document
}
SEQ, BATCH, VOCAB = 512, 4, 8192
BOS = "<|bos|>"


def config():
    from transformers import GPTNeoXConfig  # noqa: PLC0415

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, hidden_dropout=0.0, attention_dropout=0.0,
    )
    cfg.rope_parameters["partial_rotary_factor"] = 0.25
    return cfg


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def kjv_documents(verses_per_document=100):
    import subprocess  # noqa: PLC0415

    if shutil.which("bible") is None:
        return []
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ ", "", line) for line in text.splitlines() if line.strip()]
    return [("bible-kjv", f"kjv/{i // verses_per_document:04d}", "\n".join(lines[i : i + verses_per_document]))
            for i in range(0, len(lines), verses_per_document)]


def cmd_corpus(args):
    docs = kjv_documents()
    for name, pattern in SOURCES.items():
        if pattern is None:
            continue
        for path in sorted(glob.glob(pattern, recursive=True)):
            if os.path.isfile(path):
                text = re.sub(r"\n{3,}", "\n\n", read_text(path)).strip()
                if len(text) > 200:
                    docs.append((name, os.path.relpath(path, "/usr/share"), text))
    if not docs:
        raise SystemExit("no corpus found: apt-get install python3.11-doc perl-doc bible-kjv")
    os.makedirs(args.work, exist_ok=True)
    train, held = [], []
    for i, doc in enumerate(docs):
        (held if i % 20 == 7 else train).append(doc)
    for split, items in (("train", train), ("heldout", held)):
        with open(os.path.join(args.work, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for name, path, text in items:
                f.write(json.dumps({"source": name, "path": path, "text": text}) + "\n")
    sizes = {s: sum(len(d[2]) for d in docs if d[0] == s) for s in SOURCES}
    print(f"{len(train)} train / {len(held)} held-out documents; characters per source: {sizes}")


def documents(work, split):
    with open(os.path.join(work, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def cmd_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(documents(args.work, "train"), trainer=trainer)
    tok.save(os.path.join(args.work, "tokenizer.json"))
    for split in ("train", "heldout"):
        ids = []
        for text in documents(args.work, split):
            ids.extend(tok.encode(text).ids + [1])
        torch.save(torch.tensor(ids, dtype=torch.int16 if VOCAB < 32768 else torch.int32),
                   os.path.join(args.work, f"{split}.pt"))
        print(f"{split}: {len(ids):,} tokens")


def batches(tokens, seed, step):
    """Deterministic batch `step`: BATCH windows of SEQ-1 tokens, each after a BOS."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - SEQ, (BATCH,), generator=gen)
    rows = torch.stack([tokens[s : s + SEQ - 1].long() for s in starts.tolist()])
    return torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), rows], dim=1)


@torch.no_grad()
def evaluate(model, tokens, windows=24):
    model.eval()
    losses = []
    for i in range(windows):
        start = i * (tokens.numel() - SEQ) // windows
        ids = torch.cat([torch.zeros(1, dtype=torch.long), tokens[start : start + SEQ - 1].long()])[None]
        losses.append(model(ids, labels=ids).loss.item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sink_stats(model, tokens):
    """Mean attention on key 0 (the BOS) per head, for queries at positions >= 12, over held-out windows."""
    model.eval()
    model.config._attn_implementation = "eager"
    mass = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads)
    windows = 4
    for i in range(windows):
        start = i * (tokens.numel() - 256) // windows
        ids = torch.cat([torch.zeros(1, dtype=torch.long), tokens[start : start + 255].long()])[None]
        out = model(ids, output_attentions=True)
        for layer, att in enumerate(out.attentions):
            mass[layer] += att[0, :, 12:, 0].mean(-1) / windows
    model.config._attn_implementation = "sdpa"
    model.train()
    return {"max": mass.max().item(), "mean": mass.mean().item(), "heads_above_0.3": int((mass > 0.3).sum())}


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def cmd_train(args):
    from transformers import GPTNeoXForCausalLM  # noqa: PLC0415

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    train_tokens = torch.load(os.path.join(args.work, "train.pt"))
    held_tokens = torch.load(os.path.join(args.work, "heldout.pt"))
    model = GPTNeoXForCausalLM(config())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    ckpt = os.path.join(args.work, "checkpoint.pt")
    step, log = 0, []
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}")
    model.train()
    deadline = time.time() + 60 * args.minutes
    last_save = time.time()
    began, tokens_done = time.time(), 0
    while step < args.steps and time.time() < deadline:
        lr = args.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batches(train_tokens, args.seed, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_done += ids.numel()
        if step % 50 == 0:
            rate = tokens_done / (time.time() - began)
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {rate:.0f} tok/s", flush=True)
        if time.time() - last_save > 60 * args.save_minutes or step >= args.steps or time.time() >= deadline:
            held = evaluate(model, held_tokens)
            sinks = sink_stats(model, held_tokens)
            log.append({"step": step, "tokens": step * BATCH * SEQ, "train_loss": loss.item(), "heldout_loss": held,
                        "heldout_ppl": math.exp(held), "sinks": sinks, "time": time.time()})
            print(f"checkpoint step {step}: held-out loss {held:.3f} (ppl {math.exp(held):.1f}), sinks {sinks}",
                  flush=True)
            save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log})
            last_save = time.time()


def cmd_export(args):
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import GPTNeoXForCausalLM  # noqa: PLC0415

    state = torch.load(os.path.join(args.work, "checkpoint.pt"), weights_only=False)
    model = GPTNeoXForCausalLM(config())
    model.load_state_dict(state["model"])
    os.makedirs(SHIP_DIR, exist_ok=True)
    model.config.to_json_file(os.path.join(SHIP_DIR, "config.json"))
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              os.path.join(SHIP_DIR, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(args.work, "tokenizer.json"), os.path.join(SHIP_DIR, "tokenizer.json"))
    held = documents(args.work, "heldout")
    text = "\n\n".join(held)[: args.heldout_chars]
    with open(os.path.join(SHIP_DIR, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    last = state["log"][-1]
    params = sum(p.numel() for p in model.parameters())
    card = f"""# headkv-engine built-in model

A Pythia-architecture GPTNeoX trained from scratch on this project's offline English corpus, shipped so that the
engine runs with no download and has real (trained) attention heads to analyse and compress.

| | |
|---|---|
| architecture | GPTNeoX, {model.config.num_hidden_layers} layers x {model.config.num_attention_heads} heads, hidden {model.config.hidden_size}, intermediate {model.config.intermediate_size}, partial rotary 0.25, parallel residual, {model.config.max_position_embeddings} positions |
| parameters | {params / 1e6:.1f} M (weights stored in fp16) |
| tokenizer | byte-level BPE, vocabulary {VOCAB}, BOS token id 0 at position 0 of every training window |
| corpus | python3.11-doc reST sources, perl-doc pod files, bible-kjv text (Debian packages); every 20th document held out |
| training | {last['step']} steps of {BATCH} x {SEQ} tokens = {last['tokens'] / 1e6:.1f} M tokens, AdamW lr 3e-3, weight decay 0.1 |
| final train loss | {last['train_loss']:.3f} |
| held-out loss / perplexity | {last['heldout_loss']:.3f} / {last['heldout_ppl']:.1f} (24 windows of {SEQ} tokens, BOS first) |
| attention on the first token (queries >= 12) | max over heads {last['sinks']['max']:.3f}, mean {last['sinks']['mean']:.3f}, heads above 0.3: {last['sinks']['heads_above_0.3']} of {model.config.num_hidden_layers * model.config.num_attention_heads} |

Attention sinks are known to need far more training tokens than this model saw (Gu et al., ICLR 2025): this
model has local / previous-token heads and broad heads, and few or no sink heads. Compression results on it
say nothing about sinks; they do measure windows and budgets on real positional and broad heads.

## Checkpoints

| step | tokens (M) | held-out loss | held-out PPL | max first-token mass | heads > 0.3 |
|---|---|---|---|---|---|
""" + "\n".join(f"| {e['step']} | {e['tokens'] / 1e6:.1f} | {e['heldout_loss']:.3f} | {e['heldout_ppl']:.1f} | "
                f"{e['sinks']['max']:.3f} | {e['sinks']['heads_above_0.3']} |" for e in state["log"]) + "\n"
    with open(os.path.join(SHIP_DIR, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(card)
    with open(os.path.join(SHIP_DIR, "training_log.json"), "w", encoding="utf-8") as f:
        json.dump(state["log"], f, indent=1)
    print(f"exported step {last['step']} to {os.path.abspath(SHIP_DIR)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["corpus", "tokenizer", "train", "export"])
    parser.add_argument("--work", default="/work/train_builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--save-minutes", type=float, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--heldout-chars", type=int, default=80_000)
    args = parser.parse_args()
    {"corpus": cmd_corpus, "tokenizer": cmd_tokenizer, "train": cmd_train, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    main()
