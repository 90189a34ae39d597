"""Train the built-in model: a small Pythia-architecture GPTNeoX on an offline English corpus.

    python bench/train_builtin.py corpus    --work /work/train_builtin     # texts from Debian packages
    python bench/train_builtin.py tokenizer --work /work/train_builtin     # byte-level BPE, vocab 8192
    python bench/train_builtin.py train     --work /work/train_builtin --steps 6000 --minutes 600    # resumable
    python bench/train_builtin.py stats     --work /work/train_builtin     # the checkpoint log as a table
    python bench/train_builtin.py export    --work /work/train_builtin     # into headkv_engine/zoo/builtin/

The corpus comes from packages installed with apt (`apt-get install python3.11-doc perl-doc bible-kjv`):
python3.11-doc reST sources, perl-doc pod files and the King James Bible; every 20th document is held out
(the tokenizer is trained on the rest). perl-doc's pods are listed twice (under /usr/share/perl/5.36.0 and its 5.36
symlink), so held-out pods have a copy in training: every held-out measurement uses only the held-out documents
with no copy in training (`clean_heldout`). Training windows are BOS + 511 tokens (position 0 is always the BOS),
batch 4 x 512, AdamW (lr 3e-3, betas 0.9 / 0.95, weight decay 0.1 on matrices), 300 warm-up steps and a cosine
decay to 0.1 x lr at --steps, bf16 autocast. Batch `i` is a function of (--seed, i) only, so a run is
deterministic given the seed, and a resumed run continues exactly as an uninterrupted one would: `train` saves
the checkpoint (--checkpoint, default <work>/checkpoint.pt; atomic writes) every --save-minutes, at the end of
its --minutes and at --steps, and the same command resumes it. Beside the checkpoint it keeps a weights-only
model-stepNNNNNN.pt of every save, for `stats` and `export --checkpoint`. Once a schedule is finished,
`train --restart --steps N` continues with a new warm-up and cosine segment up to step N (peak --lr). Every save
logs the held-out loss and the first-token (sink) mass of each head.

The shipped model can be trained further on a machine without its checkpoints: build the corpus, tokenize it with
the shipped tokenizer, and start a segment from the exported weights (the optimizer starts afresh):

    python bench/train_builtin.py tokenizer --tokenizer-file headkv_engine/zoo/builtin/tokenizer.json
    python bench/train_builtin.py train --init-from headkv_engine/zoo/builtin --steps N --lr 1e-3

`export` writes fp16 safetensors, config, tokenizer, a held-out text (clean held-out documents), metrics.json
and MODEL_CARD.md generated from measurements: of the exported fp16 weights on that text, and of every kept
snapshot up to the exported step on the clean held-out documents (the card's checkpoint table).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHIP_DIR = os.path.normpath(os.path.join(HERE, "..", "headkv_engine", "zoo", "builtin"))
SOURCES = {  # name: (Debian package, description, files)
    "python-docs": ("python3.11-doc", "python3.11-doc reST sources",
                    "/usr/share/doc/python3.11/html/_sources/**/*.txt"),
    "perl-pod": ("perl-doc", "perl-doc pod files", "/usr/share/perl/*/pod/*.pod"),
    "bible-kjv": ("bible-kjv", "bible-kjv King James Bible", None),  # from the `bible` program, 100 verses a document
}
SEQ, BATCH, VOCAB = 512, 4, 8192
BOS, EOS = "<|bos|>", "<|endoftext|>"  # ids 0 and 1
PEAK_LR, WARMUP, MIN_LR_FRACTION, WEIGHT_DECAY = 3e-3, 300, 0.1, 0.1
SINK_FROM = 12  # head statistics are averaged over queries at positions >= SINK_FROM
LOCAL_KEYS, BROAD_ENTROPY = 8, 3.0  # a local head: > 0.5 of its mass on the last 8 keys; broad: entropy > 3 nats
SHIP_PPL_WINDOWS, SHIP_SINK_WINDOWS, SINK_LENGTH = 4, 4, 256


def config():
    from transformers import GPTNeoXConfig  # noqa: PLC0415

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, hidden_dropout=0.0, attention_dropout=0.0,
    )
    cfg.rope_parameters["partial_rotary_factor"] = 0.25
    return cfg


# ----------------------------------------------------------------------------- corpus and tokenizer

def kjv_documents(verses_per_document=100):
    if shutil.which("bible") is None:
        return []
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ ", "", line) for line in text.splitlines() if line.strip()]
    return [("bible-kjv", f"kjv/{i // verses_per_document:04d}", "\n".join(lines[i : i + verses_per_document]))
            for i in range(0, len(lines), verses_per_document)]


def cmd_corpus(args):
    docs = kjv_documents()
    for name, (_, _, pattern) in SOURCES.items():
        for path in sorted(glob.glob(pattern, recursive=True)) if pattern else []:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = re.sub(r"\n{3,}", "\n\n", f.read()).strip()
            if len(text) > 200:
                docs.append((name, os.path.relpath(path, "/usr/share"), text))
    if not docs:
        raise SystemExit("no corpus found: apt-get install " + " ".join(p for p, _, _ in SOURCES.values()))
    os.makedirs(args.work, exist_ok=True)
    splits = {"train": [], "heldout": []}
    for i, doc in enumerate(docs):
        splits["heldout" if i % 20 == 7 else "train"].append(doc)
    for split, items in splits.items():
        with open(os.path.join(args.work, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for name, path, text in items:
                f.write(json.dumps({"source": name, "path": path, "text": text}) + "\n")
    print(f"{len(splits['train'])} train / {len(splits['heldout'])} held-out documents")


def documents(work, split):
    with open(os.path.join(work, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def clean_heldout(work):
    """Held-out documents with no identical copy in the training split. perl-doc installs its pods under
    /usr/share/perl/5.36.0 and a 5.36 symlink to it; the corpus lists both, so each held-out pod also sits in the
    training split (and each pod counts twice in training). Held-out measurements use only these documents."""
    seen = {d["text"] for d in documents(work, "train")}
    return [d for d in documents(work, "heldout") if d["text"] not in seen]


def heldout_tokens(work):
    """The clean held-out documents as one token stream, EOS (id 1) after each, as train.pt is built."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(os.path.join(work, "tokenizer.json"))
    ids = []
    for doc in clean_heldout(work):
        ids.extend(tok.encode(doc["text"]).ids + [1])
    return torch.tensor(ids)


def cmd_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    if args.tokenizer_file:  # continuing an exported model: its own tokenizer, not a new one
        tok = Tokenizer.from_file(args.tokenizer_file)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS], min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((d["text"] for d in documents(args.work, "train")), trainer=trainer)
    tok.save(os.path.join(args.work, "tokenizer.json"))
    for split in ("train", "heldout"):
        ids = []
        for doc in documents(args.work, split):
            ids.extend(tok.encode(doc["text"]).ids + [1])
        torch.save(torch.tensor(ids, dtype=torch.int16), os.path.join(args.work, f"{split}.pt"))
        print(f"{split}: {len(ids):,} tokens")


# ----------------------------------------------------------------------------- measurements

def windows(tokens, count, length, spread):
    """[count, length] windows of BOS + (length - 1) tokens: evenly spread over `tokens` or consecutive from 0."""
    body = length - 1
    if spread:
        starts = [i * (tokens.numel() - length) // count for i in range(count)]
    else:
        starts = [i * body for i in range(count)]
        if starts[-1] + body > tokens.numel():
            raise ValueError(f"{count} windows of {length} need {count * body} tokens, the text has {tokens.numel()}")
    rows = torch.stack([tokens[s : s + body].long() for s in starts])
    return torch.cat([torch.zeros(count, 1, dtype=torch.long), rows], dim=1)


@torch.no_grad()
def mean_loss(model, ids):
    """Mean next-token loss over the windows `ids` [N, T] (each window one forward, equal weight)."""
    return sum(model(row[None], labels=row[None]).loss.item() for row in ids) / len(ids)


@torch.no_grad()
def attention_stats(model, ids):
    """Per head [layers, heads], mean over windows `ids` [N, T] and over queries at positions >= SINK_FROM, from
    the eager attention probabilities: `first`, the mass on key 0 (the BOS: the sink ratio); `local`, the mass on
    the LOCAL_KEYS most recent keys (the query's own included); `entropy`, in nats."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads)
    stats = {name: torch.zeros(shape, dtype=torch.float64) for name in ("first", "local", "entropy")}
    try:
        for row in ids:
            attentions = model(row[None], output_attentions=True).attentions
            q = torch.arange(SINK_FROM, row.numel())[:, None]
            distance = q - torch.arange(row.numel())[None, :]
            band = ((distance >= 0) & (distance < LOCAL_KEYS)).double()
            for layer, a in enumerate(attentions):
                p = a[0, :, SINK_FROM:, :].double()
                stats["first"][layer] += p[..., 0].mean(-1) / len(ids)
                stats["local"][layer] += (p * band).sum(-1).mean(-1) / len(ids)
                stats["entropy"][layer] += -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1) / len(ids)
    finally:
        model.set_attn_implementation(previous)
    return stats


def measurement_windows(held):
    """Held-out loss on 24 windows of SEQ, head statistics on 4 windows of SINK_LENGTH, spread over `held`."""
    return windows(held, 24, SEQ, spread=True), windows(held, 4, SINK_LENGTH, spread=True)


def measure(model, held_ids, sink_ids):
    loss = mean_loss(model, held_ids)
    stats = attention_stats(model, sink_ids)
    return {"heldout_loss": loss, "heldout_ppl": math.exp(loss), "sinks": sink_summary(stats["first"]),
            "sink_mass": [[round(v, 4) for v in row] for row in stats["first"].tolist()], "heads": head_counts(stats)}


def head_counts(stats):
    return {"local": int((stats["local"] > 0.5).sum()), "broad": int((stats["entropy"] > BROAD_ENTROPY).sum())}


def sink_summary(mass):
    return {"max": mass.max().item(), "mean": mass.mean().item(), "heads_above_0.3": int((mass > 0.3).sum())}


# ----------------------------------------------------------------------------- training

def batch(tokens, seed, step):
    """Training batch `step`: BATCH windows of BOS + SEQ-1 tokens at starts drawn from (seed, step) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - SEQ, (BATCH,), generator=gen)
    rows = torch.stack([tokens[s : s + SEQ - 1].long() for s in starts.tolist()])
    return torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), rows], dim=1)


def learning_rate(step, peak, start, end):
    """Linear warm-up from `start`, then cosine decay to MIN_LR_FRACTION x peak at `end`."""
    t = step - start
    progress = min(1.0, t / max(1, end - start))
    cosine = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * min(1.0, (t + 1) / WARMUP) * cosine


def save_atomic(path, state):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def init_from_export(directory, model, train_tokens, steps, lr):
    """Start a new schedule segment from an exported model (its fp16 weights; the optimizer starts afresh, which
    the segment's warm-up absorbs), carrying its step, log, training time and measured history."""
    from safetensors.torch import load_file  # noqa: PLC0415

    with open(os.path.join(directory, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    if train_tokens.numel() != metrics["train_tokens"]:
        raise SystemExit(f"--init-from {directory}: it was trained on {metrics['train_tokens']:,} tokens, this "
                         f"corpus has {train_tokens.numel():,}; build the corpus and pass "
                         "`tokenizer --tokenizer-file` its tokenizer.json")
    step = metrics["step"]
    if steps <= step:
        raise SystemExit(f"--steps: expected more than the exported model's {step} steps, got {steps}")
    model.load_state_dict({k: v.float() for k, v in load_file(os.path.join(directory, "model.safetensors")).items()})
    schedule = {"start": step, "end": steps, "lr": lr}
    return step, metrics["log"], schedule, 3600 * metrics["training_hours"], metrics["history"]


def cmd_train(args):
    from transformers import GPTNeoXForCausalLM  # noqa: PLC0415

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_tokens = torch.load(os.path.join(args.work, "train.pt"))
    held_ids, sink_ids = measurement_windows(heldout_tokens(args.work))
    model = GPTNeoXForCausalLM(config())
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                             {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    ckpt = args.checkpoint or os.path.join(args.work, "checkpoint.pt")
    os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
    step, log, schedule, elapsed, prior = 0, [], {"start": 0, "end": args.steps, "lr": args.lr}, 0.0, []
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        schedule = state.get("schedule", schedule)
        elapsed = state.get("elapsed_s") or estimated_seconds(log)  # checkpoints of early versions lack it
        prior = state.get("prior_history", [])
        if args.restart:
            schedule = {"start": step, "end": args.steps, "lr": args.lr}
        print(f"resumed at step {step}, schedule {schedule}", flush=True)
    elif args.init_from:
        step, log, schedule, elapsed, prior = init_from_export(args.init_from, model, train_tokens, args.steps,
                                                               args.lr)
        print(f"initialised from {args.init_from} at step {step}, schedule {schedule}", flush=True)
    if step >= schedule["end"]:
        raise SystemExit(f"the schedule ended at step {schedule['end']}: pass --restart --steps N (N > {step}) "
                         "to continue with a new warm-up and cosine segment")
    stop = min(schedule["end"], args.until or schedule["end"])
    model.train()
    began = last_save = time.time()
    deadline = began + 60 * args.minutes
    tokens_done = 0
    while step < stop and time.time() < deadline:
        # a segment keeps the peak it started with (schedules of early checkpoints lack it: --lr)
        lr = learning_rate(step, schedule.get("lr", args.lr), schedule["start"], schedule["end"])
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batch(train_tokens, args.seed, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_done += ids.numel()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {tokens_done / (time.time() - began):.0f} tok/s",
                  flush=True)
        if time.time() - last_save > 60 * args.save_minutes or step >= stop or time.time() >= deadline:
            model.eval()
            entry = measure(model, held_ids, sink_ids)
            model.train()
            now = time.time()
            log.append({"step": step, "tokens": step * BATCH * SEQ, "train_loss": loss.item(), **entry,
                        "tokens_per_s": tokens_done / (now - began), "time": now})
            print(f"checkpoint step {step}: held-out loss {entry['heldout_loss']:.3f} "
                  f"(ppl {entry['heldout_ppl']:.1f}), sinks {entry['sinks']}, heads {entry['heads']}", flush=True)
            snapshot = {"model": model.state_dict(), "step": step, "log": log, "schedule": schedule,
                        "seed": args.seed, "elapsed_s": elapsed + now - began, "prior_history": prior}
            save_atomic(ckpt, {**snapshot, "opt": opt.state_dict()})
            save_atomic(os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"model-step{step:06d}.pt"), snapshot)
            last_save = now
            if args.patience and flattened(log, args.patience):
                print(f"held-out loss flat over the last {args.patience} checkpoints: stopping", flush=True)
                break


def flattened(log, patience, min_gain=0.005):
    losses = [e["heldout_loss"] for e in log]
    return len(losses) > patience and min(losses[:-patience]) - min(losses[-patience:]) < min_gain


def cmd_stats(args):
    state = torch.load(args.checkpoint or os.path.join(args.work, "checkpoint.pt"), weights_only=False,
                       map_location="cpu")
    print(f"step {state['step']}, schedule {state.get('schedule')}")
    print(history_table(state["log"]))


def history_table(log):
    rows = [("| step | tokens (M) | train loss | held-out loss | held-out PPL | max first-token mass | mean | "
             "heads > 0.3 | local / broad heads |"), "|---|---|---|---|---|---|---|---|---|"]
    for e in log:
        heads = f"{e['heads']['local']} / {e['heads']['broad']}" if "heads" in e else "-"
        rows.append(f"| {e['step']} | {e['tokens'] / 1e6:.2f} | {e['train_loss']:.3f} | {e['heldout_loss']:.3f} | "
                    f"{e['heldout_ppl']:.1f} | {e['sinks']['max']:.3f} | {e['sinks']['mean']:.3f} | "
                    f"{e['sinks']['heads_above_0.3']} | {heads} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- export

def heldout_sample(docs, chars, chunk=8000):
    """Held-out text to ship: chunks of up to `chunk` characters (cut at a paragraph break) taken in turn from
    each source's held-out documents, in corpus order, until `chars` characters."""
    queues = {name: [d["text"] for d in docs if d["source"] == name] for name in SOURCES}
    parts, total = [], 0
    while total < chars and any(queues.values()):
        for name in SOURCES:
            if queues[name] and total < chars:
                text = queues[name].pop(0)
                cut = text.rfind("\n\n", 0, chunk)
                piece = text[: cut if len(text) > chunk and cut > chunk // 2 else chunk].strip()
                parts.append(piece)
                total += len(piece) + 2
    return "\n\n".join(parts)[:chars]


def snapshots(checkpoint, last_step):
    """The weights-only snapshots kept beside `checkpoint`, up to `last_step`: [(step, path)]."""
    found = []
    for path in glob.glob(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model-step*.pt")):
        step = int(re.search(r"model-step(\d+)\.pt$", path).group(1))
        if step <= last_step:
            found.append((step, path))
    return sorted(found)


def cmd_export(args):
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or os.path.join(args.work, "checkpoint.pt")
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model = GPTNeoXForCausalLM(config()).eval()
    train_docs, held_docs, clean = documents(args.work, "train"), documents(args.work, "heldout"), \
        clean_heldout(args.work)
    held_ids, sink_ids = measurement_windows(heldout_tokens(args.work))

    # every kept snapshot up to this one, measured again on the clean held-out documents; a run continued from
    # an exported model (train --init-from) carries that model's measured history for the steps before it
    kept = snapshots(checkpoint, state["step"] - 1) + [(state["step"], None)]
    history = [entry for entry in state.get("prior_history", []) if entry["step"] < kept[0][0]]
    for step, path in kept:
        snap = state if path is None else torch.load(path, weights_only=False, map_location="cpu")
        model.load_state_dict(snap["model"])
        history.append({"step": step, "tokens": step * BATCH * SEQ, "train_loss": snap["log"][-1]["train_loss"],
                        **measure(model, held_ids, sink_ids)})
        print(f"step {step}: held-out loss {history[-1]['heldout_loss']:.3f}, sinks {history[-1]['sinks']}",
              flush=True)

    model.load_state_dict(state["model"])
    model.config.to_json_file(os.path.join(out, "config.json"))
    weights = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)
    shutil.copy(os.path.join(args.work, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    text = heldout_sample(clean, args.heldout_chars)
    with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(text)

    # measured on the shipped (fp16-rounded) weights, computed in fp32 as load_builtin_model() loads them
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    ship_loss = mean_loss(model, windows(ids, SHIP_PPL_WINDOWS, SEQ, spread=False))
    stats = attention_stats(model, windows(ids, SHIP_SINK_WINDOWS, SINK_LENGTH, spread=False))
    mass = stats["first"]

    def census(docs):
        return {name: {"documents": sum(d["source"] == name for d in docs),
                       "characters": sum(len(d["text"]) for d in docs if d["source"] == name)} for name in SOURCES}

    metrics = {
        "step": state["step"], **history[-1],
        "train_tokens": torch.load(os.path.join(args.work, "train.pt")).numel(),
        "heldout_tokens": heldout_tokens(args.work).numel(),
        "corpus": {"train": census(train_docs), "heldout": census(held_docs), "heldout_clean": census(clean),
                   "train_duplicates": len(train_docs) - len({d["text"] for d in train_docs})},
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_hours": state.get("elapsed_s", estimated_seconds(state["log"])) / 3600,
        "schedule": state.get("schedule", {"start": 0, "end": args.steps}), "seed": state.get("seed", 0),
        "heldout_txt": {"windows": SHIP_PPL_WINDOWS, "window_tokens": SEQ, "loss": ship_loss,
                        "ppl": math.exp(ship_loss), "sink_windows": SHIP_SINK_WINDOWS,
                        "sink_window_tokens": SINK_LENGTH, "sink_from": SINK_FROM,
                        "sink_mass": [[round(v, 4) for v in row] for row in mass.tolist()], **sink_summary(mass),
                        "local_mass": [[round(v, 4) for v in row] for row in stats["local"].tolist()],
                        "entropy": [[round(v, 3) for v in row] for row in stats["entropy"].tolist()],
                        "heads": head_counts(stats)},
        "history": history,
        "log": state["log"],
    }
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(model_card(metrics, model.config))
    print(f"exported step {state['step']} to {out}: heldout.txt PPL {math.exp(ship_loss):.2f}, "
          f"max first-token mass {mass.max().item():.3f}")


def estimated_seconds(log):
    """Training time of a checkpoint that did not record it: the log's time span, extrapolated to step 0."""
    first, last = log[0], log[-1]
    return (last["time"] - first["time"]) * last["step"] / max(1, last["step"] - first["step"])


def head_table(matrix, digits):
    heads = len(matrix[0])
    rows = ["| layer | " + " | ".join(f"head {i}" for i in range(heads)) + " |", "|---|" + "---|" * heads]
    rows += [f"| {layer} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for layer, row in enumerate(matrix)]
    return "\n".join(rows)


def sink_note(m, n_heads):
    """What the card says of attention sinks: that they are absent, or how they formed over the checkpoints."""
    history = m["history"]
    formed = [e for e in history if e["sinks"]["heads_above_0.3"]]
    if not formed:
        return ("Attention sinks are known to need far more training tokens than this model saw\n"
                "(Gu et al., \"When Attention Sink Emerges in Language Models\", ICLR 2025).\n"
                "Compression results on it measure windows and budgets on its local and broad heads; they say "
                "nothing about sinks.")
    first, last = formed[0], history[-1]
    return (f"Sinks began to form late in training (the checkpoint table below): the largest first-token mass "
            f"rose from {history[0]['sinks']['max']:.2f} at step {history[0]['step']} to "
            f"{last['sinks']['max']:.2f} at step {last['step']}; a first head passed 0.3 at step {first['step']} "
            f"({first['tokens'] / 1e6:.1f} M tokens) and {last['sinks']['heads_above_0.3']} of {n_heads} are above "
            "it at the last step (Pythia has most of its heads there).")


def model_card(m, cfg):
    h, n_heads = m["heldout_txt"], cfg.num_hidden_layers * cfg.num_attention_heads
    corpus = "; ".join(f"{SOURCES[name][1]}: {c['documents']} documents, {c['characters'] / 1e6:.1f} M characters"
                       for name, c in m["corpus"]["train"].items())
    held = sum(c["documents"] for c in m["corpus"]["heldout"].values())
    clean = " and ".join(f"{c['documents']} {SOURCES[name][0]}" for name, c in m["corpus"]["heldout_clean"].items()
                         if c["documents"])
    left_out = held - sum(c["documents"] for c in m["corpus"]["heldout_clean"].values())
    sinks = ("no attention sinks: no head puts more than 0.3 of its attention on the first token"
             if h["heads_above_0.3"] == 0 else
             f"{h['heads_above_0.3']} of {n_heads} heads putting more than 0.3 of their attention on the first token")
    segment_lr = m["schedule"].get("lr", PEAK_LR)
    restart = (f" (a segment from step {m['schedule']['start']}, peak lr {segment_lr:g})" if m["schedule"]["start"]
               else "")
    return (
        f"""# headkv-engine built-in model

A Pythia-architecture GPTNeoX trained from scratch on an offline English corpus, shipped inside the package so
that the engine runs with no download and has trained attention heads to analyse and compress.
`hk.load_builtin_model()` returns (model, tokenizer); `heldout.txt` is text of the same corpus it never saw.
Every number below is measured by `bench/train_builtin.py export` from the checkpoint it exported.

| | |
|---|---|
"""
        f"| architecture | GPTNeoX, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, "
        f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, partial rotary 0.25, parallel residual, "
        f"{cfg.max_position_embeddings} positions |\n"
        f"| parameters | {m['parameters'] / 1e6:.2f} M, stored in fp16 |\n"
        f"| tokenizer | byte-level BPE, vocabulary {VOCAB}; `{BOS}` (id 0) at position 0 of every window, "
        f"`{EOS}` (id 1) between documents |\n"
        f"| corpus | Debian packages: {corpus}; every 20th document held out ({held} documents) |\n"
        f"| duplicates | perl-doc installs its pods under /usr/share/perl/5.36.0 and a 5.36 symlink to it, "
        f"and the corpus lists both: {m['corpus']['train_duplicates']} training documents appear twice, "
        f"and {left_out} held-out documents have a copy in training. "
        f"Every held-out number here uses only the other {held - left_out} ({clean} documents), "
        f"heldout.txt included |\n"
        f"| corpus tokens | {m['train_tokens'] / 1e6:.2f} M train, {m['heldout_tokens'] / 1e6:.2f} M clean held out |\n"
        f"| training | {m['step']} steps of {BATCH} x {SEQ} tokens = {m['tokens'] / 1e6:.1f} M tokens "
        f"({m['tokens'] / m['train_tokens']:.2f} epochs), {m['training_hours']:.1f} h on CPU; "
        f"AdamW lr 3e-3, betas 0.9 / 0.95, weight decay {WEIGHT_DECAY}, {WARMUP} warm-up steps "
        f"and cosine decay to 0.1 x lr at step {m['schedule']['end']}{restart}, bf16 autocast, seed {m['seed']} |\n"
        f"| train loss (last batch) | {m['train_loss']:.3f} |\n"
        f"| held-out loss / PPL | {m['heldout_loss']:.3f} / {m['heldout_ppl']:.1f} "
        f"(24 windows of {SEQ} spread over the clean held-out documents, BOS first) |\n"
        f"| heldout.txt loss / PPL | {h['loss']:.4f} / {h['ppl']:.2f} "
        f"(first {h['windows']} consecutive windows of {h['window_tokens']} tokens, "
        f"BOS + {h['window_tokens'] - 1}, fp16 weights computed in fp32) |\n"
        f"| first-token (sink) mass | max over heads {h['max']:.3f}, mean {h['mean']:.3f}, "
        f"heads above 0.3: {h['heads_above_0.3']} of {n_heads} |\n"
        f"| local heads | {h['heads']['local']} of {n_heads} put more than 0.5 of their attention "
        f"on the last {LOCAL_KEYS} keys |\n"
        f"""| broad heads | {h['heads']['broad']} of {n_heads} have attention entropy above {BROAD_ENTROPY:g} nats |

"""
        f"Head statistics are means over queries at positions >= {h['sink_from']} "
        f"on the first {h['sink_windows']} windows of {h['sink_window_tokens']} tokens of heldout.txt "
        f"(BOS + {h['sink_window_tokens'] - 1}).\n"
        f"""The first-token mass of a head is its attention probability on key 0, the BOS.

This model has {sinks}.
{sink_note(m, n_heads)}

## First-token mass per head

{head_table(h['sink_mass'], 3)}

## Mass on the last {LOCAL_KEYS} keys per head

{head_table(h['local_mass'], 3)}

## Attention entropy per head (nats)

{head_table(h['entropy'], 2)}

## Checkpoints

"""
        f"Each kept checkpoint up to this one, measured as above: held-out loss on 24 windows of {SEQ} tokens "
        f"spread over the clean held-out documents, head statistics on 4 windows of {SINK_LENGTH} tokens of them.\n"
        f"""
{history_table(m['history'])}
"""
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["corpus", "tokenizer", "train", "stats", "export"])
    parser.add_argument("--work", default="/work/train_builtin", help="corpus, tokens, checkpoint, log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000, help="end of the cosine schedule")
    parser.add_argument("--restart", action="store_true", help="start a new schedule segment at the checkpoint")
    parser.add_argument("--until", type=int, default=0, help="stop this run at this step (schedule unchanged)")
    parser.add_argument("--minutes", type=float, default=60, help="stop this run after this long")
    parser.add_argument("--save-minutes", type=float, default=10)
    parser.add_argument("--patience", type=int, default=0, help="stop when held-out loss is flat this many saves")
    parser.add_argument("--lr", type=float, default=PEAK_LR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpoint", help="checkpoint file (default <work>/checkpoint.pt); train also keeps a "
                        "weights-only model-stepNNNNNN.pt beside it at every save, which stats / export accept")
    parser.add_argument("--init-from", help="train: with no checkpoint yet, start a new segment from this exported "
                        "model directory (e.g. headkv_engine/zoo/builtin) instead of random weights")
    parser.add_argument("--tokenizer-file", help="tokenizer: tokenize with this tokenizer.json instead of training one")
    parser.add_argument("--out", default=SHIP_DIR, help="export: output directory")
    parser.add_argument("--heldout-chars", type=int, default=80_000)
    args = parser.parse_args()
    commands = {"corpus": cmd_corpus, "tokenizer": cmd_tokenizer, "train": cmd_train, "stats": cmd_stats,
                "export": cmd_export}
    commands[args.command](args)


if __name__ == "__main__":
    main()
