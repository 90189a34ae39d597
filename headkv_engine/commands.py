"""What the `headkv` subcommands do (argument parsing lives in cli.py)."""

from __future__ import annotations

import json
import os

import torch

from headkv_engine import loading


def analyze(args) -> int:
    from headkv_engine.analysis import analyze as run_analysis  # noqa: PLC0415
    from headkv_engine.analysis import write_analysis  # noqa: PLC0415

    if args.windows < 1:
        raise ValueError(f"--windows: expected at least 1 window, got {args.windows}")
    with loading.results_dir(args.output_dir, args.force):
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model, tokenizer, name = loading.load_model(args.model, dtype=dtype)
        text = loading.load_text(args.text_file, args.dataset)
        builtin = args.model == loading.BUILTIN
        ids = (loading.encode(tokenizer, text, args.max_tokens, builtin=builtin) if args.windows == 1 else
               loading.encode_windows(tokenizer, text, args.max_tokens, args.windows, builtin=builtin))
        result = run_analysis(model, ids, sink_size=args.sink_size, local_window=args.local_window,
                              recent_ratio=args.recent_ratio, chunk_size=args.chunk_size, backend=args.backend,
                              model_name=name)
        # an earlier run's outputs go only now, once this run has results to put in their place
        loading.remove_outputs(args.output_dir, loading.OUTPUTS["analyze"])
        files = write_analysis(result, args.output_dir)
    print(open(os.path.join(args.output_dir, "analysis_summary.txt"), encoding="utf-8").read().split("COMPRESSIBLE")[0])
    print(f"wrote {len(files)} files to {args.output_dir} ({result.seconds:.1f} s)")
    return 0


def calibrate(args) -> int:
    from headkv_engine.analysis.layer_loss import WINDOWS, measure_layer_losses  # noqa: PLC0415
    from headkv_engine.profile import write_json_atomic  # noqa: PLC0415

    loading.check_output_file(args.output, args.force)  # before the measurement, not after it
    model, tokenizer, name = loading.load_model(args.model)
    text = loading.load_text(args.text_file, None)
    ids = loading.encode_windows(tokenizer, text, args.max_tokens, args.windows, builtin=args.model == loading.BUILTIN,
                                 offset=args.offset)
    result = measure_layer_losses(model, ids, sink_size=args.sink_size, windows=args.window_sizes or WINDOWS,
                                  backend=args.backend, progress=True)
    result["model"] = name
    write_json_atomic(args.output, result)
    print(f"{name}: loss increase (nats) with one layer at {args.sink_size} sinks + window, on {result['tokens']} "
          "tokens")
    print("layer " + " ".join(f"{w:>8}" for w in result["windows"]))
    for layer, row in enumerate(result["loss_increase"]):
        print(f"{layer:>5} " + " ".join(f"{v:+8.4f}" for v in row))
    print(f"wrote {args.output}")
    return 0


def validate(args) -> int:
    from headkv_engine.analysis import load_classifications, load_statistics, write_validation  # noqa: PLC0415
    from headkv_engine.analysis.report import check_same_heads  # noqa: PLC0415

    stats_path = os.path.join(args.results_dir, "head_statistics.json")
    if not os.path.isfile(stats_path):
        raise ValueError(f"--results-dir: {stats_path} not found (run `headkv analyze` first)")
    output_dir = args.output_dir or os.path.join(args.results_dir, "validation")
    statistics, info = load_statistics(stats_path)
    classifications = None  # --reclassify: classify the statistics again
    if not args.reclassify:
        cls_path = os.path.join(args.results_dir, "head_classifications.json")
        if not os.path.isfile(cls_path):
            raise ValueError(f"--results-dir: {cls_path} not found; pass --reclassify to classify from the statistics")
        classifications = load_classifications(cls_path)
        try:
            check_same_heads(statistics, classifications)  # before anything is written
        except ValueError as exc:
            raise ValueError(f"--results-dir: {cls_path} is not of the heads of {stats_path} ({exc}); pass "
                             "--reclassify to classify the statistics again") from None
    if os.path.exists(output_dir):  # a new one is made by write_validation, which removes it again if it fails
        loading.prepare_output_dir(output_dir, args.force, loading.OUTPUTS["validate"])
    files = write_validation(statistics, info, output_dir, classifications)
    print(f"wrote {', '.join(files)} to {output_dir}")
    return 0


def ablate(args) -> int:
    from headkv_engine.ablation import run_ablation  # noqa: PLC0415
    from headkv_engine.ablation_report import write_report  # noqa: PLC0415
    from headkv_engine.groups import SINK  # noqa: PLC0415

    classifications = args.classifications
    statistics = args.statistics
    if args.layer_losses and not statistics:
        raise ValueError("--layer-losses: prices the from_budget rows, which need --statistics")
    # the inputs are checked before anything is loaded or written
    if min(args.budgets) <= SINK:
        raise ValueError(f"--budgets: every budget must exceed the {SINK} StreamingLLM sinks (B_streaming_C keeps "
                         f"{SINK} sinks + C - {SINK} recent tokens), got {args.budgets}")
    for flag, path in (("--layer-losses", args.layer_losses), ("--classifications", classifications),
                       ("--statistics", statistics)):
        _require_file(flag, path)
    _check_ablation_dir(args.output_dir, args.force)
    with loading.results_dir(args.output_dir, force=True):  # _check_ablation_dir has decided what may be written
        model, tokenizer, name = loading.load_model(args.model)
        text = loading.load_text(args.text_file, None)
        ids = loading.encode_windows(tokenizer, text, args.max_tokens, args.windows,
                                     builtin=args.model == loading.BUILTIN, offset=args.offset)
        results = run_ablation(model, ids, args.output_dir, ablation=args.ablation, classifications=classifications,
                               statistics=statistics, model_name=name, budgets=tuple(args.budgets),
                               backend=args.backend, layer_losses=args.layer_losses, resume=not args.force)
    files = write_report(results, args.output_dir)
    print(f"{len(results['configs'])} configurations; wrote ablation_results.json, {', '.join(files)} to "
          f"{args.output_dir}")
    return 0


def demo(args) -> int:
    from headkv_engine.demo import run_demo  # noqa: PLC0415

    _require_file("--layer-losses", args.layer_losses)
    # run_demo checks the rest of its inputs, then removes an earlier run's outputs
    with loading.results_dir(args.output_dir, args.force):
        results = run_demo(args.output_dir, model_id=args.model, text_file=args.text_file,
                           analysis_tokens=args.analysis_tokens, eval_tokens=args.eval_tokens,
                           budgets=tuple(sorted(args.budgets)), eval_windows=args.eval_windows,
                           decode_context=args.decode_context,
                           new_tokens=args.new_tokens, backend=args.backend, layer_losses=args.layer_losses)
    full = next(c for c in results["configs"] if c["name"] == "full")
    print(f"{results['model']}: full-cache perplexity {full['perplexity']:.2f} on {results['tokens']} tokens; "
          f"{len(results['configs'])} profiles evaluated in {results['evaluation_seconds']:.0f} s "
          f"(the whole demo: {results['seconds']:.0f} s)")
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return 0


def bench(args) -> int:
    from headkv_engine.e2e_bench import check_arguments, run  # noqa: PLC0415

    methods = check_arguments(args)  # every input, before the output directory is touched
    with loading.results_dir(args.output_dir, args.force):  # an earlier run's outputs go when the new ones are written
        run(args, methods)
    print(open(os.path.join(args.output_dir, "bench_results.md"), encoding="utf-8").read())
    return 0


def show_json(path) -> None:
    with open(path, encoding="utf-8") as f:
        print(json.dumps(json.load(f), indent=2))


def _check_ablation_dir(path: str, force: bool) -> None:
    """An ablation writes into a new or empty directory, or resumes the one of its ablation_results.json (whose
    run and inputs run_ablation compares); a directory of other files only with --force."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir: {path!r} exists and is not a directory")
    if force or not os.path.isdir(path) or not os.listdir(path):
        return
    if not os.path.isfile(os.path.join(path, "ablation_results.json")):
        raise ValueError(f"--output-dir: {path!r} holds other files and no ablation_results.json to resume; use "
                         "another --output-dir, or pass --force to write the ablation into it")


def _require_file(flag: str, path: str | None) -> None:
    """A clear error for an optional input file that was given but does not exist."""
    if path and not os.path.isfile(path):
        raise ValueError(f"{flag}: {path!r} is not a file")
