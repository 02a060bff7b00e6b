#!/usr/bin/env bash
# TRACE stage B's reference model (issue 16): stage-a (θ*, the model after stage A) vs original (θ0), chosen on the
# toy classes' development half and checked on the test half. Two 1-thread processes per half run side by side on a
# 2-core machine; benchmarks/merge_bench.py --relabel makes their rows one table (+ figures, report.html).
#
#   bash benchmarks/reference_ablation.sh dev    # ~40 min on 2 cores (both variants in parallel)
#   bash benchmarks/reference_ablation.sh test
set -euo pipefail
half=${1:?usage: reference_ablation.sh dev|test}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
methods=trace
[[ $half == test ]] && methods=trace,trace-closed-form   # stage A alone as well, on the reported half
trace-erase bench --model toy-sd --methods "$methods" --concepts "$half" --seeds 5 \
    --output "out/$half-ref-stage-a" --overwrite &
trace-erase bench --model toy-sd --methods trace --option reference=original --concepts "$half" --seeds 5 \
    --output "out/$half-ref-original" --overwrite &
wait
python benchmarks/merge_bench.py "out/$half-ref-stage-a/bench.json" "out/$half-ref-original/bench.json" --relabel \
    --output "benchmarks/results/reference-$half-toy-sd" --overwrite
