#!/usr/bin/env bash
# Start a neox_jax training run on every worker of a Cloud TPU VM slice.
#
#   ./launch_tpu.sh --name=neox-v5e --zone=us-west4-a --project=my-proj \
#       --accelerator_type=v5litepod-16 -- \
#       --config=configs/pretrain.py:pythia-160m --workdir=gs://my-bucket/pythia-160m \
#       --config.data.paths=/mnt/data/pile_text --config.mesh.fsdp=-1 --config.mesh.data=1
#
# Steps, each a gcloud command (--dry_run prints them all and runs none):
#   1. reach the slice: `tpu-vm describe`; create it if absent (`tpu-vm create` with
#      --accelerator_type, --runtime_version, optional --spot);
#   2. install the package on every worker (`ssh --worker=all`): git clone --repo at
#      --ref (default: this checkout's origin and commit), or with --copy, scp this
#      working tree; then `pip install -e .[tpu]`;
#   3. run `python3 -m neox_jax.train <everything after -->` on every worker at once
#      (`ssh --worker=all`; --detach leaves it running under nohup, logging to --log).
#
# Every worker runs the same command: JAX's multi-controller runtime makes them one
# program (NEOX_JAX_DISTRIBUTED=1 has neox_jax call jax.distributed.initialize(),
# which finds its peers from the TPU metadata). --workdir must be a path every
# worker shares (gs://...), as checkpoints are written by all of them together.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
  cat <<'EOF'

Flags (--flag=value):
  --name=NAME               TPU VM name (required)
  --zone=ZONE               e.g. us-central2-b (required)
  --project=PROJECT         default: gcloud's configured project
  --accelerator_type=TYPE   e.g. v4-32, v5litepod-16, v5p-128 (needed to create)
  --runtime_version=V       TPU software version; default from the accelerator type
  --spot                    create a Spot slice
  --repo=URL --ref=REF      what the workers clone (default: origin and HEAD here)
  --copy                    scp this working tree instead of cloning
  --dir=DIR                 checkout on the workers (default: neox_jax)
  --skip_install            only (create and) train
  --detach --log=FILE       nohup the run, logging to FILE on each worker
  --dry_run                 print every command, run none
  -- ARGS...                passed to python3 -m neox_jax.train unchanged
EOF
}

die() { echo "launch_tpu.sh: $*" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" ACCEL="" RUNTIME="" SPOT=0 REPO_URL="" REF="" COPY=0
DIR="neox_jax" SKIP_INSTALL=0 DETACH=0 LOG="neox_train.log" DRY_RUN=0
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCEL="${1#*=}" ;;
    --runtime_version=*) RUNTIME="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --copy) COPY=1 ;;
    --dir=*) DIR="${1#*=}" ;;
    --skip_install) SKIP_INSTALL=1 ;;
    --detach) DETACH=1 ;;
    --log=*) LOG="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag $1 (training flags go after --; see --help)" ;;
  esac
  shift
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
((${#TRAIN_ARGS[@]})) || die "nothing to train: put the trainer's flags after --"

# Shell-quote one word so that a shell reads it back unchanged: safe words stay bare,
# others are single-quoted (a ' inside becomes '\'').
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Run (or with --dry_run print) one command given as words.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

default_runtime() {
  case "$1" in
    v2-* | v3-*) echo "tpu-vm-base" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --runtime_version for accelerator type '$1'; pass one" ;;
  esac
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
HERE="$(cd "$(dirname "$0")" && pwd)"

# 1. Reach or create the slice.
describe=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')
if ((DRY_RUN)); then
  echo "# 1. reach the slice; create it if describe fails"
  run "${describe[@]}"
  create_needed=1
elif "${describe[@]}" >/dev/null 2>&1; then
  echo "TPU VM $NAME exists in $ZONE." >&2
  create_needed=0
else
  create_needed=1
fi
if ((create_needed)); then
  [[ -n "$ACCEL" ]] || die "TPU VM $NAME not found: pass --accelerator_type to create it"
  RUNTIME="${RUNTIME:-$(default_runtime "$ACCEL")}"
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL"
          --version="$RUNTIME")
  ((SPOT)) && create+=(--spot)
  run "${create[@]}"
fi

ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

# 2. Install on every worker.
if ! ((SKIP_INSTALL)); then
  ((DRY_RUN)) && echo "# 2. install neox_jax on every worker"
  pip_install="python3 -m pip install -q -e $(quote ".[tpu]")"
  if ((COPY)); then
    tarball="$(mktemp -u /tmp/neox_jax.XXXXXX).tgz"
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ -C "$HERE" .
    run "${GCLOUD[@]}" scp "$tarball" "$NAME:neox_jax.tgz" "${WHERE[@]}" --worker=all
    ssh_all "set -e; mkdir -p $(quote "$DIR"); tar -xzf neox_jax.tgz -C $(quote "$DIR"); cd $(quote "$DIR"); $pip_install"
  else
    if [[ -z "$REPO_URL" ]]; then
      REPO_URL="$(git -C "$HERE" remote get-url origin 2>/dev/null)" ||
        die "no --repo given and this checkout has no origin remote (or use --copy)"
    fi
    REF="${REF:-$(git -C "$HERE" rev-parse HEAD 2>/dev/null || echo main)}"
    ssh_all "set -e; [ -d $(quote "$DIR/.git") ] || git clone -q $(quote "$REPO_URL") $(quote "$DIR"); cd $(quote "$DIR"); git fetch -q origin; git checkout -q $(quote "$REF"); $pip_install"
  fi
fi

# 3. The same training command on every worker.
((DRY_RUN)) && echo "# 3. train on every worker"
train="NEOX_JAX_DISTRIBUTED=1 python3 -m neox_jax.train $(quote_all "${TRAIN_ARGS[@]}")"
if ((DETACH)); then
  ssh_all "cd $(quote "$DIR") && nohup env $train > $(quote "$LOG") 2>&1 < /dev/null &"
else
  ssh_all "cd $(quote "$DIR") && $train"
fi
