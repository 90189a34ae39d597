"""Head analysis: per-head attention statistics, classification, figures and reports (SPEC 5-6)."""

from headkv_engine.analysis.analyzer import AnalysisResult, analyze
from headkv_engine.analysis.classify import (
    HeadClassification,
    HeadType,
    Thresholds,
    classify,
    load_classifications,
    save_classifications,
)
from headkv_engine.analysis.layer_loss import load_layer_losses, measure_layer_losses
from headkv_engine.analysis.report import AttentionAnalyzer, write_analysis, write_validation
from headkv_engine.analysis.statistics import HeadStatistics, load_statistics

__all__ = [
    "AnalysisResult",
    "AttentionAnalyzer",
    "HeadClassification",
    "HeadStatistics",
    "HeadType",
    "Thresholds",
    "analyze",
    "classify",
    "load_classifications",
    "load_layer_losses",
    "load_statistics",
    "measure_layer_losses",
    "save_classifications",
    "write_analysis",
    "write_validation",
]
