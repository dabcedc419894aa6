#!/usr/bin/env bash
# Continuous batching against one request at a time on the issue's length mix (prompts
# 32-512, outputs 16-256, 768-token slots): the arithmetic, then the servers.
#
# 1. amdahl.py on both CPU shapes (in process, ~2 min each on 2 quiet cores): per-token
#    prefill and per-step decode costs at 1/16/24/32 slots, hence the bound on
#    continuous / one at a time, for the prompt buckets of full_mix.sh and finer ones;
#    writes experiments/serving/amdahl_<preset>.json.
# 2. SERVERS=1 (default; 0 skips, ~4 min on 2 quiet cores): pythia-70m, 48 requests at
#    32 req/s: the continuous server as full_mix.sh runs it (16 slots, max_call_seconds
#    0.25) and with the session's levers (32 slots, no call cap, buckets 192 and 384
#    added), then one at a time with the same flags on the first 8 requests (their
#    one-slot tokens/s is within 1% of all 48's: amdahl.py); writes
#    experiments/serving/results_four_x_pythia-70m.jsonl and prints compare tables.
#
#   bash experiments/serving/four_x.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
for preset in pythia-70m pythia-160m; do
    python experiments/serving/amdahl.py "$preset" --rounds=2 \
        --json="experiments/serving/amdahl_$preset.json" | sed -n '/^$/,$p'
done
[[ ${SERVERS:-1} == 1 ]] || exit 0
export PROMPT_LEN=32,512 OUTPUT_LEN=16,256 MAX_LEN=768 SERIAL_REQUESTS=8
export MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/pythia-70m
export OUT_FILE=experiments/serving/results_four_x_pythia-70m.jsonl
rm -f "$OUT_FILE"
PREFILL_BUCKETS="(32, 64, 128, 256, 512)" SERVER_FLAGS="--config.steps_per_call=16" SLOTS=16 \
    bash experiments/serving/run.sh pythia-70m 32 48 continuous
PREFILL_BUCKETS="(32, 64, 128, 192, 256, 384, 512)" SLOTS=32 LABEL_SUFFIX=-levers \
    SERVER_FLAGS="--config.steps_per_call=16 --config.max_call_seconds=0" \
    bash experiments/serving/run.sh pythia-70m 32 48 continuous,one-at-a-time
python experiments/serving/compare.py "$OUT_FILE"
