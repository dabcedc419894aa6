#!/usr/bin/env bash
# The fifth session's headline on a quiet machine (about 5-6 minutes on 2 cores): the
# continuous-batching server with prefill mixed into its decode calls (16 slots of 192
# tokens, prefill chunks of 64 tokens, the default 16 steps per call) against static
# batches of 16 (in-process Generator.generate), in turns on the same seeded workloads
# at saturation (32 requests/s: every request arrives within ~1.5 s), the
# quarter-length workload (prompts 32-128, outputs 16-64): pythia-70m with 48 requests,
# two rounds (continuous, static, continuous, static), and pythia-160m with 48 requests,
# one round. FULL_MIX=1 adds pythia-70m on the issue's length mix (prompts 32-512,
# outputs 16-256; 768-token slots), one round (about 3 more minutes).
# Writes experiments/serving/results_quiet5_<preset>.jsonl (replaced) and prints the
# tables of compare.py for README.md's "Fifth session" section.
#
#   bash experiments/serving/quiet_mixed.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
for spec in pythia-70m:2 pythia-160m:1; do
    IFS=: read -r preset rounds <<<"$spec"
    out=experiments/serving/results_quiet5_$preset.jsonl
    rm -f "$out"
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/$preset OUT_FILE=$out ROUNDS=$rounds \
        SERVER_FLAGS=--config.prefill_chunk=64 \
        bash experiments/serving/run.sh "$preset" 32 48 alternate
    python experiments/serving/compare.py "$out"
done
if [[ ${FULL_MIX:-0} == 1 ]]; then
    out=experiments/serving/results_quiet5_full_mix_pythia-70m.jsonl
    rm -f "$out"
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/pythia-70m OUT_FILE=$out ROUNDS=1 \
        PROMPT_LEN=32,512 OUTPUT_LEN=16,256 MAX_LEN=768 PREFILL_BUCKETS="(32, 64)" \
        SERVER_FLAGS=--config.prefill_chunk=64 \
        bash experiments/serving/run.sh pythia-70m 32 48 alternate
    python experiments/serving/compare.py "$out"
fi
