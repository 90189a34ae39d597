"""Markdown tables (decode, prefill, head statistics) from the CSV of `bench/gpu_kernels.py`, for RESULTS.md.

    python bench/gpu_report.py bench/results/gpu_kernels.csv

Columns a run did not produce (an older CSV, a library not installed) show as "-"; a library that refused the
shape shows its message under the table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from headkv_engine.files import read_csv  # noqa: E402


def number(row, key):
    try:
        return float(row.get(key) or "")
    except ValueError:
        return None


def cell(value, spec):
    return "-" if value is None else format(value, spec)


def percent(row, key):
    value = number(row, key)
    return "-" if value is None else f"{100 * value:.1f}%"


def decode_table(rows) -> list[str]:
    lines = [
        "| batch | context | kept KV MB | ours ms | ours eager ms | fused ms | SDPA dense ms | speedup | decode GB/s"
        " | share of copy BW | per layer: ours ms | fused ms | SDPA ms | share of copy BW (ours / fused)"
        " | with stats ms (ours / fused) | flash-attn ms | FlashInfer ms |",
        "|---" * 17 + "|",
    ]
    for r in rows:
        kept = number(r, "kept_kv_bytes")
        lines.append(
            f"| {r['batch']} | {r['context']} | {cell(kept and kept / 2**20, '.1f')}"
            f" | {cell(number(r, 'ours_ms'), '.4f')} | {cell(number(r, 'ours_eager_ms'), '.4f')}"
            f" | {cell(number(r, 'ours_fused_ms'), '.4f')} | {cell(number(r, 'sdpa_dense_ms'), '.4f')}"
            f" | {cell(number(r, 'speedup_vs_sdpa'), '.2f')}x | {cell(number(r, 'decode_bw_GBps'), '.0f')}"
            f" | {percent(r, 'bw_ratio')}"
            f" | {cell(number(r, 'ours_layer_ms'), '.4f')} | {cell(number(r, 'ours_fused_layer_ms'), '.4f')}"
            f" | {cell(number(r, 'sdpa_dense_layer_ms'), '.4f')}"
            f" | {percent(r, 'bw_ratio_layer')} / {percent(r, 'bw_ratio_fused_layer')}"
            f" | {cell(number(r, 'ours_stats_ms'), '.4f')} / {cell(number(r, 'ours_fused_stats_ms'), '.4f')}"
            f" | {cell(number(r, 'flash_attn_dense_ms'), '.4f')} | {cell(number(r, 'flashinfer_dense_ms'), '.4f')} |")
    return lines


def prefill_table(rows) -> list[str]:
    lines = ["| head | context | ours ms | SDPA causal ms | speedup | target 0.5*T/(S+W) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op'].removeprefix('prefill_')} | {r['context']} | {cell(number(r, 'ours_ms'), '.4f')}"
                     f" | {cell(number(r, 'sdpa_dense_ms'), '.4f')} | {cell(number(r, 'speedup_vs_sdpa'), '.1f')}x"
                     f" | {cell(number(r, 'target_speedup'), '.0f')}x |")
    return lines


def statistics_table(rows) -> list[str]:
    lines = ["| shape | tokens | Triton ms | reference ms | attention matrix ms | Triton peak MB | reference peak MB"
             " | matrix peak MB | max diff of mean entropy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op'].removeprefix('head_statistics_')} | {r['context']} | {cell(number(r, 'ours_ms'), '.3f')}"
            f" | {cell(number(r, 'reference_ms'), '.3f')} | {cell(number(r, 'matrix_ms'), '.3f')}"
            f" | {cell(number(r, 'ours_peak_MB'), '.1f')} | {cell(number(r, 'reference_peak_MB'), '.1f')}"
            f" | {cell(number(r, 'matrix_peak_MB'), '.1f')} | {cell(number(r, 'max_abs_diff_mean_entropy'), '.1e')} |")
    return lines


def report(rows) -> str:
    if not rows:
        raise SystemExit("the CSV has no rows")
    first = rows[0]
    out = [f"Device: {first.get('device', '?')}; torch {first.get('torch', '?')}, Triton {first.get('triton', '?')}; "
           f"commit {first.get('commit', '?')}; {first.get('date', '?')}. Copy bandwidth measured in the same run: "
           f"{cell(number(first, 'copy_bw_GBps'), '.0f')} GB/s (bytes read + written).", ""]
    groups = (("decode", decode_table, lambda op: op == "decode"),
              ("prefill", prefill_table, lambda op: op.startswith("prefill_")),
              ("head_statistics", statistics_table, lambda op: op.startswith("head_statistics_")))
    for title, table, belongs in groups:
        chosen = [r for r in rows if belongs(r.get("op", ""))]
        if chosen:
            out += [f"### {title}", "", *table(chosen), ""]
    notes = sorted({f"{key}: {r[key]}" for r in rows for key in ("flash_attn_dense_ms", "flashinfer_dense_ms")
                    if r.get(key) and number(r, key) is None})
    out += [f"- {note}" for note in notes]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    args = parser.parse_args(argv)
    print(report(read_csv(args.csv)), end="")


if __name__ == "__main__":
    main()
