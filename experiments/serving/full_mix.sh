#!/usr/bin/env bash
# The issue's length mix (prompts 32-512, outputs 16-256, 768-token slots) at saturation
# (48 requests at 32 req/s) on both CPU shapes, for a quiet machine (~10 min on 2 cores):
# the continuous server (16 slots, up to 16 decode steps per call) and static batches of
# 16 in turns (ROUNDS_70M / ROUNDS_160M rounds), then the same server with one slot and
# transformers' generate, one request at a time, on the first SERIAL_REQUESTS requests.
# Writes experiments/serving/results_full_mix_quiet_<preset>.jsonl (replaced) and prints
# compare.py's tables.
#
#   bash experiments/serving/full_mix.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROMPT_LEN=32,512 OUTPUT_LEN=16,256 MAX_LEN=768
export PREFILL_BUCKETS="(32, 64, 128, 256, 512)" SERVER_FLAGS=--config.steps_per_call=16
export SERIAL_REQUESTS=${SERIAL_REQUESTS:-8}
for spec in pythia-70m:${ROUNDS_70M:-2} pythia-160m:${ROUNDS_160M:-1}; do
    IFS=: read -r preset rounds <<<"$spec"
    out=experiments/serving/results_full_mix_quiet_$preset.jsonl
    rm -f "$out"
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/$preset OUT_FILE=$out ROUNDS=$rounds \
        bash experiments/serving/run.sh "$preset" 32 48 alternate,one-at-a-time,transformers
    python experiments/serving/compare.py "$out"
done
