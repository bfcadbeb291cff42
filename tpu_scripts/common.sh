# shellcheck shell=bash
# shellcheck disable=SC2034  # globals here are read by the scripts that source this file
# Shared by the tpu_scripts/*.sh entry points (sourced, never run): defaults read from the
# environment, flag parsing, logging, dry-run, and the gcloud calls every script makes.
# Runs on the user's machine; worker.sh is the part that runs on the TPU VM workers.
# Written for bash 3.2+ (macOS /bin/bash): no mapfile, no associative arrays.

# ---- Defaults: every one can be set by flag or by environment variable. ----
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-us-central2-b}
# Empty means "gcloud's configured default project": the --project flag is then left out.
PROJECT=${PROJECT:-}
DRY_RUN=${DRY_RUN:-0}
INTERNAL_IP=${INTERNAL_IP:-0}
# Remote paths: relative ones are relative to the worker's home directory.
REMOTE_DIR=${REMOTE_DIR:-rpt_jax}
VENV_DIR=${VENV_DIR:-rpt_jax_venv}
LOG_DIR=${LOG_DIR:-rpt_jax_logs}
GCLOUD=${GCLOUD:-gcloud}

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0")

# Help text shared by every script that talks to an existing TPU VM.
COMMON_FLAGS_HELP="Common flags:
  --name NAME           TPU_NAME          required: the TPU VM (for queued resources: the node id),
                                          or the first positional argument
  --zone ZONE           ZONE              us-central2-b
  --project PROJECT     PROJECT           gcloud's default project (flag left out when unset)
  --dry-run             DRY_RUN=1         print the gcloud commands instead of running them
  -h, --help                              show this help"
REMOTE_FLAGS_HELP="Worker paths (relative ones are relative to the worker's home):
  --remote-dir DIR      REMOTE_DIR        rpt_jax        the rpt_jax source on each worker
  --venv DIR            VENV_DIR          rpt_jax_venv   the Python virtual environment
  --log-dir DIR         LOG_DIR           rpt_jax_logs   job logs and pid file
  --internal-ip         INTERNAL_IP=1     ssh/scp to the workers' internal IPs"

# ---- Logging. Messages go to stderr so stdout carries only dry-run commands. ----
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$PROG" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2
  exit 1
}
# A bad or missing flag: exit 2, pointing at --help.
usage_error() {
  printf '[%s] ERROR: %s (see %s --help)\n' "$PROG" "$*" "$PROG" >&2
  exit 2
}

is_true() {
  case ${1:-} in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    *) return 1 ;;
  esac
}
is_dry_run() { is_true "$DRY_RUN"; }

# Quote one word for a POSIX shell exactly like Python's shlex.quote: bare when it only holds
# safe characters, otherwise single-quoted with each ' written as '"'"'.
shell_quote() {
  local s=$1 q="'\"'\"'"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    s=${s//\'/$q}
    printf "'%s'" "$s"
  fi
}

# Join words into one shell command line, each word quoted by shell_quote.
shell_join() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# ---- Flag parsing. ----
# flag_value "$@": the value of the flag in $1 ("--flag=value" or "--flag value").
# Sets VALUE, and SHIFT to the number of words consumed.
flag_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# >= 2)); then
    VALUE=$2
    SHIFT=2
  else
    usage_error "$1 needs a value"
  fi
}

# common_flag "$@": handle a flag shared by all scripts; return 1 when $1 is not one.
# Each script defines usage() before calling it.
common_flag() {
  SHIFT=1
  case $1 in
    --name | --name=*) flag_value "$@" && TPU_NAME=$VALUE ;;
    --zone | --zone=*) flag_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) flag_value "$@" && PROJECT=$VALUE ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
}

# remote_flag "$@": handle a worker-path flag; return 1 when $1 is not one.
remote_flag() {
  SHIFT=1
  case $1 in
    --remote-dir | --remote-dir=*) flag_value "$@" && REMOTE_DIR=$VALUE ;;
    --venv | --venv=*) flag_value "$@" && VENV_DIR=$VALUE ;;
    --log-dir | --log-dir=*) flag_value "$@" && LOG_DIR=$VALUE ;;
    --internal-ip) INTERNAL_IP=1 ;;
    *) return 1 ;;
  esac
}

# positional_name ARG: accept the TPU name as the one positional argument.
positional_name() {
  case $1 in
    -*) usage_error "unknown flag: $1" ;;
  esac
  [[ -z $TPU_NAME || $TPU_NAME == "$1" ]] || usage_error "two TPU names given: '$TPU_NAME' and '$1'"
  TPU_NAME=$1
}

require_name() {
  [[ -n $TPU_NAME ]] || usage_error "missing the TPU name: pass --name NAME (or set TPU_NAME)"
}

# ---- gcloud. ----
# Scope flags every gcloud call gets: --zone, and --project only when one was given.
scope_flags() {
  SCOPE_FLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE_FLAGS+=(--project="$PROJECT"); fi
}

# Long words (the worker script) are abbreviated in log lines, never in dry-run output.
short_join() {
  local out='' word
  for word in "$@"; do
    if ((${#word} > 120)); then word="${word:0:60}...<${#word} chars>"; fi
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# run_gcloud ARGS...: run gcloud, or with DRY_RUN print the command line (one per call).
run_gcloud() {
  if is_dry_run; then
    printf '%s\n' "$(shell_join "$GCLOUD" "$@")"
    return 0
  fi
  command -v "$GCLOUD" >/dev/null ||
    die "$GCLOUD not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or set GCLOUD"
  log "$(short_join "$GCLOUD" "$@")"
  "$GCLOUD" "$@"
}

# The shell command that runs worker.sh SUBCOMMAND ARGS... on a worker. The script travels
# inside the command (gzip + base64: one line, no quoting layers between gcloud, ssh and the
# remote shell), so the workers always run the version in this checkout.
worker_command() {
  local blob
  blob=$(gzip -9nc <"$TPU_SCRIPTS_DIR/worker.sh" | base64 | tr -d '\n')
  # shellcheck disable=SC2016  # the $(...) is expanded by the worker's shell
  printf 'bash -c "$(echo %s | base64 -d | gunzip)" %s' "$blob" "$(shell_join rpt-worker "$@")"
}

# tpu_ssh WORKER SUBCOMMAND ARGS...: run worker.sh SUBCOMMAND on WORKER (a number or "all").
tpu_ssh() {
  local worker=$1
  shift
  scope_flags
  local args=(compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE_FLAGS[@]}" --worker="$worker")
  if is_true "$INTERNAL_IP"; then args+=(--internal-ip); fi
  args+=(--command="$(worker_command "$@")")
  run_gcloud "${args[@]}"
}

# tpu_scp WORKER LOCAL REMOTE: copy LOCAL to REMOTE (relative to home) on WORKER.
tpu_scp() {
  scope_flags
  local args=(compute tpus tpu-vm scp "$2" "$TPU_NAME:$3" "${SCOPE_FLAGS[@]}" --worker="$1")
  if is_true "$INTERNAL_IP"; then args+=(--internal-ip); fi
  run_gcloud "${args[@]}"
}

validate_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or 'all', got '$1'"
}
