#!/usr/bin/env bash
# Start the rpt_jax main job on every worker of a TPU VM / pod slice, in the background.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=${CONFIG:-configs/tpu_v4.py}
WORKDIR=${WORKDIR:-}
WORKER=${WORKER:-all}
MODULE=${MODULE:-rpt_jax.main}
GCS_MOUNT_ROOT=${GCS_MOUNT_ROOT:-gcs}

usage() {
  cat <<EOF
Usage: $PROG [NAME] --workdir gs://BUCKET/DIR [--config FILE] [flags] [-- MAIN_FLAGS...]

On every worker (--worker=all), in the background (setsid + nohup, so it outlives the ssh
session), with one log file per worker (LOG_DIR/worker-N.log, see logs.sh):
  cd REMOTE_DIR && VENV/bin/python -m rpt_jax.main --config=FILE --workdir=DIR MAIN_FLAGS...
Flags after -- go to rpt_jax.main unchanged, e.g. config overrides --config.train.steps=100.
JAX finds the other hosts by itself on TPU (jax.distributed.initialize() without arguments),
so there are no coordinator flags. Fails on a worker where a job is still running: stop.sh.
A job that exits with code 75 (rpt_jax stopped on SIGTERM/preemption after saving a
checkpoint) is started again on that worker and resumes from the checkpoint, at most
RPT_MAX_RESTARTS times (default 100; --env RPT_MAX_RESTARTS=0 never restarts); stop.sh
ends it for good.
For a gs:// workdir, each worker first mounts its bucket with gcsfuse at MOUNT_ROOT/BUCKET
(installed by setup.sh): checkpoints go to gs:// directly, the run's other files (tokenizer,
records, metrics, eval) through the mount, so every host reads what another wrote. gs:// inputs
(--config.model.hf_path=gs://..., the proxy, the tokenizer, a corpus file) are read through
mounts too: the workdir's bucket, and any other given with --mount.

Flags (flag / environment variable / default):
  --workdir DIR         WORKDIR           required; gs:// so that all workers share it
  --config FILE         CONFIG            configs/tpu_v4.py  (relative to REMOTE_DIR)
  --env KEY=VALUE                         environment variable for the job (repeatable)
  --module MOD          MODULE            rpt_jax.main
  --gcs-mount-root DIR  GCS_MOUNT_ROOT    gcs  (on the workers, relative to home)
  --mount BUCKET                          also mount this bucket (repeatable)
  --worker W            WORKER            all
$REMOTE_FLAGS_HELP
$COMMON_FLAGS_HELP

Example:
  $PROG my-v4 --workdir=gs://my-bucket/rpt/run1 -- --config.train.steps=1000
EOF
}

ENVS=()
EXTRA=()
MOUNT=()
while (($#)); do
  case $1 in
    --config | --config=*) flag_value "$@" && CONFIG=$VALUE ;;
    --workdir | --workdir=*) flag_value "$@" && WORKDIR=$VALUE ;;
    --env | --env=*) flag_value "$@" && ENVS+=(--env "$VALUE") ;;
    --module | --module=*) flag_value "$@" && MODULE=$VALUE ;;
    --gcs-mount-root | --gcs-mount-root=*) flag_value "$@" && GCS_MOUNT_ROOT=$VALUE ;;
    --mount | --mount=*) flag_value "$@" && MOUNT+=(--mount-bucket "${VALUE#gs://}") ;;
    --worker | --worker=*) flag_value "$@" && WORKER=$VALUE ;;
    --config.*) usage_error "config overrides go to rpt_jax.main after --: $PROG ... -- $1" ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *) remote_flag "$@" || common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
validate_worker "$WORKER"
[[ -n $WORKDIR ]] || usage_error "missing --workdir: pass --workdir gs://BUCKET/DIR (or set WORKDIR)"
[[ -n $CONFIG ]] || usage_error "--config is empty"
if [[ $WORKDIR == gs://* ]]; then
  BUCKET=${WORKDIR#gs://}
  BUCKET=${BUCKET%%/*}
  [[ -n $BUCKET ]] || usage_error "--workdir '$WORKDIR' names no bucket: use gs://BUCKET/DIR"
  MOUNT=(--mount-bucket "$BUCKET" ${MOUNT[@]+"${MOUNT[@]}"})
else
  warn "--workdir '$WORKDIR' is not a gs:// path: on a pod slice every worker then writes to its own disk, and checkpoints cannot be restored across hosts"
fi
if ((${#MOUNT[@]})); then
  [[ -n $GCS_MOUNT_ROOT ]] || usage_error "--gcs-mount-root is empty"
  for ((i = 1; i < ${#MOUNT[@]}; i += 2)); do
    [[ ${MOUNT[i]} =~ ^[a-z0-9][-a-z0-9_.]*$ ]] || usage_error "--mount wants a bucket name, got '${MOUNT[i]}'"
  done
  MOUNT+=(--mount-root "$GCS_MOUNT_ROOT")
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  if [[ $kv != --env && ! $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    usage_error "--env wants KEY=VALUE, got '$kv'"
  fi
done

log "starting $MODULE on $TPU_NAME (worker $WORKER): config $CONFIG, workdir $WORKDIR"
tpu_ssh "$WORKER" start --dir "$REMOTE_DIR" --venv "$VENV_DIR" --log-dir "$LOG_DIR" \
  ${ENVS[@]+"${ENVS[@]}"} --module "$MODULE" ${MOUNT[@]+"${MOUNT[@]}"} \
  -- --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
is_dry_run || log "started; follow with: logs.sh $TPU_NAME   (stop with stop.sh $TPU_NAME)"
