"""The engine's ops: each a dispatcher over backends plus its PyTorch reference."""

from headkv_engine.ops.append import append, append_reference
from headkv_engine.ops.decode import decode_attention, decode_attention_reference
from headkv_engine.ops.prefill import prefill_attention, prefill_attention_reference
from headkv_engine.ops.statistics import head_statistics, head_statistics_reference

__all__ = [
    "append",
    "append_reference",
    "decode_attention",
    "decode_attention_reference",
    "head_statistics",
    "head_statistics_reference",
    "prefill_attention",
    "prefill_attention_reference",
]
