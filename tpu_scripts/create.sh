#!/usr/bin/env bash
# Create a TPU VM or pod slice: on-demand, spot, reserved, or through a queued resource.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
QUEUED=${QUEUED:-0}
QR_ID=${QR_ID:-}
VALID_UNTIL=${VALID_UNTIL:-}
WAIT=${WAIT:-0}
POLL_SECONDS=${POLL_SECONDS:-30}

usage() {
  cat <<EOF
Usage: $PROG [NAME] [flags] [-- EXTRA_GCLOUD_FLAGS...]

Create a TPU VM or pod slice with gcloud. Without --queued:
  gcloud compute tpus tpu-vm create NAME --zone=.. --accelerator-type=.. --version=.. [--spot|--reserved]
With --queued (a queued resource, whose node is NAME):
  gcloud compute tpus queued-resources create QR_ID --node-id=NAME --zone=.. --accelerator-type=..
      --runtime-version=.. [--spot|--reserved]
Flags after -- go to gcloud unchanged (for example --network=.. --subnetwork=.. --labels=..).

Flags (flag / environment variable / default):
  --accelerator-type T  ACCELERATOR_TYPE  v4-8   (v4-32, v5litepod-16, v5p-8, v6e-8, ...)
  --version V           RUNTIME_VERSION   by family: v2/v3/v4 tpu-ubuntu2204-base,
                        (--runtime-version)         v5e (v5litepod-*) v2-alpha-tpuv5-lite,
                                                    v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                SPOT=1            Spot capacity (preemptible, cheaper)
  --reserved            RESERVED=1        use the project's reserved capacity
  --queued              QUEUED=1          request through a queued resource
  --qr-id ID            QR_ID             queued resource id (default: NAME)
  --valid-until D       VALID_UNTIL       queued: give up after duration D (e.g. 6h)
  --wait                WAIT=1            queued: poll until the resource is ACTIVE
  --poll-seconds S      POLL_SECONDS      30
$COMMON_FLAGS_HELP

Examples:
  $PROG my-v4 --accelerator-type=v4-32
  $PROG my-v4 --accelerator-type=v4-32 --spot
  $PROG my-v4 --accelerator-type=v4-32 --queued --spot --wait
EOF
}

# default_runtime_version TYPE: the TPU VM base image for an accelerator family.
default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) usage_error "no default runtime version for accelerator type '$1': pass --version" ;;
  esac
}

EXTRA=()
while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*) flag_value "$@" && ACCELERATOR_TYPE=$VALUE ;;
    --version | --version=* | --runtime-version | --runtime-version=*)
      flag_value "$@" && RUNTIME_VERSION=$VALUE
      ;;
    --spot) SPOT=1 && SHIFT=1 ;;
    --reserved) RESERVED=1 && SHIFT=1 ;;
    --queued) QUEUED=1 && SHIFT=1 ;;
    --qr-id | --qr-id=*) flag_value "$@" && QR_ID=$VALUE ;;
    --valid-until | --valid-until=*) flag_value "$@" && VALID_UNTIL=$VALUE ;;
    --wait) WAIT=1 && SHIFT=1 ;;
    --poll-seconds | --poll-seconds=*) flag_value "$@" && POLL_SECONDS=$VALUE ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *) common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
[[ -n $ACCELERATOR_TYPE ]] || usage_error "--accelerator-type is empty"
if [[ -z $RUNTIME_VERSION ]]; then RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE"); fi
if is_true "$SPOT" && is_true "$RESERVED"; then usage_error "--spot and --reserved exclude each other"; fi
if ! is_true "$QUEUED"; then
  for flag_env in "--qr-id:$QR_ID" "--valid-until:$VALID_UNTIL"; do
    [[ -z ${flag_env#*:} ]] || usage_error "${flag_env%%:*} needs --queued"
  done
  if is_true "$WAIT"; then usage_error "--wait needs --queued (tpu-vm create already waits)"; fi
fi
QR_ID=${QR_ID:-$TPU_NAME}
[[ $POLL_SECONDS =~ ^[0-9]+$ ]] || usage_error "--poll-seconds must be a whole number, got '$POLL_SECONDS'"

scope_flags
CAPACITY=()
if is_true "$SPOT"; then CAPACITY=(--spot); fi
if is_true "$RESERVED"; then CAPACITY=(--reserved); fi

if ! is_true "$QUEUED"; then
  log "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  run_gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

QR_ARGS=(compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME" "${SCOPE_FLAGS[@]}"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if [[ -n $VALID_UNTIL ]]; then QR_ARGS+=(--valid-until-duration="$VALID_UNTIL"); fi
log "requesting queued resource $QR_ID (node $TPU_NAME, $ACCELERATOR_TYPE) in $ZONE"
run_gcloud "${QR_ARGS[@]}" ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}

if ! is_true "$WAIT"; then
  log "queued; check with: gcloud compute tpus queued-resources describe $QR_ID ${SCOPE_FLAGS[*]}"
  exit 0
fi
DESCRIBE=(compute tpus queued-resources describe "$QR_ID" "${SCOPE_FLAGS[@]}"
  --format='value(state.state)')
if is_dry_run; then
  run_gcloud "${DESCRIBE[@]}"
  exit 0
fi
while :; do
  state=$(run_gcloud "${DESCRIBE[@]}")
  case $state in
    ACTIVE)
      log "queued resource $QR_ID is ACTIVE: node $TPU_NAME is ready"
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING)
      die "queued resource $QR_ID is $state; see: gcloud compute tpus queued-resources describe $QR_ID ${SCOPE_FLAGS[*]}"
      ;;
  esac
  log "queued resource $QR_ID is ${state:-unknown}; checking again in ${POLL_SECONDS}s"
  sleep "$POLL_SECONDS"
done
