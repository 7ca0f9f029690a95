#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent machine (see docs/benchmarks.md, "GPU"). STEPS picks
# among (default: all, in this order):
#   tests      the compiled Triton kernels and the engine on CUDA (tests/engine/test_cuda.py)
#   sweep      every prefill tile configuration of the paged kernel at two shapes (bench/attention_kernels.py)
#   attention  paged attention against FlashAttention-backed SDPA on contiguous K/V, decode and prefill
#   decode     single-stream decode of an 8B-shaped model against the memory-bandwidth bound (bench.gpu_decode)
#   host       the engine's host time per step at 1, 32 and 256 sequences of a 0.5B model (bench.host_overhead)
#   offline    0.5B offline throughput against transformers (bench.gpu_offline)
# Logs go to ${OUT:-/tmp/pagoda-gpu}.
set -u
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
STEPS=" ${STEPS:-tests sweep attention decode host offline} "
has() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Packages the GPU image lacks (gguf, llguidance) or holds in another version than `make test` installs
# (transformers, whose gpt-oss reference differs in 5.17), carried as wheels: see docs/benchmarks.md, "GPU".
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() { echo "=== $1 $(date +%T)"; }
if has tests; then
  step tests
  timeout "${TEST_TIMEOUT:-360}" python3 -m pytest -q -p no:cacheprovider -o addopts= -rf tests/engine/test_cuda.py 2>&1 \
    | tee "$OUT/pytest-cuda.log" | tail -25
fi
if has sweep; then
  step sweep
  for shape in "--batch 1 --context 4096" "--batch 16 --context 1024"; do
    # shellcheck disable=SC2086
    timeout 75 python3 bench/attention_kernels.py --mode prefill $shape --sweep 2>&1 | tee -a "$OUT/attention-sweep.txt" \
      | grep '^prefill' | sort -k4,4g | head -6  # the fastest; the whole sweep is in the log
  done
fi
if has attention; then
  step attention
  timeout 90 python3 bench/attention_kernels.py --batch 1 16 64 --context 512 4096 --num-heads 32 \
    --num-kv-heads 8 --head-dim 128 2>&1 | tee "$OUT/attention-kernels.txt"
fi
if has decode; then
  step decode
  # DECODE_PROFILE=N: also the kernels' device time per token over an N-token generation
  timeout 150 python3 -m bench.gpu_decode --repeats "${DECODE_REPEATS:-3}" --out "$OUT/gpu-decode.json" ${DECODE_PROFILE:+--profile "$DECODE_PROFILE"} \
    2>&1 | tail -45
fi
if has host && [ -f bench/host_overhead.py ]; then
  step host
  # the embedded model's package is not on the GPU machine: its tokenizer travels in .gpu/tokenizer
  timeout 110 python3 -m bench.host_overhead --device cuda --shape qwen0.5b --batch 1 32 256 \
    ${BENCH_TOKENIZER:+--tokenizer "$BENCH_TOKENIZER"} 2>&1 \
    | tee "$OUT/host-overhead.txt" | tail -25
fi
if has offline; then
  step offline
  timeout "${OFFLINE_TIMEOUT:-240}" python3 -m bench.gpu_offline --out "$OUT/bench-gpu.json" 2>&1 | tail -40
fi
step done
