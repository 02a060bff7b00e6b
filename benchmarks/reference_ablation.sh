#!/usr/bin/env bash
# TRACE stage B's reference model (issue 16): stage-a (θ*, the model after stage A) vs original (θ0), chosen on the
# toy classes' development half and checked on the test half. Two 1-thread processes per half run side by side on a
# 2-core machine; benchmarks/merge_bench.py --relabel makes their rows one table (+ figures, report.html).
#
#   bash benchmarks/reference_ablation.sh dev                  # toy-sd, ~40 min on 2 cores (variants in parallel)
#   bash benchmarks/reference_ablation.sh test
#   MODEL=toy-flux bash benchmarks/reference_ablation.sh test   # ~25 min
set -euo pipefail
half=${1:?usage: [MODEL=toy-sd|toy-flux] reference_ablation.sh dev|test}
model=${MODEL:-toy-sd}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
methods=trace
[[ $half == test ]] && methods=trace,trace-closed-form   # stage A alone as well, on the reported half
trace-erase bench --model "$model" --methods "$methods" --concepts "$half" --seeds 5 \
    --output "out/$model-$half-ref-stage-a" --overwrite &
trace-erase bench --model "$model" --methods trace --option reference=original --concepts "$half" --seeds 5 \
    --output "out/$model-$half-ref-original" --overwrite &
wait
python benchmarks/merge_bench.py "out/$model-$half-ref-stage-a/bench.json" "out/$model-$half-ref-original/bench.json" \
    --relabel --output "benchmarks/results/reference-$half-$model" --overwrite
