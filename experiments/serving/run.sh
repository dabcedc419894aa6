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

serve() {  # serve <slots> <label>: start the server, run the load, stop it with SIGTERM
    python -m neox_jax.serve --config=configs/serve.py --config.checkpoint="$WORK/model" \
        --config.model_name="$PRESET" --config.num_slots="$1" --config.max_len=768 \
        --config.prefill_buckets="(32, 64, 128, 256, 512)" --config.max_queue=1000 \
        --config.port="$PORT" &
    local pid=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        kill -0 "$pid" || exit 1
        sleep 1
    done
    python experiments/serving/loadgen.py server --base-url="http://127.0.0.1:$PORT/v1" \
        --label="$2" --rates="$RATES" --requests="$REQUESTS" --out="$OUT"
    kill -TERM "$pid"
    wait "$pid"
}

serve 16 continuous-16-slots
serve 1 one-at-a-time
python experiments/serving/loadgen.py static --checkpoint="$WORK/model" --batch=16 \
    --rates="$RATES" --requests="$REQUESTS" --out="$OUT"
python experiments/serving/plot.py "$OUT"
