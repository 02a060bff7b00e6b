#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent GPU machine (whose python3 already has torch):
#   1. tests/test_gpu.py (CUDA, bf16, offload: skipped everywhere else)
#   2. benchmarks/real_scale.py on CUDA: SD-1.4 and SDXL architectures, peak GPU memory per method
#   3. a toy-sd bench of trace in bf16 on the GPU, to set against the fp32 CPU table
# Each step has its own time limit, so one that hangs leaves the others their time. Usage:
#   benchmarks/gpu_check.sh OUT_DIR [REAL_SCALE_SECONDS] [BENCH_SECONDS]
# Wheels in .whl/ (diffusers, transformers, peft: versions the machine's image lacks) are installed first if present.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [REAL_SCALE_SECONDS] [BENCH_SECONDS]}
real_s=${2:-300}
bench_s=${3:-120}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1
echo "== 1. tests/test_gpu.py"
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "Writing model shards" \
  | tee "$out/test_gpu.log" | grep -E "^\[|passed|failed|Error|error" | head -60
echo "== 2. real_scale.py on CUDA"
timeout "$real_s" python3 benchmarks/real_scale.py --iters 5 --threads 8 --case-timeout 120 --cache /tmp/real-scale \
  --json "$out/real_scale_cuda.json" 2>&1 | tail -40
echo "== 3. toy-sd bench, trace, bf16 on the GPU"
timeout "$bench_s" python3 -m trace_erase.cli bench --model toy-sd --methods trace --concepts circle,triangle,cross \
  --seeds 5 --device cuda --dtype bf16 --output /tmp/bench-gpu 2>&1 | grep -vE "it/s|s/it" | tail -15
for f in /tmp/bench-gpu/bench.json /tmp/bench-gpu/bench.md; do [ -f "$f" ] && cp "$f" "$out/"; done
[ -d /tmp/bench-gpu.partial ] && tar -C /tmp -czf "$out/bench-gpu-partial.tgz" bench-gpu.partial/rows 2>/dev/null
ls -la "$out"
