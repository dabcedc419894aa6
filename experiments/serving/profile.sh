#!/usr/bin/env bash
# Where the serving process's time goes at saturation: the server (16 slots) under the
# benchmark's workload (rate 4 req/s), sampled by py-spy (`pip install py-spy`) with
# every thread, idle waits included, into a collapsed-stack file that
# profile_summary.py breaks down; and the CPU seconds each of the server's threads spent
# during the run (/proc/PID/task/*/stat: the HTTP side, the engine's host loop, XLA's
# compute threads) into OUT.threads.
#
#   MODEL_DIR=/tmp/serving_bench/pythia-70m bash experiments/serving/profile.sh OUT.txt \
#       [REQUESTS] [--config.steps_per_call=4 ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$1 REQUESTS=${2:-16}
shift 2 || shift $#
PORT=${PORT:-8766}
python -m neox_jax.serve --config=configs/serve.py --config.checkpoint="$MODEL_DIR" \
    --config.model_name=bench --config.num_slots=16 --config.max_len="${MAX_LEN:-192}" \
    --config.prefill_buckets="(32, 64, 128)" --config.max_queue=1000 \
    --config.port="$PORT" "$@" &
pid=$!
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do kill -0 "$pid"; sleep 1; done
threads() {  # "tid name cpu-seconds" per thread of the server
    for t in /proc/"$pid"/task/*; do
        read -r -a f <<<"$(sed 's/.*) //' "$t/stat")"
        echo "${t##*/} $(tr ' ' _ <"$t/comm") $(((f[11] + f[12])))"
    done
}
threads >"$OUT.before"
py-spy record --pid "$pid" --format raw --output "$OUT" --threads --idle --rate 200 \
    --nonblocking &
spy=$!
python experiments/serving/loadgen.py server --base-url="http://127.0.0.1:$PORT/v1" \
    --label=profile --rates=4 --requests="$REQUESTS" --prompt-len=32,128 --output-len=16,64 \
    --server-pid="$pid" ${LOADGEN_FLAGS:-}
kill -INT "$spy"; wait "$spy" || true
threads >"$OUT.after"
join <(sort "$OUT.before") <(sort "$OUT.after") | awk -v hz="$(getconf CLK_TCK)" \
    '{d = ($5 - $3) / hz; if (d > 0) by[$2] += d; total += d}
     END {for (n in by) printf "%8.2f s  %5.1f%%  %s\n", by[n], 100 * by[n] / total, n;
          printf "%8.2f s  total\n", total}' | sort -rn >"$OUT.threads"
cat "$OUT.threads"
kill -TERM "$pid"; wait "$pid"
