#!/usr/bin/env bash
# Stage A's preserve set for trace on latent diffusion: automatic neighbours (neighbours=N, engines/neighbours.py)
# and generic attribute contexts (attribute_contexts=true), chosen on the development halves of toy-sd's objects and
# styles, then reported once on the test halves (it lost there, and was not adopted: docs/benchmarks/neighbours.md).
# The rule, written after the development runs and before the test run: adopt a variant as the ddpm
# default when its paired objects dev H_o gain over the default of the time (reference=anchor, eta 0.5) is clear of 0
# and its styles dev H_s is not clearly below it; among those, the lower objects dev Acc_comp. The class-blind rows
# repeat the chosen variant with a word list that holds none of the toy world's class names, synonyms or sub-word
# pieces (benchmarks/class_blind_vocab.py), because the toy tokenizer's whole words are mostly the toy world's own.
# Every bench runs stage A alone beside the sweep on the same seeds; --resume continues an interrupted one.
#
#   bash benchmarks/neighbours_choice.sh dev     # ~3 h on 2 cores
#   bash benchmarks/neighbours_choice.sh test    # the chosen variant on the test halves, ~40 min
set -euo pipefail
half=${1:?usage: neighbours_choice.sh dev|test}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
out=benchmarks/results
chosen="neighbours=8+attribute_contexts=true"
blind="$chosen+neighbour_vocab=benchmarks/data/toy-sd-vocab-class-blind.txt"
bench() { trace-erase bench --model "$1" --suite "$2" --concepts "$half" --seeds 10 --methods trace-closed-form \
    "${@:4}" --output "$out/$3" --resume; }
if [ "$half" = dev ]; then
    python benchmarks/class_blind_vocab.py --output benchmarks/data/toy-sd-vocab-class-blind.txt
    bench toy-sd toy-objects neighbours-dev-toy-sd-objects --sweep "neighbours=8,neighbours=8+rho=0.5" &
    bench toy-sd toy-styles neighbours-dev-toy-sd-styles --sweep "neighbours=8,$chosen" &
    wait
    bench toy-sd toy-objects neighbours2-dev-toy-sd-objects --sweep "$chosen,neighbours=16" &
    bench toy-sd toy-objects attribute-contexts-dev-toy-sd-objects --sweep "attribute_contexts=true" &
    wait
    bench toy-sd toy-objects neighbours-class-blind-dev-toy-sd-objects --sweep "$blind" &
    bench toy-sd toy-styles neighbours-class-blind-dev-toy-sd-styles --sweep "$blind" &
    wait
    # stage A alone with neighbours (does trace-closed-form want them?), and the same option on rectified flow
    bench toy-sd toy-objects neighbours-stage-a-dev-toy-sd-objects --option neighbours=8 &
    bench toy-flux toy-objects neighbours-dev-toy-flux-objects --sweep "neighbours=8" &
    wait
else
    bench toy-sd toy-objects neighbours-test-toy-sd-objects --sweep "$chosen" &
    bench toy-sd toy-styles neighbours-test-toy-sd-styles --sweep "$chosen" &
    wait
fi
