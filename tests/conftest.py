import os
import sys

import torch

# Triton kernels run on CPU under the interpreter; the switch must be set before triton is first imported
# (transformers may import it while the test modules load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ holds shared helpers (reference_model.py) imported by the test modules.
sys.path.insert(0, os.path.dirname(__file__))
