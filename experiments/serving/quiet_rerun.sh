#!/usr/bin/env bash
# The headline comparison for a quiet machine (about 8-9 minutes on 2 cores): the
# continuous-batching server (16 slots of 192 tokens, up to 16 decode steps per call) and
# static batches of 16 (in-process Generator.generate) in turns on the same seeded
# workloads, at 4 requests/s (the earlier sessions' rate, which a quiet machine nearly
# keeps up with) and at 32 requests/s (every request arrives within 0.5-1.5 s:
# saturation): pythia-70m with 16 and 48 requests, two rounds (continuous, static,
# continuous, static), and pythia-160m with 48 requests, one round; then pythia-70m on
# the issue's length mix (prompts 32-512, outputs 16-256; 768-token slots), 48 requests
# at 32 req/s, one round (results_quiet4_full_mix_pythia-70m.jsonl).
# Writes experiments/serving/results_quiet4_<preset>.jsonl (replaced) and prints the
# tables of compare.py for README.md's "Fourth session" section.
#
#   bash experiments/serving/quiet_rerun.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
for spec in pythia-70m:2:16,48 pythia-160m:1:48; do
    IFS=: read -r preset rounds requests <<<"$spec"
    out=experiments/serving/results_quiet4_$preset.jsonl
    rm -f "$out"
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/$preset OUT_FILE=$out ROUNDS=$rounds \
        SERVER_FLAGS=--config.steps_per_call=16 \
        bash experiments/serving/run.sh "$preset" 4,32 "$requests" alternate
    python experiments/serving/compare.py "$out"
done
out=experiments/serving/results_quiet4_full_mix_pythia-70m.jsonl
rm -f "$out"
MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/pythia-70m OUT_FILE=$out ROUNDS=1 \
    PROMPT_LEN=32,512 OUTPUT_LEN=16,256 MAX_LEN=768 PREFILL_BUCKETS="(32, 64, 128, 256, 512)" \
    SERVER_FLAGS=--config.steps_per_call=16 \
    bash experiments/serving/run.sh pythia-70m 32 48 alternate
python experiments/serving/compare.py "$out"
