#!/usr/bin/env bash
# Stage B's reference (--option reference=stage-a|original|anchor), chosen per family on development halves of BOTH
# the objects and the styles suite, then reported once on the test halves. The rule, fixed before any development
# run: per family, the default becomes the reference with the highest mean of (objects dev H_o, styles dev H_s)
# among those that keep styles dev H_s ≥ stage A alone's and objects dev H_o ≥ today's default (stage-a) minus 0.005;
# if none qualifies, the default stays and the table says so. Each bench runs trace (stage-a), its two sweeps and
# stage A alone on the same seeds; --resume continues an interrupted run, one finished (class, variant) at a time.
#
#   bash benchmarks/reference_choice.sh dev            # toy-sd and toy-flux, objects and styles, ~6 h on 2 cores
#   MODELS=toy-sd bash benchmarks/reference_choice.sh dev
#   bash benchmarks/reference_choice.sh test     # trace (the chosen default), the old default, stage A alone
set -euo pipefail
half=${1:?usage: [MODELS="toy-sd toy-flux"] reference_choice.sh dev|test}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# dev: the candidates beside the default of the time (stage-a); test: the chosen per-kind default (trace) beside the
# old default, reported once
sweep="reference=original,anchor"
[ "$half" = test ] && sweep="reference=stage-a+eta=1"
for model in ${MODELS:-toy-sd toy-flux}; do
    for suite in toy-objects toy-styles; do
        trace-erase bench --model "$model" --suite "$suite" --concepts "$half" --seeds 10 \
            --methods trace,trace-closed-form --sweep "$sweep" \
            --output "benchmarks/results/reference-choice-$half-$model-${suite#toy-}" --resume &
    done
    wait
done
