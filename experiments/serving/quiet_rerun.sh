#!/usr/bin/env bash
# The headline comparison for a quiet machine (about 8 minutes on 2 cores): the
# continuous-batching server (16 slots of 192 tokens, 4 decode steps per call) and static
# batches of 16 (in-process Generator.generate) in turns on the same seeded workloads at
# saturation (4 req/s): pythia-70m with 16 and 48 requests, two rounds
# (continuous, static, continuous, static), and pythia-160m with 16 and 48, one round.
# Writes experiments/serving/results_quiet_<preset>.jsonl (replaced) and prints the
# tables of compare.py for README.md's "Quiet rerun" section.
#
#   bash experiments/serving/quiet_rerun.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
for spec in pythia-70m:2 pythia-160m:1; do
    preset=${spec%:*}
    out=experiments/serving/results_quiet_$preset.jsonl
    rm -f "$out"
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/$preset OUT_FILE=$out ROUNDS=${spec#*:} \
        SERVER_FLAGS=--config.steps_per_call=4 \
        bash experiments/serving/run.sh "$preset" 4 16,48 alternate
    python experiments/serving/compare.py "$out"
done
