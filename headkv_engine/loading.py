"""Models and texts for the command line: a hub id, a local directory or the built-in model; a text file,
a `datasets` dataset or the built-in held-out text."""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch

from headkv_engine import zoo

BUILTIN = "builtin"


def load_model(model_id: str = BUILTIN, dtype=torch.float32):
    """(model, tokenizer, name); GPTNeoX only, with a clear error for other architectures."""
    if model_id == BUILTIN:
        model, tokenizer = zoo.load_builtin_model(dtype=dtype)
        return model, tokenizer, "headkv-builtin"
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    load_config(model_id)
    tokenizer = load_tokenizer(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).eval()
    return model, tokenizer, model_id


def load_config(model_id: str = BUILTIN):
    """The model's config, without its weights (to check inputs against its shape); GPTNeoX only."""
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(zoo.BUILTIN_DIR if model_id == BUILTIN else model_id)
    except OSError as exc:
        raise ValueError(f"--model: cannot load {model_id!r} as a local directory or hub id ({exc})") from exc
    if config.model_type != "gpt_neox":
        raise ValueError(f"--model: {model_id!r} is a {config.model_type!r} model; headkv-engine supports GPTNeoX "
                         "(Pythia) models (model_type 'gpt_neox')")
    return config


def load_tokenizer(model_id: str = BUILTIN):
    """The model's tokenizer alone (to count a text's tokens before loading the weights)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    if model_id == BUILTIN:  # as zoo.load_builtin_model builds it
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(zoo.BUILTIN_DIR, "tokenizer.json"),
                                       bos_token=zoo.BOS_TOKEN, eos_token=zoo.EOS_TOKEN, pad_token=zoo.EOS_TOKEN)
    # transformers builds an empty tokenizer for a directory without tokenizer files: look for them first
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(model_id) and not any(os.path.isfile(os.path.join(model_id, f)) for f in files):
        raise ValueError(f"--model: {model_id!r} has no tokenizer (none of {', '.join(files)}); save one beside "
                         "the model (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model: {model_id!r} has no tokenizer ({exc})") from exc


def load_text(text_file: str | None = None, dataset: str | None = None) -> str:
    """The text to analyse / evaluate: a file, a `datasets` dataset name ('name' or 'name:config'), or the
    built-in held-out text."""
    if text_file and dataset:
        raise ValueError("give either --text-file or --dataset, not both")
    if text_file:
        if not os.path.isfile(text_file):
            raise ValueError(f"--text-file: {text_file!r} is not a file")
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"--text-file: {text_file!r} is not UTF-8 text ({exc})") from exc
        if not text.strip():
            raise ValueError(f"--text-file: {text_file!r} holds no text")
        return text
    if dataset:
        try:
            import datasets  # noqa: PLC0415
        except ImportError as exc:
            raise ValueError(
                "--dataset needs the `datasets` package (pip install datasets) and network access"
            ) from exc
        name, _, config = dataset.partition(":")
        try:
            data = datasets.load_dataset(name, config or None, split="test")
        except Exception as exc:  # the hub is unreachable or the name is wrong
            raise ValueError(f"--dataset: cannot load {dataset!r} ({exc})") from exc
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n\n".join(t for t in data[column] if t)
    return zoo.heldout_text()


def encode(tokenizer, text: str, max_tokens: int, builtin: bool, offset: int = 0) -> torch.Tensor:
    """Token ids [T] (at most max_tokens) of the text from its token `offset` on; the built-in model gets its
    BOS first, as it was trained."""
    if max_tokens < 2 or offset < 0:
        raise ValueError(f"max_tokens must be >= 2 and offset >= 0, got {max_tokens} and {offset}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the text gives no tokens")
    if offset >= len(ids):
        raise ValueError(f"--offset: the text has only {len(ids)} tokens, fewer than the offset {offset}")
    if builtin:
        ids = [tokenizer.convert_tokens_to_ids(zoo.BOS_TOKEN)] + ids[offset : offset + max_tokens - 1]
    else:
        ids = ids[offset : offset + max_tokens]
    if len(ids) < 2:
        raise ValueError("the text gives fewer than 2 tokens")
    return torch.tensor(ids)


# What each command writes into its output directory, relative to it ({n}: a budget). `--force` removes the files
# of these names an earlier run left (a from_budget profile of a budget not asked for again, the
# refined_classifications.json of an earlier --reclassify, an analysis's validation/ now out of date, the
# temporaries of an interrupted write), so that the directory holds this run's results only; any other file stays.
_ANALYSIS = ("head_statistics.json", "head_classifications.json", "entropy_heatmap.png", "position_preference.png",
             "sink_ratio_analysis.png", "head_clustering.png", "relative_position_heatmap.png", "analysis_summary.txt")
_VALIDATION = ("refined_classifications.json", "relative_position_by_type.png", "sink_vs_local_scatter.png",
               "entropy_by_type.png", "validation_report.txt")
OUTPUTS = {
    "analyze": (*_ANALYSIS, *(f"validation/{name}" for name in _VALIDATION)),
    "validate": _VALIDATION,
    "demo": ("demo_results.json", "ppl_vs_context.png", "report.md", *(f"analysis/{name}" for name in _ANALYSIS),
             "profiles/full.json", "profiles/head_aware.json", "profiles/B_streaming_{n}.json",
             "profiles/from_budget_{n}.json", "profiles/from_budget_measured_{n}.json"),
    "bench": ("bench_results.csv", "bench_results.json", "bench_results.md"),
}


def prepare_output_dir(path: str, force: bool, outputs=()) -> None:
    """Create the results directory; an existing non-empty one is an error unless `force`, which removes the
    files of the `outputs` names (OUTPUTS[command]) an earlier run left there, and nothing else."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir: {path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise ValueError(f"--output-dir: {path!r} already holds results; pass --force to overwrite them")
        remove_outputs(path, outputs)
    os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def results_dir(path: str, force: bool):
    """prepare_output_dir for a command's body, which removes an earlier run's outputs itself once its inputs are
    checked (a refused run keeps them); a directory made here is removed again if the body fails before writing
    anything into it (a refused input leaves no empty results directory behind)."""
    made = not os.path.exists(path)
    prepare_output_dir(path, force)
    try:
        yield path
    except BaseException:
        if made and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise


def check_output_file(path: str, force: bool, flag: str = "--output") -> None:
    """Refuse, before any work, an output file that could not be written at the end: a directory, an existing
    file without `force`, or a parent that is no directory or not writable (a missing one is made when writing)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a directory; give the file to write")
    if os.path.exists(path) and not force:
        raise ValueError(f"{flag}: {path!r} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}: cannot write {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write {path!r}: {parent!r} is not writable")


def _output_name(name: str) -> str:
    """The regular expression of an OUTPUTS name ({n}: a budget, digits) or of its interrupted write's temporary
    (files.atomic_path: `.NAME.` + tempfile's 8 random characters + an optional extension)."""
    exact = re.escape(name).replace(re.escape("{n}"), r"[0-9]+")
    return rf"{exact}|\.{exact}\.[a-z0-9_]{{8}}(\.[A-Za-z0-9]+)?"


def is_output(relative: str, outputs) -> bool:
    """Whether `relative` (a path inside a results directory) is one of the `outputs` names or their temporaries."""
    folder, name = os.path.split(relative)
    return any(os.path.dirname(p) == folder and re.fullmatch(_output_name(os.path.basename(p)), name)
               for p in outputs)


def remove_outputs(path: str, outputs) -> list[str]:
    """Remove the files under `path` that are `outputs` names (relative to it) or an interrupted write's temporary of
    one; any other file stays, and a folder that is a link is not entered. Returns the removed paths."""
    removed = []
    for folder in sorted({os.path.dirname(p) for p in outputs}):
        where = os.path.join(path, folder)
        if (folder and os.path.islink(where)) or not os.path.isdir(where):
            continue
        for name in sorted(os.listdir(where)):
            found = os.path.join(where, name)
            if is_output(os.path.join(folder, name), outputs) and (os.path.islink(found) or os.path.isfile(found)):
                os.remove(found)  # a link is removed, never what it points to
                removed.append(found)
    return removed


def window_step(window: int, builtin: bool) -> int:
    """Tokens of the text one window of `window` tokens consumes (the built-in model's BOS is not from the text)."""
    return window - 1 if builtin else window


def encode_windows(tokenizer, text: str, window: int, count: int, builtin: bool, offset: int = 0,
                   flags=("--max-tokens", "--windows")) -> list:
    """`count` consecutive windows of `window` tokens from token `offset` on (each with the BOS first for the
    built-in model); fewer, with a warning, if the text runs out; an error if none fits. `flags`: the options
    that set the window length and the count, named in the warning and the error."""
    if window < 2 or count < 1 or offset < 0:
        raise ValueError(f"window must be >= 2, count >= 1 and offset >= 0, got {window}, {count} and {offset}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = window_step(window, builtin)
    windows = []
    for i in range(count):
        part = ids[offset + i * step : offset + (i + 1) * step]
        if len(part) < step:
            break
        if builtin:
            part = [tokenizer.convert_tokens_to_ids(zoo.BOS_TOKEN)] + part
        windows.append(torch.tensor(part))
    window_flag, count_flag = flags
    start = f" from token {offset} on" if offset else ""
    if not windows:
        raise ValueError(f"{window_flag}={window}: the text has {len(ids)} tokens, fewer than the {offset + step} "
                         f"one window of {window} tokens needs{start}")
    if len(windows) < count:
        # the run goes on with what the text holds, but not silently
        warnings.warn(f"{count_flag}: {count} windows of {window} tokens ({window_flag}) asked for{start}, the text "
                      f"({len(ids)} tokens) holds only {len(windows)}; using {len(windows)}", stacklevel=2)
    return windows
