#!/usr/bin/env bash
# Follow the rpt_jax job's log on one worker (default 0) or on all workers of a TPU VM.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=${WORKER:-0}
LOG_LINES=${LOG_LINES:-100}
FOLLOW=${FOLLOW:-1}

usage() {
  cat <<EOF2
Usage: $PROG [NAME] [--worker N|all] [--lines N] [--no-follow] [flags]

Print the last lines of the job log written by run.sh and follow it (tail -F) until Ctrl-C.
Each worker keeps its own log (LOG_DIR/worker-N.log); with --worker=all every line is
prefixed with "[worker N]".

Flags (flag / environment variable / default):
  --worker W            WORKER            0      (a worker number, or all)
  --lines N             LOG_LINES         100
  --no-follow           FOLLOW=0          print and exit instead of following
$REMOTE_FLAGS_HELP
$COMMON_FLAGS_HELP
EOF2
}

while (($#)); do
  case $1 in
    --worker | --worker=*) flag_value "$@" && WORKER=$VALUE ;;
    --lines | --lines=*) flag_value "$@" && LOG_LINES=$VALUE ;;
    --no-follow) FOLLOW=0 && SHIFT=1 ;;
    --follow) FOLLOW=1 && SHIFT=1 ;;
    *) remote_flag "$@" || common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
validate_worker "$WORKER"
[[ $LOG_LINES =~ ^[0-9]+$ ]] || usage_error "--lines must be a whole number, got '$LOG_LINES'"

ARGS=(logs --log-dir "$LOG_DIR" --lines "$LOG_LINES")
if ! is_true "$FOLLOW"; then ARGS+=(--no-follow); fi
if [[ $WORKER == all ]]; then ARGS+=(--prefix); fi
tpu_ssh "$WORKER" "${ARGS[@]}"
