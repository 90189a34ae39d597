#!/usr/bin/env bash
# Every GPU check in one run, sized for one device call of at most 10 minutes (the limits below add up to 565 s):
# the CUDA tests, the kernel benchmark (and its tables for RESULTS.md), a reduced decode launch sweep, the
# pytest-benchmark kernel microbenchmarks,
# `headkv bench` of every method on the built-in model on CUDA, and the end-to-end decode step of a 4-layer
# pythia-2.8b-attention GPTNeoX, patched vs unpatched. Logs, CSVs and tables go to $OUT (or ./gpu-out).
#
#   HEADKV_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
#
# Expects python3 with torch (CUDA), triton, pytest and pytest-benchmark. A transformers wheel of the pinned range, where the machine's is
# older, can be put in .whl/ beside the checkout; it is installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'commit', '${HEADKV_COMMIT:-unknown}')"
} 2>&1 | tee "$OUT/log.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/log.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/log.txt"
    [ "$rc" -eq 0 ] || status=1
}

# correctness on fixed tiles (tuning every test shape's key would take longer than the tests; the tuned launches
# have their own tests, and the benchmarks below tune)
HEADKV_TRITON_AUTOTUNE=0 step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_ops.py
step kernels 220 python3 bench/gpu_kernels.py --csv "$OUT/gpu_kernels.csv" --force
[ -f "$OUT/gpu_kernels.csv" ] && python3 bench/gpu_report.py "$OUT/gpu_kernels.csv" >"$OUT/gpu_kernels.md"
step sweep 60 python3 bench/gpu_decode_sweep.py --chunks 64 256 1024 --blocks 32 64 --warps 2 4
step microbench 45 python3 -m pytest -q -p no:cacheprovider bench/bench_triton_kernels.py --benchmark-only \
    --benchmark-group-by=param:case --benchmark-columns=min,median,mean,stddev,rounds
analysis=bench/results/builtin/analysis
step bench 60 python3 -m headkv_engine.cli bench --compare-all --statistics $analysis/head_statistics.json \
    --classifications $analysis/head_classifications.json --budget 64 --num-samples 2 --max-tokens 1024 \
    --max-new-tokens 32 --device cuda --output-dir /tmp/bench_builtin --force
cp /tmp/bench_builtin/bench_results.csv /tmp/bench_builtin/bench_results.md "$OUT/" 2>/dev/null
step e2e 60 python3 bench/e2e_decode.py --device cuda --layers 4 --contexts 8192 32768 --new-tokens 16 \
    --csv "$OUT/e2e_decode_cuda.csv"
# $OUT: log.txt, gpu_kernels.csv / .md, bench_results.csv / .md, e2e_decode_cuda.csv (a device call returns <= 8 files)
exit $status
