#!/usr/bin/env bash
# Everything this project measures on a GPU, as one command (a lent GPU machine is short-lived):
#   1. benchmarks/check_cuda.py: the fast engine's CUDA-graph path against eager, nnsight and a hook loop;
#   2. benchmarks/bench_decode.py --preset qwen2.5-7b: decode throughput and peak memory, all methods.
# Results go to $OUT (default benchmarks/results). Wheels in .whl/ (packages the GPU image lacks, e.g.
# nnsight) are installed to /tmp/site first. BUDGET_S: seconds after which the bench starts no new
# method group (the compiled HF baseline, slowest to set up, runs last); METHODS: the bench's methods
# (default: all but fast_compiled); TAG: a suffix for the result file names.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    if ! python3 -c "import transformers" 2>/dev/null; then
        rm -rf /tmp/site/transformers*
        echo "the carried transformers does not import here; using the image's"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, nnsight; print('torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)"
timeout "${CHECK_TIMEOUT:-150}" python3 benchmarks/check_cuda.py --out "$OUT/check_cuda.json" 2>&1 | tee "$OUT/check_cuda.log" | grep -E "PASS|FAIL|passed|Error" 
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_decode.py --preset qwen2.5-7b --budget-s "${BUDGET_S:-200}" \
    --methods ${METHODS:-hf_eager hf_static_compile hook_loop nnsight nnsight_eager fast} \
    --out "$OUT/decode_qwen2.5-7b_cuda${TAG:-}.json" 2>&1 | tee "$OUT/bench_decode${TAG:-}.log"
