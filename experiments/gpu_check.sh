#!/usr/bin/env bash
# Every GPU check of the project in one run (< 10 minutes on one H100/H200):
#   1. the Pallas kernels compiled for the GPU (tests/test_kernels.py, test_model_pallas.py;
#      on a GPU `_interpret` picks the Triton lowering instead of the interpreter),
#   2. attention benchmark: flash fwd+bwd vs the XLA path vs cuDNN, decode kernel,
#   3. train-step MFU (pythia-1b, bf16) with its per-op table,
#   4. greedy decode tokens/s vs the bandwidth roofline (pythia-1.4b, bf16), per-op table.
# Results land as JSON (and logs) under $OUT (default experiments/gpu_results/).
#
# On the project's lent GPU machine (jax with CUDA is preinstalled there, no registry):
# carry ml-collections and tensorflow-datasets as Python 3.12 wheels in .whl/ (see
# /work/.library/device/README.md), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections
# and run `bash experiments/gpu_check.sh` with carry [".whl"]. Elsewhere: pip install -e .
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-experiments/gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'EOF' | tee "$OUT/device.json"
import json, jax
print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()]}))
EOF

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run one check, keep its log, never stop the rest
  local name=$1 limit=$2
  shift 2
  echo "=== $name" | tee -a "$OUT/summary.txt"
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok" | tee -a "$OUT/summary.txt"
  else
    echo "FAILED ($?)" | tee -a "$OUT/summary.txt"
    tail -20 "$OUT/$name.log"
    status=1
  fi
}

step kernels_compiled 180 env JAX_PLATFORMS=cuda python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels.py tests/test_model_pallas.py --junitxml="$OUT/kernels_junit.xml"
step attention_bench 150 python3 experiments/attention_bench/bench.py --out="$OUT/attention.json"
# --profile: each also writes its per-op table (experiments/op_profile.py) into the log
# and the JSON (the jax.profiler trace stays in /tmp).
step train_mfu 120 python3 experiments/train_bench/bench.py --gpu --profile \
  --out="$OUT/train_mfu.json"
step decode 120 python3 experiments/decode_bench/bench.py --gpu --profile --out="$OUT/decode.json"
# Opt-in (SERVING=1, about 5 more minutes): the server on pythia-1.4b, 8 requests.
if [ -n "${SERVING:-}" ]; then
  step serving 330 env SMOKE=1 OUT_FILE="$OUT/serving.jsonl" \
    bash experiments/serving/run_gpu.sh pythia-1.4b
fi
exit $status
