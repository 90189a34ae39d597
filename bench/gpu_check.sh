#!/usr/bin/env bash
# Every GPU check in one run, sized for one device call of at most 10 minutes (about 8 here on an H100/H200):
# the CUDA tests, the kernel benchmark and a reduced decode launch sweep. Logs and CSVs go to $OUT (or ./gpu-out).
#
#   HEADKV_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
#
# Expects python3 with torch (CUDA) and triton. A transformers wheel of the pinned range, where the machine's is
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
} 2>&1 | tee "$OUT/versions.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_ops.py
step kernels 270 python3 bench/gpu_kernels.py --csv "$OUT/gpu_kernels.csv" --force
step sweep 90 python3 bench/gpu_decode_sweep.py --chunks 64 256 1024 --blocks 32 64 --warps 2 4
exit $status
