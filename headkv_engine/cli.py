"""The `headkv` command line."""

from __future__ import annotations

import argparse
import sys


def _quickstart(args) -> int:
    from headkv_engine import quickstart  # noqa: PLC0415  (keeps `headkv --help` fast)

    result = quickstart.run(context=args.context, new_tokens=args.new_tokens, backend=args.backend)
    print(quickstart.report(result))
    if not result["full_profile_matches_unpatched"]:
        print("error: the full-cache profile did not reproduce the unpatched model", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headkv", description="Head-aware KV-cache compression for GPTNeoX models")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="run the engine on a random tiny GPTNeoX (no download)")
    quick.add_argument("--context", type=int, default=1024, help="prompt length in tokens (default 1024)")
    quick.add_argument("--new-tokens", type=int, default=32, help="tokens to decode when timing (default 32)")
    quick.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu"])
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"headkv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
