#!/usr/bin/env bash
# Stop the rpt_jax job started by run.sh on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=${WORKER:-all}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}

usage() {
  cat <<EOF2
Usage: $PROG [NAME] [--worker all|N] [--timeout SECONDS] [flags]

On every worker: SIGTERM the job's process group (from LOG_DIR/job.pid), then SIGKILL what is
left after --timeout seconds. A worker with no job running is left alone. The TPU VM keeps
running (and billing): delete.sh removes it.

Flags (flag / environment variable / default):
  --worker W            WORKER            all
  --timeout S           STOP_TIMEOUT      30
$REMOTE_FLAGS_HELP
$COMMON_FLAGS_HELP
EOF2
}

while (($#)); do
  case $1 in
    --worker | --worker=*) flag_value "$@" && WORKER=$VALUE ;;
    --timeout | --timeout=*) flag_value "$@" && STOP_TIMEOUT=$VALUE ;;
    *) remote_flag "$@" || common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
validate_worker "$WORKER"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "--timeout must be a whole number of seconds, got '$STOP_TIMEOUT'"

tpu_ssh "$WORKER" stop --log-dir "$LOG_DIR" --timeout "$STOP_TIMEOUT"
