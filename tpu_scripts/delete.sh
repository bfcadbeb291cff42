#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource (with its node when --force), after confirmation.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=${QUEUED:-0}
QR_ID=${QR_ID:-}
FORCE=${FORCE:-0}
ASYNC=${ASYNC:-0}
YES=${YES:-0}

usage() {
  cat <<EOF2
Usage: $PROG [NAME] [--queued [--qr-id ID] [--force]] [--async] [--yes] [flags]

Without --queued:  gcloud compute tpus tpu-vm delete NAME --zone=.. --quiet [--async]
With --queued:     gcloud compute tpus queued-resources delete QR_ID --zone=.. --quiet
                       [--force] [--async]
Asks for confirmation first unless --yes (required when stdin is not a terminal).

Flags (flag / environment variable / default):
  --queued              QUEUED=1          delete the queued resource instead of the TPU VM
  --qr-id ID            QR_ID             NAME   (the queued resource id)
  --force               FORCE=1           queued: also delete the resource's running TPU VM
                                          (without it gcloud refuses while the node exists)
  --async               ASYNC=1           return without waiting for the deletion
  --yes, -y             YES=1             do not ask
$COMMON_FLAGS_HELP
EOF2
}

while (($#)); do
  case $1 in
    --queued) QUEUED=1 && SHIFT=1 ;;
    --qr-id | --qr-id=*) flag_value "$@" && QR_ID=$VALUE ;;
    --force) FORCE=1 && SHIFT=1 ;;
    --async) ASYNC=1 && SHIFT=1 ;;
    --yes | -y) YES=1 && SHIFT=1 ;;
    *) common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
if ! is_true "$QUEUED"; then
  if is_true "$FORCE"; then usage_error "--force applies to queued resources: add --queued"; fi
  [[ -z $QR_ID ]] || usage_error "--qr-id needs --queued"
fi
QR_ID=${QR_ID:-$TPU_NAME}

scope_flags
if is_true "$QUEUED"; then
  WHAT="queued resource $QR_ID"
  if is_true "$FORCE"; then WHAT+=" and its TPU VM"; fi
  ARGS=(compute tpus queued-resources delete "$QR_ID" "${SCOPE_FLAGS[@]}" --quiet)
  if is_true "$FORCE"; then ARGS+=(--force); fi
else
  WHAT="TPU VM $TPU_NAME"
  ARGS=(compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE_FLAGS[@]}" --quiet)
fi
if is_true "$ASYNC"; then ARGS+=(--async); fi
WHERE="zone $ZONE${PROJECT:+, project $PROJECT}"

if ! is_true "$YES" && ! is_dry_run; then
  [[ -t 0 ]] || die "refusing to delete $WHAT ($WHERE) without confirmation: pass --yes"
  read -r -p "Delete $WHAT ($WHERE)? Everything on its disks is lost. [y/N] " answer
  case $answer in
    y | Y | yes | YES) ;;
    *) die "not deleted" ;;
  esac
fi
log "deleting $WHAT ($WHERE)"
run_gcloud "${ARGS[@]}"
