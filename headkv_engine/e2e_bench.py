"""`headkv bench`: end-to-end generation with each compression method against the full cache, in one run.

For every method and prompt: TTFT (prefill and the first token), TPOT (median time of each later token),
throughput (generated tokens per second over the whole generation), peak memory and KV bytes. Each method runs
in its own subprocess, warmed up in the state it is measured in, so that its peak memory (PEAK_MEMORY: on CUDA
the max allocated, on a Linux CPU the peak RSS, above what the process held before generating) is its own.
Methods: full, streaming_llm, head_aware, from_budget (ragged cache of the patched model), l2_compress,
fix_size_l2 (dense cache pruned by key norm after prefill, Devoto et al. 2024).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import transformers

from headkv_engine import __version__, loading, provenance
from headkv_engine.cli import CLI_BACKENDS, at_least
from headkv_engine.files import write_csv_atomic, write_text_atomic
from headkv_engine.methods import fix_size_l2, l2_compress
from headkv_engine.patching import patch_model
from headkv_engine.profile import Profile, write_json_atomic

METHODS = ("full", "streaming_llm", "head_aware", "from_budget", "l2_compress", "fix_size_l2")


def _proc_status_mb(field: str) -> float:
    """A memory figure of /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:"))


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Set Linux's resident-memory high-water mark (VmHWM) to the present resident memory; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_mb("VmHWM")
        return True
    except (OSError, StopIteration):
        return False


PEAK_MEMORY = {
    "cuda_max_allocated": "CUDA memory allocated at the peak of generation, above what was allocated before it",
    "rss_peak": "peak resident memory during generation (VmHWM, reset before it), above the resident memory "
                "before it",
    "rss_peak_growth": "rise of the process's peak resident memory (getrusage) during generation: 0 where "
                       "generation stayed below the peak of loading the model",
}


class PeakMemory:
    """The peak memory of what runs after it is made, above what the process held then, in MiB (never negative);
    `kind` says which figure it is (PEAK_MEMORY)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.kind, self.base = "cuda_max_allocated", torch.cuda.memory_allocated(device) / 2**20
        elif _reset_peak_rss():
            # read after the reset: the mark can only rise from here, so the figure is >= 0
            self.kind, self.base = "rss_peak", _proc_status_mb("VmRSS")
        else:  # the lifetime peak cannot be reset (macOS): only its rise is this run's
            self.kind, self.base = "rss_peak_growth", _peak_rss_mb()

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_mb("VmHWM") if self.kind == "rss_peak" else _peak_rss_mb()
        return max(0.0, peak - self.base)


def _kv_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def _generate(model, prompt, new_tokens, compress=None):
    """Greedy generation timed token by token: (ttft s, per-token times, cache)."""
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model(prompt[None], use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    if compress is not None:
        cache = compress(cache)
    _sync(device)
    ttft = time.perf_counter() - start
    times = []
    for step in range(new_tokens - 1):
        start = time.perf_counter()
        kwargs = {}
        if compress is not None:  # a pruned dense cache no longer counts positions: give them
            kwargs["position_ids"] = torch.tensor([[prompt.numel() + step]], device=device)
        out = model(token, cache=cache, use_cache=True, **kwargs)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return ttft, times, cache


def _profile(method, model, args):
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if method == "streaming_llm":
        return Profile.streaming_llm(layers, heads, sink_size=4, window_size=args.budget - 4)
    if method == "head_aware":
        return Profile.from_classifications(args.classifications)
    if method == "from_budget":
        return Profile.from_budget(args.statistics, args.budget, length=args.max_tokens)
    return None


def _prompts(tokenizer, text, args) -> list:
    """--num-samples prompts of --max-tokens tokens (fewer, with a warning, if the text runs out)."""
    ids = loading.encode(tokenizer, text, args.num_samples * args.max_tokens, builtin=args.model == loading.BUILTIN)
    prompts = [ids[i * args.max_tokens : (i + 1) * args.max_tokens] for i in range(args.num_samples)]
    prompts = [p for p in prompts if p.numel() == args.max_tokens]
    if not prompts:
        raise ValueError(f"--max-tokens: the text has {ids.numel()} tokens, fewer than one prompt of "
                         f"--max-tokens={args.max_tokens}")
    if len(prompts) < args.num_samples:
        warnings.warn(f"--num-samples: {args.num_samples} prompts of {args.max_tokens} tokens (--max-tokens) asked "
                      f"for, the text holds only {len(prompts)}; using {len(prompts)}", stacklevel=2)
    return prompts


def worker(args) -> dict:
    """One method on every prompt, in this process; returns its measurements."""
    device = torch.device(args.device)
    model, tokenizer, name = loading.load_model(args.model)
    model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent has warned
        prompts = [p.to(device) for p in _prompts(tokenizer, loading.load_text(args.text_file, None), args)]
    profile = _profile(args.method, model, args)
    compress = {
        "l2_compress": lambda cache: l2_compress(cache, keep_ratio=min(1.0, args.budget / args.max_tokens)),
        "fix_size_l2": lambda cache: fix_size_l2(cache, max_tokens=args.budget),
    }.get(args.method)
    ttfts, token_times, kv, total_time = [], [], [], 0.0
    handle = patch_model(model, profile, backend=args.backend) if profile is not None else None
    try:
        # warm up in the state that is measured: the patched kernels' first calls (loading, compiling, first
        # dispatch) and the compression are not timed
        _generate(model, prompts[0], 2, compress)
        memory = PeakMemory(device)
        for prompt in prompts:
            ttft, times, cache = _generate(model, prompt, args.max_new_tokens, compress)
            ttfts.append(ttft)
            token_times.extend(times)
            kv.append(_kv_bytes(cache))
            total_time += ttft + sum(times)
        peak = memory.peak_mb()
    finally:
        if handle is not None:
            handle.unpatch()
    return {
        "method": args.method, "model": name, "prompts": len(prompts), "prompt_tokens": args.max_tokens,
        "new_tokens": args.max_new_tokens,
        "budget": args.budget if args.method not in ("full", "head_aware") else None,
        "ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": 1000 * statistics.median(token_times),
        "throughput_tok_s": len(prompts) * args.max_new_tokens / total_time, "peak_memory_mb": peak,
        "peak_memory": memory.kind, "kv_bytes": int(statistics.median(kv)), "backend": args.backend,
    }


BUDGETED = ("streaming_llm", "from_budget", "l2_compress", "fix_size_l2")


def check_arguments(args) -> list[str]:
    """The methods to run, once every input has been checked (before the first measurement): ValueErrors that
    name the flag."""
    methods = list(METHODS) if args.compare_all else list(dict.fromkeys(["full", args.method]))
    for method, flag, path, what in (("head_aware", "--classifications", args.classifications,
                                      "a head_classifications.json"),
                                     ("from_budget", "--statistics", args.statistics, "a head_statistics.json")):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: {path!r} is not a file")
        if not path and method in methods:
            if not args.compare_all:
                raise ValueError(f"--method {method} needs {flag} ({what})")
            methods.remove(method)  # --compare-all: the methods whose inputs are given
    if "streaming_llm" in methods and args.budget <= 4:
        raise ValueError(f"--budget: must exceed the 4 StreamingLLM sinks, got {args.budget}")
    if any(m in methods for m in BUDGETED) and args.budget >= args.max_tokens:
        raise ValueError(f"--budget: expected fewer kept tokens than the prompt's --max-tokens ({args.max_tokens}), "
                         f"got {args.budget}: nothing would be compressed")
    config = loading.load_config(args.model)
    # the profiles' files are read and checked against the model's shape here, not after the full-cache run
    for method, flag, path, build in (
        ("head_aware", "--classifications", args.classifications, lambda: Profile.from_classifications(
            args.classifications)),
        ("from_budget", "--statistics", args.statistics, lambda: Profile.from_budget(
            args.statistics, args.budget, length=args.max_tokens)),
    ):
        if method in methods:
            try:
                build().check_model(config)
            except (ValueError, TypeError) as exc:  # named by the flag, and by the file unless the error names it
                raise ValueError(f"{flag}: {exc}" if path in str(exc) else f"{flag}: {path}: {exc}") from None
    _prompts(loading.load_tokenizer(args.model), loading.load_text(args.text_file, None), args)
    return methods


def run(args, methods: list[str] | None = None) -> list[dict]:
    """Every requested method (and `full`) in its own subprocess; CSV and markdown into args.output_dir.
    methods: what check_arguments(args) returned, when the caller has checked them already."""
    methods = check_arguments(args) if methods is None else methods
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "headkv_engine.e2e_bench", "--method", method, "--model", args.model,
               "--num-samples", str(args.num_samples), "--max-tokens", str(args.max_tokens),
               "--max-new-tokens", str(args.max_new_tokens), "--budget", str(args.budget), "--backend", args.backend,
               "--device", args.device]
        for flag, value in (("--text-file", args.text_file), ("--classifications", args.classifications),
                            ("--statistics", args.statistics)):
            if value:
                cmd += [flag, value]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"method {method} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = rows[0]
    meta = {"date": datetime.date.today().isoformat(), "machine": _machine(args.device), "torch": torch.__version__,
            "transformers": transformers.__version__, "headkv_engine": __version__, "commit": provenance.commit()}
    for row in rows:
        row.update(meta)
        row["tpot_speedup_vs_full"] = full["tpot_ms"] / row["tpot_ms"]
        row["kv_fraction_of_full"] = row["kv_bytes"] / full["kv_bytes"]
    _write(rows, args.output_dir)
    return rows


def _machine(device) -> str:
    name = provenance.processor(device)
    return name if device.startswith("cuda") else f"{name}, {os.cpu_count()} cores"


def _write(rows, output_dir):
    os.makedirs(output_dir, exist_ok=True)
    loading.remove_outputs(output_dir, loading.OUTPUTS["bench"])  # and an interrupted earlier write's temporaries
    write_csv_atomic(os.path.join(output_dir, "bench_results.csv"), rows)
    write_json_atomic(os.path.join(output_dir, "bench_results.json"), rows)
    r0 = rows[0]
    lines = [f"# End-to-end generation: {r0['model']}", "",
             f"{r0['date']}; {r0['machine']}; torch {r0['torch']}, transformers {r0['transformers']}, headkv-engine "
             f"{r0['headkv_engine']} ({r0['commit']}); {r0['prompts']} prompts of {r0['prompt_tokens']} tokens, "
             f"{r0['new_tokens']} new tokens each, greedy; every method measured in the same run.", "",
             "| method | budget | TTFT ms | TPOT ms | throughput tok/s | peak memory MB | KV bytes | "
             "TPOT vs full | KV vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget'] or '-'} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | "
                     f"{r['throughput_tok_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['kv_bytes']:,} | "
                     f"{r['tpot_speedup_vs_full']:.2f}x | {100 * r['kv_fraction_of_full']:.1f}% |")
    kinds = dict.fromkeys(r["peak_memory"] for r in rows)
    lines += ["", "Peak memory: " + "; ".join(PEAK_MEMORY[k] for k in kinds) + ", in MiB, each method in its own "
              "process. KV bytes: the K/V storage of the cache at the end of a prompt's generation (median over "
              "prompts)."]
    write_text_atomic(os.path.join(output_dir, "bench_results.md"), "\n".join(lines) + "\n")


def add_arguments(parser):
    parser.add_argument("--method", default="head_aware", choices=METHODS)
    parser.add_argument("--compare-all", action="store_true", help="every method (those whose inputs are given)")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--text-file")
    parser.add_argument("--classifications", help="head_classifications.json for head_aware")
    parser.add_argument("--statistics", help="head_statistics.json for from_budget")
    parser.add_argument("--budget", type=at_least(1), default=128, help="kept tokens per head for the budgeted methods")
    parser.add_argument("--num-samples", type=at_least(1), default=3)
    parser.add_argument("--max-tokens", type=at_least(2), default=1024, help="prompt length")
    parser.add_argument("--max-new-tokens", type=at_least(2), default=32)
    parser.add_argument("--backend", default="auto", choices=CLI_BACKENDS)
    default = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    parser.add_argument("--device", default=default)
    return parser


if __name__ == "__main__":  # the per-method worker
    import argparse

    worker_args = add_arguments(argparse.ArgumentParser()).parse_args()
    print(json.dumps(worker(worker_args)))
