#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent machine (see docs/benchmarks.md, "GPU"):
#   the compiled Triton kernels and the engine on CUDA (tests/engine/test_cuda.py), paged attention
#   against contiguous SDPA, and offline throughput against transformers. Logs go to ${OUT:-/tmp}.
set -u
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (gguf), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts= tests/engine/test_cuda.py 2>&1 \
  | tee "$OUT/pytest-cuda.log" | tail -40
[ -n "${SKIP_ATTENTION:-}" ] || timeout 150 python3 bench/attention_kernels.py --batch 1 16 64 --context 512 4096 --num-heads 32 \
  --num-kv-heads 8 --head-dim 128 2>&1 | tee "$OUT/attention-kernels.txt"
timeout "${OFFLINE_TIMEOUT:-240}" python3 -m bench.gpu_offline --out "$OUT/bench-gpu.json" 2>&1 | tail -40
