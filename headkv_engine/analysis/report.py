"""Text reports of an analysis (analysis_summary.txt, validation_report.txt) and the seed's AttentionAnalyzer."""

from __future__ import annotations

import os
import shutil

import torch

from headkv_engine.analysis.analyzer import AnalysisResult, analyze
from headkv_engine.analysis.classify import classify, save_classifications, summarize
from headkv_engine.analysis.plots import analysis_figures, validation_figures
from headkv_engine.files import write_text_atomic


def summary_text(statistics, classifications, model_info) -> str:
    summary = summarize(classifications)
    lines = [
        "HEAD ANALYSIS SUMMARY",
        "=" * 60,
        f"model: {model_info.get('model')}  tokens: {model_info.get('tokens')}  backend: {model_info.get('backend')}",
        f"layers x heads: {model_info.get('num_layers')} x {model_info.get('num_heads')}  sink_size: "
        f"{model_info.get('sink_size')}  local_window: {model_info.get('local_window')}  recent_ratio: "
        f"{model_info.get('recent_ratio')}",
        "",
        "CLASSIFICATION SUMMARY",
        "-" * 40,
    ]
    total = summary["total_heads"]
    for kind, count in summary["type_distribution"].items():
        lines.append(f"  {kind:<18}: {count:5d} heads ({100 * count / total:5.1f}%)")
    lines += [
        "",
        "COMPRESSION POTENTIAL",
        "-" * 40,
        f"  Compressible (not full cache): {summary['compressible_heads']} "
        f"({100 * summary['compressible_heads'] / total:.1f}%)",
        f"  Require sink tokens: {summary['heads_needing_sinks']} "
        f"({100 * summary['heads_needing_sinks'] / total:.1f}%)",
        f"  Prunable: {summary['prunable_heads']}",
        "",
        "MEAN STATISTICS",
        "-" * 40,
        f"  entropy {sum(s.mean_entropy for s in statistics) / total:.3f} nats, sink ratio "
        f"{sum(s.sink_ratio for s in statistics) / total:.3f}, local "
        f"{sum(s.position_preference['local'] for s in statistics) / total:.3f}",
        "",
        "COMPRESSIBLE HEADS (layer, head, type, strategy, window, confidence)",
        "-" * 40,
    ]
    for c in classifications:
        if not c.use_full_cache:
            lines.append(f"  L{c.layer_idx:02d} H{c.head_idx:02d}  {c.head_type:<16} {c.compression_strategy:<12} "
                         f"window {c.recommended_window:>4}  confidence {c.confidence:.2f}")
    return "\n".join(lines) + "\n"


def write_analysis(result: AnalysisResult, output_dir, scheme="refined", thresholds=None, classifications=None
                   ) -> list[str]:
    """head_statistics.json, head_classifications.json (of `classifications`, or classified here), the five
    figures and analysis_summary.txt."""
    os.makedirs(output_dir, exist_ok=True)
    result.save(output_dir)
    if classifications is None:
        classifications = classify(result.statistics, scheme=scheme, thresholds=thresholds)
    save_classifications(classifications, os.path.join(output_dir, "head_classifications.json"), scheme, thresholds)
    figures = analysis_figures(result.statistics, output_dir)
    write_text_atomic(os.path.join(output_dir, "analysis_summary.txt"),
                      summary_text(result.statistics, classifications, result.model_info))
    return ["head_statistics.json", "head_classifications.json", *figures, "analysis_summary.txt"]


def type_table(statistics, classifications) -> str:
    """Per head type: count and mean entropy / sink / local / max attention of its heads."""
    stats = {(s.layer_idx, s.head_idx): s for s in statistics}
    lines = [f"  {'type':<16} {'heads':>5} {'entropy':>8} {'sink':>6} {'local':>6} {'max attn':>8} {'confidence':>10}"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    for kind in sorted({c.head_type for c in classifications}):
        members = [c for c in classifications if c.head_type == kind]
        rows = [stats[(c.layer_idx, c.head_idx)] for c in members]
        lines.append(f"  {kind:<16} {len(rows):>5} {mean([r.mean_entropy for r in rows]):>8.3f} "
                     f"{mean([r.position_preference['sink'] for r in rows]):>6.3f} "
                     f"{mean([r.position_preference['local'] for r in rows]):>6.3f} "
                     f"{mean([r.max_attention_mean for r in rows]):>8.3f} "
                     f"{mean([c.confidence for c in members]):>10.3f}")
    return "\n".join(lines) + "\n"


def check_same_heads(statistics, classifications) -> None:
    """The classifications cover exactly the analysed heads (each once), or a ValueError names the first that
    differs."""
    analysed = [(s.layer_idx, s.head_idx) for s in statistics]
    classified = [(c.layer_idx, c.head_idx) for c in classifications]
    for head in classified:
        if classified.count(head) > 1:
            raise ValueError(f"classifications: layer {head[0]}, head {head[1]} is classified more than once")
    missing = sorted(set(analysed) - set(classified))
    extra = sorted(set(classified) - set(analysed))
    if missing or extra:
        what = (f"layer {missing[0][0]}, head {missing[0][1]} is analysed but not classified" if missing else
                f"layer {extra[0][0]}, head {extra[0][1]} is classified but not analysed")
        raise ValueError(f"classifications do not match the statistics ({len(missing)} heads missing, "
                         f"{len(extra)} unknown): {what}")


def validation_text(statistics, classifications, model_info, thresholds=None) -> str:
    """validation_report.txt: the summary, the head types, the agreement with the rules of the classifications'
    scheme, the legacy scheme's counts and the low-confidence heads."""
    scheme = "legacy" if any(c.head_type == "positional" for c in classifications) else "refined"
    rules = classify(statistics, scheme=scheme, thresholds=thresholds)
    text = summary_text(statistics, classifications, model_info)
    text += "\nHEAD TYPES\n" + "-" * 40 + "\n" + type_table(statistics, classifications)
    by_head = {(r.layer_idx, r.head_idx): r for r in rules}
    pairs = [(c, by_head[(c.layer_idx, c.head_idx)]) for c in classifications]
    changed = [(c, r) for c, r in pairs if c.head_type != r.head_type]
    agree = len(classifications) - len(changed)
    text += f"\nAGREEMENT WITH THE {scheme.upper()} RULES: {agree} of {len(classifications)} heads\n"
    text += "".join(f"  L{c.layer_idx:02d} H{c.head_idx:02d}: {c.head_type} -> {r.head_type}\n" for c, r in changed)
    legacy = summarize(classify(statistics, scheme="legacy", thresholds=thresholds))
    text += "\nLEGACY SCHEME (for the seed 004 ablation groups)\n" + "-" * 40 + "\n"
    text += "".join(f"  {k:<18}: {v:5d}\n" for k, v in legacy["type_distribution"].items())
    low_confidence = [c for c in classifications if c.confidence < 0.3]
    text += f"\nLOW-CONFIDENCE HEADS (< 0.3): {len(low_confidence)} of {len(classifications)}\n"
    text += "".join(f"  L{c.layer_idx:02d} H{c.head_idx:02d}  {c.head_type:<16} confidence {c.confidence:.2f}\n"
                    for c in low_confidence)
    return text


def write_validation(statistics, model_info, output_dir, classifications=None, thresholds=None) -> list[str]:
    """The validation figures and validation_report.txt of `classifications`; None classifies the statistics
    again (refined scheme, `thresholds`) and also writes refined_classifications.json.

    The report is composed before anything is written, and a directory this call creates is removed again if
    writing fails, so no half set of outputs is left (each file is written atomically)."""
    reclassified = classifications is None
    if reclassified:
        classifications = classify(statistics, scheme="refined", thresholds=thresholds)
    else:
        check_same_heads(statistics, classifications)
    text = validation_text(statistics, classifications, model_info, thresholds)
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    try:
        files = []
        if reclassified:
            save_classifications(classifications, os.path.join(output_dir, "refined_classifications.json"),
                                 "refined", thresholds)
            files.append("refined_classifications.json")
        files += validation_figures(statistics, classifications, output_dir, thresholds)
        write_text_atomic(os.path.join(output_dir, "validation_report.txt"), text)
    except BaseException:
        if created:  # everything in it is this call's
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return [*files, "validation_report.txt"]


class AttentionAnalyzer:
    """The seed's analyser (seed 002): text in, per-head statistics out."""

    def __init__(self, model, tokenizer, device="cpu", sink_size=4, local_window=8, recent_ratio=0.1, backend="auto"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.sink_size, self.local_window, self.recent_ratio = sink_size, local_window, recent_ratio
        self.backend = backend
        self.last_result: AnalysisResult | None = None

    def analyze(self, text: str, max_tokens: int = 2048, chunk_size: int = 512):
        """(statistics, refined classifications) of the first max_tokens tokens of `text`."""
        ids = torch.as_tensor(self.tokenizer(text)["input_ids"][:max_tokens])
        self.last_result = analyze(
            self.model, ids, sink_size=self.sink_size, local_window=self.local_window, recent_ratio=self.recent_ratio,
            chunk_size=chunk_size, backend=self.backend, model_name=getattr(self.model.config, "_name_or_path", None),
        )
        return self.last_result.statistics, classify(self.last_result.statistics)

    def classify_heads(self, statistics, scheme="refined"):
        return classify(statistics, scheme=scheme)

    def save_results(self, stats, classifications, output_dir) -> None:
        """head_statistics.json, head_classifications.json, the figures and analysis_summary.txt."""
        info = self.last_result.model_info if self.last_result else {}
        write_analysis(AnalysisResult(stats, info), output_dir, classifications=classifications)
