#!/usr/bin/env bash
# The call-length cap (max_call_seconds) on the issue's length mix at saturation: the
# continuous server (48 requests at 32 req/s, 16 steps per call) with the default cap of
# 0.25 s and with none (0), in turns (CAPS, default "0.25 0 0.25 0"; ~5 min quiet at
# pythia-70m). Writes experiments/serving/results_call_cap_<PRESET>.jsonl (replaced).
#
#   bash experiments/serving/call_cap.sh [PRESET]
#   CAPS="0.25 0" bash experiments/serving/call_cap.sh pythia-160m
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROMPT_LEN=32,512 OUTPUT_LEN=16,256 MAX_LEN=768 PREFILL_BUCKETS="(32, 64, 128, 256, 512)"
preset=${1:-pythia-70m}
out=experiments/serving/results_call_cap_$preset.jsonl
rm -f "$out"
for cap in ${CAPS:-0.25 0 0.25 0}; do
    MODEL_DIR=${BENCH_DIR:-/tmp/serving_bench}/$preset OUT_FILE=$out \
        SERVER_FLAGS="--config.steps_per_call=16 --config.max_call_seconds=$cap" \
        LABEL_SUFFIX=-cap-$cap bash experiments/serving/run.sh "$preset" 32 48 continuous
done
python - "$out" <<'PY'
import json, sys
sys.path.insert(0, "experiments/serving")
from plot import table
table([json.loads(line) for line in open(sys.argv[1]) if line.strip()])
PY
