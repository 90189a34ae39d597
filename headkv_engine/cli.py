"""The `headkv` command line: argument parsing; the work is in headkv_engine.commands."""

from __future__ import annotations

import argparse
import sys

import torch


def _quickstart(args) -> int:
    from headkv_engine import quickstart  # noqa: PLC0415  (keeps `headkv --help` fast)

    result = quickstart.run(context=args.context, new_tokens=args.new_tokens, backend=args.backend)
    print(quickstart.report(result))
    if not result["full_profile_matches_unpatched"]:
        print("error: the full-cache profile did not reproduce the unpatched model", file=sys.stderr)
        return 1
    return 0


CLI_BACKENDS = ["auto", "torch", "cpu", "triton", "metal"]
FORCE_HELP = ("write into a non-empty output directory: the files an earlier run of this command wrote there are "
              "removed first, any other file is kept")


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _command(name):
    def run(args):
        from headkv_engine import commands  # noqa: PLC0415

        return getattr(commands, name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headkv", description="Head-aware KV-cache compression for GPTNeoX models")
    commands = parser.add_subparsers(dest="command", required=True)
    backends = CLI_BACKENDS

    quick = commands.add_parser("quickstart", help="run the engine on a random tiny GPTNeoX (no download)")
    quick.add_argument("--context", type=at_least(2), default=1024, help="prompt length in tokens (default 1024)")
    quick.add_argument("--new-tokens", type=at_least(1), default=32, help="tokens to decode when timing (default 32)")
    quick.add_argument("--backend", default="auto", choices=backends)
    quick.set_defaults(func=_quickstart)

    analyze = commands.add_parser("analyze", help="per-head attention statistics, classification and figures")
    analyze.add_argument("--model", default="builtin", help="hub id, local directory, or 'builtin' (default)")
    source = analyze.add_mutually_exclusive_group()
    source.add_argument("--text-file", help="text to analyse (default: the built-in held-out text)")
    source.add_argument("--dataset", help="a `datasets` dataset, 'name' or 'name:config' (needs network)")
    analyze.add_argument("--max-tokens", type=at_least(2), default=2048)
    analyze.add_argument("--windows", type=at_least(1), default=1,
                         help="analyse this many consecutive windows of --max-tokens (the built-in model: BOS first in "
                              "each), e.g. windows of the context the model is trained and evaluated at")
    analyze.add_argument("--chunk-size", type=at_least(1), default=512)
    analyze.add_argument("--sink-size", type=at_least(0), default=4)
    analyze.add_argument("--local-window", type=at_least(1), default=8)
    analyze.add_argument("--recent-ratio", type=fraction, default=0.1)
    analyze.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                         help="run the model in bf16 (default: on CUDA only)")
    analyze.add_argument("--backend", default="auto", choices=backends)
    analyze.add_argument("--output-dir", required=True)
    analyze.add_argument("--force", action="store_true", help=FORCE_HELP)
    analyze.set_defaults(func=_command("analyze"))

    calibrate = commands.add_parser("calibrate", help="per-layer loss of sinks + window attention (from_budget prices)")
    calibrate.add_argument("--model", default="builtin", help="hub id, local directory, or 'builtin' (default)")
    calibrate.add_argument("--text-file", help="calibration text, not the evaluated one (default: the built-in "
                                               "held-out text)")
    calibrate.add_argument("--max-tokens", type=at_least(2), default=512, help="tokens per window")
    calibrate.add_argument("--windows", type=at_least(1), default=4, help="consecutive windows of --max-tokens")
    calibrate.add_argument("--offset", type=at_least(0), default=0, help="start at this token of the text")
    calibrate.add_argument("--sink-size", type=at_least(0), default=4)
    calibrate.add_argument("--window-sizes", type=at_least(1), nargs="+",
                           help="windows to measure (default: 16 32 64 128 192 256 384, analysis.layer_loss.WINDOWS)")
    calibrate.add_argument("--backend", default="auto", choices=backends)
    calibrate.add_argument("--output", required=True, help="layer_losses.json to write")
    calibrate.add_argument("--force", action="store_true", help="overwrite an existing file")
    calibrate.set_defaults(func=_command("calibrate"))

    validate = commands.add_parser("validate", help="validation figures and report of an analysis")
    validate.add_argument("--results-dir", required=True, help="a directory written by `headkv analyze`")
    validate.add_argument("--reclassify", action="store_true", help="classify again from head_statistics.json")
    validate.add_argument("--output-dir", help="default: RESULTS_DIR/validation")
    validate.add_argument("--force", action="store_true", help=FORCE_HELP)
    validate.set_defaults(func=_command("validate"))

    demo = commands.add_parser("demo", help="the whole pipeline on the built-in model (or any GPTNeoX), with a report")
    demo.add_argument("--output-dir", default="headkv-demo")
    demo.add_argument("--model", default="builtin", help="hub id, local directory, or 'builtin' (default)")
    demo.add_argument("--text-file", help="held-out text (default: the built-in held-out text)")
    demo.add_argument("--analysis-tokens", type=at_least(2), default=2048)
    demo.add_argument("--eval-tokens", type=at_least(2), default=512, help="tokens per evaluation window")
    demo.add_argument("--eval-windows", type=at_least(1), default=4, help="consecutive evaluation windows")
    demo.add_argument("--budgets", type=at_least(1), nargs="+", default=[32, 64, 128, 256])
    demo.add_argument("--decode-context", type=at_least(2), default=1024)
    demo.add_argument("--new-tokens", type=at_least(1), default=32)
    demo.add_argument("--backend", default="auto", choices=backends)
    demo.add_argument("--layer-losses", help="layer_losses.json of `headkv calibrate`: adds from_budget_measured "
                      "profiles (default: the built-in model's own calibration, for the built-in model)")
    demo.add_argument("--force", action="store_true", help=FORCE_HELP)
    demo.set_defaults(func=_command("demo"))

    bench = commands.add_parser("bench", help="end-to-end generation: TTFT, TPOT, throughput, memory vs full cache")
    from headkv_engine.e2e_bench import add_arguments  # noqa: PLC0415

    add_arguments(bench)
    bench.add_argument("--output-dir", default="headkv-bench")
    bench.add_argument("--force", action="store_true", help=FORCE_HELP)
    bench.set_defaults(func=_command("bench"))

    ablate = commands.add_parser("ablate", help="seed 004's ablation study: perplexity per policy and budget")
    ablate.add_argument("--model", default="builtin")
    ablate.add_argument("--text-file", help="evaluation text (default: the built-in held-out text)")
    ablate.add_argument("--ablation", default="all", choices=["all", "sink_importance", "window_size", "head_aware",
                                                               "groups"])
    ablate.add_argument("--classifications", help="head_classifications.json (groups G, I, J, K, head_aware)")
    ablate.add_argument("--statistics", help="head_statistics.json (from_budget rows)")
    ablate.add_argument("--layer-losses",
                        help="layer_losses.json of `headkv calibrate`: adds from_budget_measured rows, priced by them")
    ablate.add_argument("--budgets", type=at_least(1), nargs="+", default=[32, 64, 128, 256, 512])
    ablate.add_argument("--max-tokens", type=at_least(2), default=1000)
    ablate.add_argument("--windows", type=at_least(1), default=1,
                        help="evaluate this many consecutive windows of --max-tokens")
    ablate.add_argument("--offset", type=at_least(0), default=0,
                        help="evaluate from this token of the text on (e.g. past the part the analysis saw)")
    ablate.add_argument("--backend", default="auto", choices=backends)
    ablate.add_argument("--output-dir", required=True)
    ablate.add_argument("--force", action="store_true", help="start over instead of resuming (the earlier results "
                        "are replaced once the first new one is written), or write into a directory of other files")
    ablate.set_defaults(func=_command("ablate"))
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # bad arguments (argparse printed why) or --help: its exit status, returned
        return exit_.code
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, TypeError) as exc:
        print(f"headkv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
