#!/usr/bin/env bash
# Every Apple GPU check in one run, for a Mac with an installed checkout (pip install -e ".[test]"):
# the Metal tests on the GPU (tests/test_metal_ops.py runs on MPS where it is present, including `xcrun metal`
# where Apple's compiler is installed), then the kernel benchmark. Log and CSV go to $OUT (or ./mps-out).
#
#   bash bench/mps_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-mps-out}
mkdir -p "$OUT"
{
    sw_vers 2>/dev/null
    sysctl -n machdep.cpu.brand_string 2>/dev/null
    python3 -c "import torch; print('torch', torch.__version__, 'mps', torch.backends.mps.is_available())"
    git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$OUT/log.txt"
status=0
python3 -m pytest -q tests/test_metal_ops.py 2>&1 | tee -a "$OUT/log.txt" || status=1
python3 bench/mps_kernels.py --csv "$OUT/mps_kernels.csv" --force 2>&1 | tee -a "$OUT/log.txt" || status=1
exit $status
