#!/usr/bin/env bash
# The serving benchmark on one machine: continuous batching (16 slots), one request at a
# time (1 slot), static batches of 16, transformers one at a time, and prefix caching,
# on the same seeded Poisson workload.
#
#   bash experiments/serving/run.sh [PRESET] [RATES] [REQUESTS] [MODES]
#   bash experiments/serving/run.sh pythia-70m 0.25,1,4 16
#   bash experiments/serving/run.sh pythia-70m 0.25,1,4 16 continuous,static
#
# MODES: any of continuous, one-at-a-time, static, transformers, prefix (default all),
# or alternate: the continuous server and static batches in turns (server, static,
# server, ...; ROUNDS times, default 2) on each of the REQUESTS (comma-separated) workloads.
# The one-at-a-time modes (one-at-a-time, transformers) run at the highest rate only:
# they saturate below every rate here, and their throughput is then their capacity.
# Environment:
#   PROMPT_LEN (default 32,128), OUTPUT_LEN (16,64): token counts, uniform in the range;
#   SERIAL_REQUESTS (REQUESTS): requests for the one-at-a-time modes and each
#     prefix-cache run (fewer keep a slow machine's run short);
#   PREFILL_BUCKETS ("(32, 64, 128)"): the server's prompt buckets (longer prompts take
#     MAX_LEN);
#   SLOTS (16), PORT (8765); MAX_LEN (192): the server's tokens per request (cache
#     columns per slot, as many as the static baseline's cache: the longest prompt's
#     bucket + the longest output; the prefix-cache runs use 512);
#   MODEL_DIR: serve this model folder (random weights are written there if it holds no
#     config.json; default a temporary folder);
#   OUT_FILE: the JSON lines file (default experiments/serving/results_<PRESET>.jsonl);
#   SERVER_FLAGS: extra --config.* flags for the server, e.g.
#     "--config.tensor_parallel=8 --config.dtype=bfloat16" on a GPU/TPU host, and
#   STATIC_FLAGS: the same for the static baseline ("--tensor-parallel=8 --dtype=bfloat16");
#   LABEL_SUFFIX: appended to the server modes' names (e.g. "-4-steps-per-call").
#
# Random weights of the preset's shape (speed does not depend on the values) and a
# word-level tokenizer of the preset's vocabulary size. Results are appended to OUT_FILE;
# plot.py draws them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${1:-pythia-70m}
RATES=${2:-0.25,1,4}
REQUESTS=${3:-16}
MODES=${4:-continuous,one-at-a-time,static,transformers,prefix}
PROMPT_LEN=${PROMPT_LEN:-32,128}
OUTPUT_LEN=${OUTPUT_LEN:-16,64}
SERIAL_REQUESTS=${SERIAL_REQUESTS:-$REQUESTS}
SLOTS=${SLOTS:-16}
MAX_LEN=${MAX_LEN:-192}
PORT=${PORT:-8765}
read -r -a EXTRA <<<"${SERVER_FLAGS:-}"
OUT=${OUT_FILE:-experiments/serving/results_${PRESET}.jsonl}
TOP_RATE=${RATES##*,}
if [[ -n ${MODEL_DIR:-} ]]; then
    MODEL=$MODEL_DIR
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    MODEL=$WORK/model
fi
WORKLOAD=(--requests="$REQUESTS" --prompt-len="$PROMPT_LEN" --output-len="$OUTPUT_LEN"
    --out="$OUT")
has() { [[ ",$MODES," == *",$1,"* ]]; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

if [[ ! -f $MODEL/config.json ]]; then
    python - "$PRESET" "$MODEL" <<'PY'
import json, sys
from pathlib import Path

import jax
import tokenizers
from tokenizers import models, pre_tokenizers

from neox_jax.convert import save_hf
from neox_jax.model import PRESETS, ModelConfig, init_params

config = ModelConfig(**PRESETS[sys.argv[1]])
tok_dir = Path(sys.argv[2] + "-tokenizer")
tok_dir.mkdir(parents=True, exist_ok=True)
# One word per id: detokenizing costs what a real tokenizer's would, no vocabulary file.
vocab = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, config.vocab_size)}}
tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.add_special_tokens(["<eos>", "<pad>"])
tok.save(str(tok_dir / "tokenizer.json"))
special = {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": None}
(tok_dir / "tokenizer_config.json").write_text(json.dumps(special))
save_hf(config, init_params(config, jax.random.key(0)), sys.argv[2], tokenizer_dir=tok_dir)
PY
fi

serve() {  # serve <slots> <label> <rates> [loadgen flags] [-- server flags]: load, SIGTERM
    local slots=$1 label=$2-len${SERVE_MAX_LEN:-$MAX_LEN}${LABEL_SUFFIX:-} rates=$3
    shift 3
    local load=() server=()
    while (($#)); do
        if [[ $1 == -- ]]; then shift; server=("$@"); break; fi
        load+=("$1"); shift
    done
    python -m neox_jax.serve --config=configs/serve.py --config.checkpoint="$MODEL" \
        --config.model_name="$PRESET" --config.num_slots="$slots" \
        --config.max_len="${SERVE_MAX_LEN:-$MAX_LEN}" \
        --config.prefill_buckets="${PREFILL_BUCKETS:-(32, 64, 128)}" --config.max_queue=1000 \
        --config.port="$PORT" "${EXTRA[@]}" "${server[@]}" &
    local pid=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        kill -0 "$pid" || exit 1
        sleep 1
    done
    python experiments/serving/loadgen.py "${LOADGEN_MODE:-server}" \
        --base-url="http://127.0.0.1:$PORT/v1" --label="$label" --rates="$rates" \
        --server-pid="$pid" "${WORKLOAD[@]}" "${load[@]}"
    kill -TERM "$pid"
    wait "$pid"
}

if has continuous; then serve "$SLOTS" "continuous-$SLOTS-slots" "$RATES"; fi
if has alternate; then
    LOADGEN_MODE=alternate serve "$SLOTS" "continuous-$SLOTS-slots" "$RATES" \
        --checkpoint="$MODEL" --rounds="${ROUNDS:-2}" ${STATIC_FLAGS:-}
fi
if has one-at-a-time; then serve 1 one-at-a-time "$TOP_RATE" --requests="$SERIAL_REQUESTS"; fi
if has static; then
    python experiments/serving/loadgen.py static --checkpoint="$MODEL" --batch=16 \
        --rates="$RATES" "${WORKLOAD[@]}" ${STATIC_FLAGS:-}
fi
if has transformers; then
    python experiments/serving/loadgen.py hf --checkpoint="$MODEL" --rates="$TOP_RATE" \
        "${WORKLOAD[@]}" --requests="$SERIAL_REQUESTS"
fi
if has prefix; then
    # Time to first token with and without prefix caching: every prompt starts with the
    # same 256 tokens (a system prompt); chunks of 256, so the shared part is one block.
    for cache in 0 16; do
        SERVE_MAX_LEN=512 serve "$SLOTS" "shared-prefix-cache-blocks-$cache" "${RATES%%,*}" \
            --shared-prefix=256 --requests="$SERIAL_REQUESTS" -- --config.prefill_chunk=256 \
            --config.prefix_cache_blocks=$cache
    done
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
