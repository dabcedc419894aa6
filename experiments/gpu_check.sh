#!/usr/bin/env bash
# Every GPU check of the project in one run (< 10 minutes on one H100/H200):
#   0. the device, its measured copy bandwidth and bf16 matmul rate (the ceilings),
#   1. train-step MFU (pythia-1b, bf16, 8x2048) with its per-op table, XLA attention,
#   2. greedy decode tokens/s vs the bandwidth roofline (pythia-1.4b, bf16), per-op table,
#   3. attention benchmark: flash fwd+bwd vs the XLA path vs cuDNN, decode kernel,
#   4. the Pallas kernels compiled for the GPU (their tests; on a GPU the kernels take the
#      Triton lowering instead of the interpreter), fp32 dots at full precision, and the
#      serving engine decoding through the compiled paged kernel (same tokens as alone),
#   5. train-step MFU again with cuDNN's fused attention and with the Pallas flash kernels.
# Each step has its own time limit and a failed step never stops the rest.
# Past runs: experiments/gpu_runs/. Results (JSON and logs) land in $RES (default experiments/gpu_results/); where $OUT is
# set (the project's lent GPU machine) they are also bundled, after every step, into
# $OUT/gpu_results.tgz, with the summary beside it, since only a few files come back.
#
# On the lent GPU machine (jax with CUDA is preinstalled there, no registry): carry
# ml-collections and tensorboardX (the two its image lacks) as Python 3.12 wheels in
# .whl/ (see /work/.library/device/README.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections tensorboardX
# and run `bash experiments/gpu_check.sh` with carry [".whl"]. Elsewhere: pip install -e .
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${RES:-experiments/gpu_results}"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

bundle() {  # what comes back from the lent machine: one archive and the summary
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tgz" -C "$RES" . && cp "$RES/summary.txt" "$OUT/" 2>/dev/null
  fi
}

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run one check, keep its log, never stop the rest
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  # ONLY="device decode ..." runs just those steps (a rerun of what failed).
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${limit}s)" | tee -a "$RES/summary.txt"
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok in $((SECONDS - start))s" | tee -a "$RES/summary.txt"
  else
    echo "FAILED (exit $rc) after $((SECONDS - start))s" | tee -a "$RES/summary.txt"
    tail -15 "$RES/$name.log"
    status=1
  fi
  bundle
}

step device 60 python3 - "$RES/device.json" <<'EOF'
import json, subprocess, sys, time
import jax, jax.numpy as jnp

def best(f, *a, n=10):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return min(ts)

x = jnp.ones(2**30, jnp.bfloat16)  # 2 GiB, read and written once
copy = 2 * x.nbytes / best(jax.jit(lambda a: a * 2), x) / 1e9
del x
k1, k2 = jax.random.split(jax.random.key(0))
n = 8192  # random data: zeros run faster than real data on these chips
a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (k1, k2))
mm = 2 * n**3 / best(jax.jit(lambda p, q: p @ q), a, b) / 1e12
try:
    smi = subprocess.run(["nvidia-smi", "--format=csv,noheader",
                          "--query-gpu=name,driver_version,memory.total,clocks.sm"],
                         capture_output=True, text=True).stdout.strip()
except OSError as e:
    smi = str(e)
report = {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": smi,
          "copy_gbps": copy, "bf16_matmul_tflops_8192": mm}
print(json.dumps(report))
open(sys.argv[1], "w").write(json.dumps(report, indent=1))
EOF
cat "$RES/device.log"

# --profile: each bench also writes its per-op table (experiments/op_profile.py) into the
# log and the JSON (the jax.profiler trace stays in /tmp).
step train_mfu 150 python3 experiments/train_bench/bench.py --gpu --profile \
  --out="$RES/train_mfu.json"
step train_mfu_cudnn 70 python3 experiments/train_bench/bench.py --gpu \
  --attention_impl=cudnn --steps=3 --out="$RES/train_mfu_cudnn.json"
step decode 100 python3 experiments/decode_bench/bench.py --gpu --rounds=2 \
  --out="$RES/decode.json"
# The names a GPU trace gives its events, beside the HLO's, for op_profile's table.
step trace_names 40 python3 experiments/op_profile.py --dump_trace_names="$RES/trace_names.json"
step attention_bench 60 python3 experiments/attention_bench/bench.py --out="$RES/attention.json"
# Each kernel test in a worker that a hung Triton compile kills alone (thread timeout);
# fp32 dots at full precision, as the CPU suite computes them.
step kernels_compiled 120 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -v -p no:cacheprovider -n 4 \
  --timeout=45 --timeout-method=thread -k "not on_a_mesh" \
  tests/test_kernels.py tests/test_families_kernels.py tests/test_paged_attention.py \
  tests/test_model_pallas.py "tests/test_serving_paged.py::test_paged_kernel_in_the_engine_gives_the_gather_paths_tokens" \
  --junitxml="$RES/kernels_junit.xml"
step train_mfu_pallas 70 python3 experiments/train_bench/bench.py --gpu \
  --attention_impl=pallas --steps=3 --out="$RES/train_mfu_pallas.json"
# Opt-in (SERVING=1, about 5 more minutes): the server on pythia-1.4b, 8 requests.
if [ -n "${SERVING:-}" ]; then
  step serving 330 env SMOKE=1 OUT_FILE="$RES/serving.jsonl" \
    bash experiments/serving/run_gpu.sh pythia-1.4b
fi
cat "$RES/summary.txt"
exit $status
