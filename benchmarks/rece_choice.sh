#!/usr/bin/env bash
# RECE-style rounds of TRACE's stage A (--option rece_rounds=N; issues 16 and 19): variants run on one toy half and
# merged (merge_bench.py --relabel --concepts) with the defaults' rows of the all-classes side-by-side benches in
# benchmarks/results/, so the defaults are not rerun. The rule, fixed before the toy-sd development runs: the rounds
# are chosen on toy-flux's development half with stage A alone among 1, 2, 4 (highest H_o; a tie goes to fewer); they
# become the stage-A default only if `trace` with them has a higher development H_o than the default on both models.
#
#   bash benchmarks/rece_choice.sh dev     # ~45 min on 2 cores
#   bash benchmarks/rece_choice.sh test    # ~25 min
set -euo pipefail
half=${1:?usage: rece_choice.sh dev|test}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
run() {  # model, output name, bench arguments...
    local model=$1 name=$2; shift 2
    trace-erase bench --model "$model" --concepts "$half" --seeds 5 --output "out/rece-$half-$model-$name" \
        --overwrite "$@"
}
if [[ $half == dev ]]; then
    (for r in 1 2 4; do run toy-flux "tcf-$r" --methods trace-closed-form --option rece_rounds=$r; done
     run toy-sd tcf-2 --methods trace-closed-form --option rece_rounds=2) &
    (run toy-flux trace-2 --methods trace --option rece_rounds=2
     run toy-sd trace-2 --methods trace --option rece_rounds=2) &
    wait
    flux=(out/rece-dev-toy-flux-{tcf-1,tcf-2,tcf-4,trace-2}/bench.json)
    sd=(out/rece-dev-toy-sd-{trace-2,tcf-2}/bench.json)
else
    run toy-flux both-2 --methods trace,trace-closed-form --option rece_rounds=2 &
    run toy-sd tcf-2 --methods trace-closed-form --option rece_rounds=2 &
    wait
    flux=(out/rece-test-toy-flux-both-2/bench.json)
    sd=(out/rece-test-toy-sd-tcf-2/bench.json)
fi
for model in toy-flux toy-sd; do
    [[ $model == toy-flux ]] && runs=("${flux[@]}") || runs=("${sd[@]}")
    python benchmarks/merge_bench.py "benchmarks/results/side-by-side-all-$model/bench.json" "${runs[@]}" \
        --relabel --concepts "$half" --output "benchmarks/results/rece-choice-$half-$model" --overwrite
done
