#!/usr/bin/env bash
# The serving benchmark on a GPU host or TPU VM: pythia-1.4b or neox-20b in bfloat16,
# tensor parallel over the local devices (the largest count <= them that divides the
# attention heads), the issue's workload (prompts 32-512, outputs 16-256 tokens).
#
#   bash experiments/serving/run_gpu.sh pythia-1.4b              # random weights
#   bash experiments/serving/run_gpu.sh neox-20b /data/gpt-neox-20b  # a HF folder
#
# MODEL_DIR (2nd argument): a Hugging Face folder of the model (e.g. from
# `huggingface-cli download EleutherAI/gpt-neox-20b`). Without it pythia-1.4b gets
# random weights (run.sh saves them, 5.6 GB); neox-20b needs it (saving random 20B
# weights would take 80 GB of host memory). Speed does not depend on the values.
# Environment as run.sh (RATES, REQUESTS, MODES, SLOTS, SERVER_FLAGS, ...); SMOKE=1 runs
# a one-minute check (8 requests, continuous batching only) for experiments/gpu_check.sh.
# transformers' one-at-a-time row is CPU-only here (run.sh's "transformers" mode).
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${1:-pythia-1.4b}
export MODEL_DIR=${2:-${MODEL_DIR:-}}
if [[ -z $MODEL_DIR && $PRESET == neox-20b ]]; then
    echo "neox-20b needs its Hugging Face folder: run_gpu.sh neox-20b PATH" >&2
    exit 2
fi
read -r TP BACKEND < <(python - "$PRESET" <<'PY'
import sys
import jax
from neox_jax.model import PRESETS

heads = PRESETS[sys.argv[1]]["num_attention_heads"]
tp = max(n for n in range(1, jax.local_device_count() + 1) if heads % n == 0)
print(tp, jax.default_backend())
PY
)
echo "$PRESET on $TP $BACKEND devices, bfloat16" >&2
export OUT_FILE=${OUT_FILE:-experiments/serving/results_${PRESET}_${BACKEND}.jsonl}
export SERVER_FLAGS="--config.tensor_parallel=$TP --config.dtype=bfloat16 ${SERVER_FLAGS:-}"
export STATIC_FLAGS="--tensor-parallel=$TP --dtype=bfloat16"
export SLOTS=${SLOTS:-64} PROMPT_LEN=${PROMPT_LEN:-32,512} OUTPUT_LEN=${OUTPUT_LEN:-16,256}
if [[ ${SMOKE:-0} == 1 ]]; then
    exec bash experiments/serving/run.sh "$PRESET" 4 8 continuous
fi
exec bash experiments/serving/run.sh "$PRESET" "${RATES:-1,4,16,64}" "${REQUESTS:-256}" \
    "${MODES:-continuous,one-at-a-time,static,prefix}"
