#!/usr/bin/env bash
# Put rpt_jax on every worker of a TPU VM / pod slice and install it with its [tpu] extra.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL=${REPO_URL:-}
REF=${REF:-main}
LOCAL=${LOCAL:-0}
LOCAL_SRC=${LOCAL_SRC:-$(cd "$TPU_SCRIPTS_DIR/.." && pwd)}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
EXTRAS=${EXTRAS:-tpu}
FIND_LINKS=${FIND_LINKS:-}
SYNC_ONLY=${SYNC_ONLY:-0}
CHECK=${CHECK:-0}
GCSFUSE=${GCSFUSE:-1}
WORKER=${WORKER:-all}
# Where the source archive lands on each worker (relative to home) with --local.
REMOTE_TARBALL=rpt_jax-src.tar.gz

usage() {
  cat <<EOF
Usage: $PROG [NAME] (--repo URL [--ref REF] | --local) [flags]

On every worker (--worker=all): get the rpt_jax source, make a Python virtual environment and
run \`pip install -e "REMOTE_DIR[tpu]"\`. Run it again after changing the code; with an
editable install, --sync-only (copy the code, skip the install) is enough unless the
dependencies changed.

Source (one is required):
  --repo URL            REPO_URL          git clone URL on each worker, then check out --ref
  --ref REF             REF               main   (branch, tag or commit)
  --local               LOCAL=1           copy this checkout: its git-tracked and untracked,
                                          not-ignored files, packed and sent with
                                          gcloud compute tpus tpu-vm scp --worker=all
  --src DIR             LOCAL_SRC         the checkout for --local (default: this repository)
Install:
  --python V            PYTHON_VERSION    3.12   (made with uv); "system": python3 -m venv
  --extras LIST         EXTRAS            tpu    (pip extras, comma-separated)
  --find-links URL      FIND_LINKS        extra wheel index page for pip (e.g. libtpu releases)
  --sync-only           SYNC_ONLY=1       only update the source, skip the install
  --check               CHECK=1           afterwards, print JAX's device counts on every worker
  --no-gcsfuse          GCSFUSE=0         skip installing gcsfuse (run.sh mounts a gs:// workdir's
                                          bucket with it; needed unless the workdir is local)
  --worker W            WORKER            all
$REMOTE_FLAGS_HELP
$COMMON_FLAGS_HELP

Examples:
  $PROG my-v4 --repo https://github.com/ORG/rpt_jax.git --ref main --check
  $PROG my-v4 --local
EOF
}

while (($#)); do
  case $1 in
    --repo | --repo=*) flag_value "$@" && REPO_URL=$VALUE ;;
    --ref | --ref=*) flag_value "$@" && REF=$VALUE ;;
    --local) LOCAL=1 && SHIFT=1 ;;
    --src | --src=*) flag_value "$@" && LOCAL_SRC=$VALUE ;;
    --python | --python=*) flag_value "$@" && PYTHON_VERSION=$VALUE ;;
    --extras | --extras=*) flag_value "$@" && EXTRAS=$VALUE ;;
    --find-links | --find-links=*) flag_value "$@" && FIND_LINKS=$VALUE ;;
    --sync-only) SYNC_ONLY=1 && SHIFT=1 ;;
    --check) CHECK=1 && SHIFT=1 ;;
    --no-gcsfuse) GCSFUSE=0 && SHIFT=1 ;;
    --worker | --worker=*) flag_value "$@" && WORKER=$VALUE ;;
    *) remote_flag "$@" || common_flag "$@" || { positional_name "$1" && SHIFT=1; } ;;
  esac
  shift "$SHIFT"
done

require_name
validate_worker "$WORKER"
if [[ -n $REPO_URL ]] && is_true "$LOCAL"; then usage_error "pass --repo or --local, not both"; fi
if [[ -z $REPO_URL ]] && ! is_true "$LOCAL"; then
  usage_error "missing the source: pass --repo URL [--ref REF] (git clone on the workers) or --local (copy this checkout)"
fi
[[ -n $REF ]] || usage_error "--ref is empty"

# pack_source DIR TARBALL: the files git would consider part of DIR (tracked + untracked, not
# ignored), so .venv, caches and run outputs stay home.
pack_source() {
  local src=$1 tarball=$2 list=$2.files path
  [[ -f $src/setup.py ]] || die "$src does not look like the rpt_jax checkout (no setup.py): pass --src DIR"
  : >"$list"
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # ls-files lists deleted-but-tracked paths too: keep only what exists.
    while IFS= read -r -d '' path; do
      if [[ -f $src/$path || -L $src/$path ]]; then printf '%s\0' "$path" >>"$list"; fi
    done < <(git -C "$src" ls-files -z --cached --others --exclude-standard)
  else
    warn "$src is not a git checkout: sending everything except .git, .venv and caches"
    (cd "$src" && find . \( -name .git -o -name .venv -o -name __pycache__ \) -prune -o \
      -type f -print0) >"$list"
  fi
  tar -czf "$tarball" -C "$src" --null -T "$list"
  rm -f "$list"
}

WORKER_ARGS=(setup --dir "$REMOTE_DIR" --venv "$VENV_DIR" --python "$PYTHON_VERSION" --extras "$EXTRAS")
if [[ -n $FIND_LINKS ]]; then WORKER_ARGS+=(--find-links "$FIND_LINKS"); fi
if is_true "$SYNC_ONLY"; then WORKER_ARGS+=(--sync-only); fi
if is_true "$CHECK"; then WORKER_ARGS+=(--check); fi
if ! is_true "$GCSFUSE"; then WORKER_ARGS+=(--no-gcsfuse); fi

if is_true "$LOCAL"; then
  LOCAL_SRC=$(cd "$LOCAL_SRC" && pwd) || usage_error "--src: no directory '$LOCAL_SRC'"
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/rpt_jax_setup.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  TARBALL=$TMP/$REMOTE_TARBALL
  if is_dry_run; then
    log "dry run: would pack $LOCAL_SRC into $TARBALL"
  else
    pack_source "$LOCAL_SRC" "$TARBALL"
    log "packed $LOCAL_SRC into $TARBALL ($(wc -c <"$TARBALL" | tr -d ' ') bytes)"
  fi
  tpu_scp "$WORKER" "$TARBALL" "$REMOTE_TARBALL"
  WORKER_ARGS+=(--tarball "$REMOTE_TARBALL")
else
  WORKER_ARGS+=(--repo "$REPO_URL" --ref "$REF")
fi

log "setting up $TPU_NAME (worker $WORKER): this takes a few minutes"
tpu_ssh "$WORKER" "${WORKER_ARGS[@]}"
is_dry_run || log "done; next: run.sh $TPU_NAME --workdir=gs://BUCKET/run"
