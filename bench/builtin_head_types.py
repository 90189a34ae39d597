"""Record the built-in model's head types, as hk.analyze + hk.classify find them, in its model card.

    python bench/builtin_head_types.py      # after `python bench/train_builtin.py export`

Writes `head_types.json` beside the weights and a "Head types" section at the end of MODEL_CARD.md
(replacing an earlier one); tests/test_demo.py checks that the analysis still gives these counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import headkv_engine as hk
from headkv_engine import loading, zoo
from headkv_engine.files import write_text_atomic

# the model's trained context: 4 windows of BOS + 511 tokens, as the ablation's analysis reads them
WINDOW_TOKENS, WINDOWS = 512, 4
HEADING = "## Head types (hk.analyze on heldout.txt)"


def head_types() -> dict:
    model, tokenizer = hk.load_builtin_model()
    ids = loading.encode_windows(tokenizer, zoo.heldout_text(), WINDOW_TOKENS, WINDOWS, builtin=True)
    result = hk.analyze(model, ids, chunk_size=512, progress=False, model_name="headkv-builtin")
    counts = Counter(c.head_type for c in hk.classify(result.statistics))
    return {"tokens": sum(int(row.numel()) for row in ids), "windows": len(ids), "sink_size": 4, "local_window": 8,
            "scheme": "refined", "counts": dict(sorted(counts.items())),
            "max_sink_ratio": max(s.sink_ratio for s in result.statistics),
            "max_local_ratio": max(s.position_preference["local"] for s in result.statistics)}


def main():
    types = head_types()
    write_text_atomic(os.path.join(zoo.BUILTIN_DIR, "head_types.json"), json.dumps(types, indent=2) + "\n")
    card_path = os.path.join(zoo.BUILTIN_DIR, "MODEL_CARD.md")
    with open(card_path, encoding="utf-8") as f:
        card = f.read().split(HEADING)[0].rstrip() + "\n"
    rows = "\n".join(f"| {kind} | {count} |" for kind, count in types["counts"].items())
    card += (f"\n{HEADING}\n\nThe first {types['windows']} windows of {types['tokens'] // types['windows']} tokens "
             "(BOS first) of heldout.txt, sink size 4, local window 8, the refined scheme of SPEC 6:\n\n"
             f"| type | heads |\n|---|---|\n{rows}\n\nLargest sink ratio "
             f"{types['max_sink_ratio']:.3f}; largest local ratio {types['max_local_ratio']:.3f}.\n")
    write_text_atomic(card_path, card)
    print(json.dumps(types, indent=2))


if __name__ == "__main__":
    main()
