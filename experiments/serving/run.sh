#!/usr/bin/env bash
# The serving benchmark on one machine: continuous batching (16 slots), one request at a
# time (1 slot) and static batches of 16, on the same seeded Poisson workload.
#
#   bash experiments/serving/run.sh [PRESET] [RATES] [REQUESTS]
#   bash experiments/serving/run.sh pythia-70m 0.5,1,2,4,8 200
#
# Random weights of the preset's shape (speed does not depend on the values). Results
# are appended to experiments/serving/results_<PRESET>.jsonl; plot.py draws them.
# Run it on an otherwise idle machine: timings under other load mean nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${1:-pythia-70m}
RATES=${2:-0.5,1,2,4,8}
REQUESTS=${3:-200}
PORT=${PORT:-8765}
OUT=experiments/serving/results_${PRESET}.jsonl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python - "$PRESET" "$WORK/model" <<'PY'
import sys
import jax
from neox_jax.convert import save_hf
from neox_jax.model import PRESETS, ModelConfig, init_params

config = ModelConfig(**PRESETS[sys.argv[1]])
save_hf(config, init_params(config, jax.random.key(0)), sys.argv[2])
PY

serve() {  # serve <slots> <label> [loadgen flags] [-- server flags]: run the load, SIGTERM
    local slots=$1 label=$2
    shift 2
    local load=() server=()
    while (($#)); do
        if [[ $1 == -- ]]; then shift; server=("$@"); break; fi
        load+=("$1"); shift
    done
    python -m neox_jax.serve --config=configs/serve.py --config.checkpoint="$WORK/model" \
        --config.model_name="$PRESET" --config.num_slots="$slots" --config.max_len=1024 \
        --config.prefill_buckets="(32, 64, 128, 256, 512)" --config.max_queue=1000 \
        --config.port="$PORT" "${server[@]}" &
    local pid=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        kill -0 "$pid" || exit 1
        sleep 1
    done
    python experiments/serving/loadgen.py server --base-url="http://127.0.0.1:$PORT/v1" \
        --label="$label" --rates="$RATES" --requests="$REQUESTS" --out="$OUT" "${load[@]}"
    kill -TERM "$pid"
    wait "$pid"
}

serve 16 continuous-16-slots
serve 1 one-at-a-time
python experiments/serving/loadgen.py static --checkpoint="$WORK/model" --batch=16 \
    --rates="$RATES" --requests="$REQUESTS" --out="$OUT"
# Time to first token with and without prefix caching: every prompt starts with the same
# 256 tokens (a system prompt); chunks of 256, so the shared part is one cached block.
serve 16 shared-prefix-no-cache --shared-prefix=256 -- --config.prefill_chunk=256
serve 16 shared-prefix-cached --shared-prefix=256 -- --config.prefill_chunk=256 \
    --config.prefix_cache_blocks=16
python experiments/serving/plot.py "$OUT"
