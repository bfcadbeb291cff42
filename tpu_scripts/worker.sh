#!/usr/bin/env bash
# Runs ON each TPU VM worker. The local scripts (setup.sh, run.sh, logs.sh, stop.sh) send this
# file's text over `gcloud compute tpus tpu-vm ssh --command`, as
#   bash -c "<this text>" rpt-worker SUBCOMMAND [FLAGS...]
# so the workers always run the version in the user's checkout. It can also be run by hand on
# a worker: `bash worker.sh --help`.
#
# Subcommands:
#   setup  get the source (git clone/fetch --repo URL --ref REF, or unpack --tarball FILE),
#          make a virtual environment and `pip install -e "DIR[EXTRAS]"`.
#   start  start `python -m rpt_jax.main ARGS...` in the background (setsid + nohup), one log
#          file per worker: LOG_DIR/worker-N.log; pid in LOG_DIR/job.pid. With --mount-bucket,
#          first mount that bucket with gcsfuse under --mount-root (a gs:// workdir's files).
#   stop   SIGTERM the job's process group, SIGKILL after --timeout seconds.
#   logs   print / follow (tail -F) this worker's log.
#
# Relative paths are relative to $HOME; a leading ~/ also means $HOME.
set -euo pipefail

PROG=rpt-worker

usage() {
  cat <<'EOF2'
Usage: worker.sh SUBCOMMAND [FLAGS...]   (runs on a TPU VM worker; sent there by setup.sh,
run.sh, logs.sh and stop.sh; relative paths are relative to $HOME)
  setup --dir DIR --venv DIR [--repo URL [--ref REF] | --tarball FILE] [--python VERSION|system]
        [--extras LIST] [--find-links URL] [--sync-only] [--check] [--no-gcsfuse]
  start --dir DIR --venv DIR --log-dir DIR [--env KEY=VALUE]... [--module MOD] [--grace SECONDS]
        [--mount-bucket BUCKET]... [--mount-root DIR] -- ARGS...
        (--grace: seconds the job must survive; default $RPT_START_GRACE or 3; --mount-root:
        default gcs, the job gets RPT_GCS_MOUNT_ROOT=DIR)
  stop  --log-dir DIR [--timeout SECONDS]
  logs  --log-dir DIR [--lines N] [--no-follow] [--prefix]
EOF2
}

# The worker's index in the slice: $RPT_WORKER_ID, else the TPU VM hostname suffix
# (t1v-n-<hash>-w-<N>), else the metadata server, else the hostname.
worker_id() {
  if [[ -n ${RPT_WORKER_ID:-} ]]; then
    printf '%s' "$RPT_WORKER_ID"
    return
  fi
  local host id
  host=$(hostname)
  if [[ $host =~ -w-([0-9]+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    return
  fi
  if id=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null) && [[ $id =~ ^[0-9]+$ ]]; then
    printf '%s' "$id"
    return
  fi
  printf '%s' "$host"
}

WORKER_ID=$(worker_id)
log() { printf '[%s %s] %s\n' "$PROG" "$WORKER_ID" "$*" >&2; }
die() {
  printf '[%s %s] ERROR: %s\n' "$PROG" "$WORKER_ID" "$*" >&2
  exit 1
}

# abs_path PATH: PATH made absolute against $HOME.
abs_path() {
  case $1 in
    \~) printf '%s' "$HOME" ;;
    \~/*) printf '%s/%s' "$HOME" "${1#\~/}" ;;
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$HOME" "$1" ;;
  esac
}

# need_value FLAG ARGC: fail unless the flag has a value after it.
need_value() {
  (($2 >= 2)) || die "$1 needs a value"
}

# ---- setup ----

fetch_repo() { # DIR URL REF
  local dir=$1 url=$2 ref=$3
  command -v git >/dev/null || sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq git
  if [[ ! -d $dir/.git ]]; then
    [[ ! -e $dir ]] || die "$dir exists and is not a git checkout: remove it or pass --remote-dir"
    log "cloning $url into $dir"
    git clone --quiet "$url" "$dir"
  fi
  git -C "$dir" remote set-url origin "$url"
  # Fetching the ref itself works for a branch, a tag or a commit id alike.
  git -C "$dir" fetch --quiet --tags origin "$ref"
  git -C "$dir" checkout --quiet --force FETCH_HEAD
  log "source at $ref ($(git -C "$dir" rev-parse --short HEAD))"
}

unpack_tarball() { # DIR TARBALL
  local dir=$1 tarball=$2
  [[ -f $tarball ]] || die "no source archive at $tarball"
  # Unpack beside DIR, then swap, so files deleted locally do not linger on the worker.
  rm -rf "$dir.new" "$dir.old"
  mkdir -p "$dir.new"
  tar -xzf "$tarball" -C "$dir.new"
  if [[ -e $dir ]]; then mv "$dir" "$dir.old"; fi
  mv "$dir.new" "$dir"
  rm -rf "$dir.old" "$tarball"
  log "source unpacked into $dir"
}

find_uv() {
  local candidate
  for candidate in "$(command -v uv || true)" "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do
    if [[ -n $candidate && -x $candidate ]]; then
      printf '%s' "$candidate"
      return 0
    fi
  done
  return 1
}

ensure_uv() {
  if UV=$(find_uv); then return; fi
  log "installing uv"
  python3 -m pip install --user --quiet --upgrade uv >/dev/null 2>&1 ||
    curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null
  UV=$(find_uv) || die "could not install uv: pass --python system to use python3 -m venv"
}

make_venv() { # VENV PYTHON
  local venv=$1 python=$2 have
  if [[ -x $venv/bin/python ]]; then
    have=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $python == system || $python == "$have" ]]; then
      log "reusing $venv (Python $have)"
      return
    fi
    log "$venv has Python $have, not $python: recreating it"
    rm -rf "$venv"
  fi
  if [[ $python == system ]]; then
    if ! python3 -m venv "$venv"; then
      sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3-venv
      python3 -m venv "$venv"
    fi
  else
    # The TPU images ship Ubuntu 22.04's Python 3.10, older than current JAX needs: uv brings
    # the requested interpreter.
    ensure_uv
    "$UV" venv --quiet --seed --python "$python" "$venv"
  fi
  log "created $venv ($("$venv/bin/python" --version 2>&1))"
}

# ---- Cloud Storage FUSE: a gs:// workdir's files other than checkpoints (see rpt_jax.run_dir) ----

ensure_gcsfuse() {
  if command -v gcsfuse >/dev/null; then return; fi
  log "installing gcsfuse (Cloud Storage FUSE)"
  local codename
  codename=$(lsb_release -c -s)
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq gcsfuse
}

mount_bucket() { # BUCKET DIR
  local bucket=$1 dir=$2
  if mountpoint -q "$dir" 2>/dev/null; then
    log "gs://$bucket is mounted at $dir"
    return
  fi
  command -v gcsfuse >/dev/null ||
    die "gcsfuse is not installed: run setup.sh again (it installs it) or mount gs://$bucket at $dir yourself"
  mkdir -p "$dir"
  # --implicit-dirs: folders that gs:// writers (Orbax) create without folder objects show up.
  gcsfuse --implicit-dirs "$bucket" "$dir"
  log "mounted gs://$bucket at $dir"
}

cmd_setup() {
  local dir='' venv='' repo='' ref=main tarball='' python=3.12 extras=tpu find_links=''
  local sync_only=0 check=0 gcsfuse=1
  while (($#)); do
    case $1 in
      --dir) need_value "$1" $# && dir=$2 && shift ;;
      --venv) need_value "$1" $# && venv=$2 && shift ;;
      --repo) need_value "$1" $# && repo=$2 && shift ;;
      --ref) need_value "$1" $# && ref=$2 && shift ;;
      --tarball) need_value "$1" $# && tarball=$2 && shift ;;
      --python) need_value "$1" $# && python=$2 && shift ;;
      --extras) need_value "$1" $# && extras=$2 && shift ;;
      --find-links) need_value "$1" $# && find_links=$2 && shift ;;
      --sync-only) sync_only=1 ;;
      --check) check=1 ;;
      --no-gcsfuse) gcsfuse=0 ;;
      *) die "setup: unknown flag $1" ;;
    esac
    shift
  done
  [[ -n $dir && -n $venv ]] || die "setup needs --dir and --venv"
  dir=$(abs_path "$dir")
  venv=$(abs_path "$venv")
  if [[ -n $repo ]]; then
    fetch_repo "$dir" "$repo" "$ref"
  elif [[ -n $tarball ]]; then
    unpack_tarball "$dir" "$(abs_path "$tarball")"
  fi
  [[ -f $dir/setup.py || -f $dir/pyproject.toml ]] ||
    die "no rpt_jax source in $dir: run setup.sh with --repo URL or --local"
  if ((sync_only)); then
    log "source synced; skipping install (--sync-only)"
    return
  fi

  make_venv "$venv" "$python"
  local spec="$dir${extras:+[$extras]}" links=()
  if [[ -n $find_links ]]; then links=(--find-links "$find_links"); fi
  log "installing -e $spec"
  if [[ $python == system ]]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet ${links[@]+"${links[@]}"} -e "$spec"
  else
    ensure_uv
    "$UV" pip install --quiet --python "$venv/bin/python" ${links[@]+"${links[@]}"} -e "$spec"
  fi
  local jax_version
  jax_version=$("$venv/bin/python" -c 'import jax; print(jax.__version__)') ||
    die "jax does not import in $venv after the install (see the error above)"
  log "installed rpt_jax with jax $jax_version"
  if ((gcsfuse)); then ensure_gcsfuse; fi
  if ((check)); then
    # Every worker must run this at once on a pod slice: TPU start-up is collective.
    "$venv/bin/python" -c 'import jax; print("process", jax.process_index(), "of", jax.process_count(), "local devices", jax.local_device_count(), "global devices", jax.device_count())'
  fi
}

# ---- start / stop / logs ----

# alive PID: the process exists and is not a zombie.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  if [[ -r /proc/$1/stat ]] && stat=$(</proc/"$1"/stat); then
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] || return 1
  fi
  return 0
}

# running PIDFILE: print the job's pid and succeed when it is alive.
running() {
  local pid
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
    printf '%s' "$pid"
    return 0
  fi
  return 1
}

cmd_start() {
  local dir='' venv='' log_dir='' module=rpt_jax.main grace=${RPT_START_GRACE:-3} envs=()
  local buckets=() mount_root=gcs bucket
  while (($#)); do
    case $1 in
      --dir) need_value "$1" $# && dir=$2 && shift ;;
      --venv) need_value "$1" $# && venv=$2 && shift ;;
      --log-dir) need_value "$1" $# && log_dir=$2 && shift ;;
      --env) need_value "$1" $# && envs+=("$2") && shift ;;
      --module) need_value "$1" $# && module=$2 && shift ;;
      --grace) need_value "$1" $# && grace=$2 && shift ;;
      --mount-bucket) need_value "$1" $# && buckets+=("$2") && shift ;;
      --mount-root) need_value "$1" $# && mount_root=$2 && shift ;;
      --)
        shift
        break
        ;;
      *) die "start: unknown flag $1" ;;
    esac
    shift
  done
  [[ -n $dir && -n $venv && -n $log_dir ]] || die "start needs --dir, --venv and --log-dir"
  dir=$(abs_path "$dir")
  venv=$(abs_path "$venv")
  log_dir=$(abs_path "$log_dir")
  local python=$venv/bin/python pid_file=$log_dir/job.pid log_file pid
  log_file=$log_dir/worker-$WORKER_ID.log
  [[ -x $python ]] || die "no Python at $python: run setup.sh first"
  [[ -d $dir ]] || die "no source at $dir: run setup.sh first"
  mkdir -p "$log_dir"
  if pid=$(running "$pid_file"); then
    die "a job is already running here (pid $pid): stop it first with stop.sh"
  fi
  rm -f "$pid_file"
  if ((${#buckets[@]})); then
    mount_root=$(abs_path "$mount_root")
    for bucket in "${buckets[@]}"; do mount_bucket "$bucket" "$mount_root/$bucket"; done
    export RPT_GCS_MOUNT_ROOT=$mount_root
  fi
  local kv
  for kv in ${envs[@]+"${envs[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
    export "${kv?}"
  done
  cd "$dir"
  printf '==== %s worker %s: %s -m %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$WORKER_ID" \
    "$python" "$module" "$*" >>"$log_file"
  # setsid: the job leads its own process group (stop kills the group) and outlives the ssh
  # session. The inner shell records its pid and runs python, again while it exits with
  # rpt_jax's preemption code (75: stopped on SIGTERM/preemption after a checkpoint, resumes),
  # at most RPT_MAX_RESTARTS times; a SIGTERM to the shell itself (stop.sh) ends the loop once
  # python has saved and exited.
  # shellcheck disable=SC2016  # $$, $@ and the loop belong to the inner shell
  PYTHONUNBUFFERED=1 RPT_MAX_RESTARTS=${RPT_MAX_RESTARTS:-100} setsid nohup bash -c '
    echo $$ >"$0"
    stop=0 restarts=0
    trap "stop=1" TERM
    while :; do
      "$@" &
      child=$!
      wait "$child"
      rc=$?
      while kill -0 "$child" 2>/dev/null; do  # a trapped SIGTERM interrupted the wait
        wait "$child"
        rc=$?
      done
      if ((stop || rc != 75 || restarts >= RPT_MAX_RESTARTS)); then exit "$rc"; fi
      restarts=$((restarts + 1))
      printf "==== %s exit 75 (preempted; checkpoint saved): restart %d of at most %d\n" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$restarts" "$RPT_MAX_RESTARTS"
    done' "$pid_file" "$python" -m "$module" "$@" >>"$log_file" 2>&1 </dev/null &
  local waited=0
  until [[ -s $pid_file ]] || ((waited >= 50)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  sleep "$grace"
  if ! pid=$(running "$pid_file"); then
    tail -n 30 "$log_file" >&2 || true
    die "the job exited within ${grace}s; full log: $log_file"
  fi
  log "started pid $pid; log: $log_file"
}

cmd_stop() {
  local log_dir='' timeout=30 pid
  while (($#)); do
    case $1 in
      --log-dir) need_value "$1" $# && log_dir=$2 && shift ;;
      --timeout) need_value "$1" $# && timeout=$2 && shift ;;
      *) die "stop: unknown flag $1" ;;
    esac
    shift
  done
  [[ -n $log_dir ]] || die "stop needs --log-dir"
  local pid_file
  pid_file=$(abs_path "$log_dir")/job.pid
  if ! pid=$(running "$pid_file"); then
    log "no job running"
    rm -f "$pid_file"
    return 0
  fi
  log "stopping pid $pid (SIGTERM to its process group)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while alive "$pid" && ((waited < timeout * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if alive "$pid"; then
    log "still alive after ${timeout}s: SIGKILL to its process group"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
  log "stopped"
}

cmd_logs() {
  local log_dir='' lines=100 follow=1 prefix=0
  while (($#)); do
    case $1 in
      --log-dir) need_value "$1" $# && log_dir=$2 && shift ;;
      --lines) need_value "$1" $# && lines=$2 && shift ;;
      --no-follow) follow=0 ;;
      --prefix) prefix=1 ;;
      *) die "logs: unknown flag $1" ;;
    esac
    shift
  done
  [[ -n $log_dir ]] || die "logs needs --log-dir"
  local log_file
  log_file=$(abs_path "$log_dir")/worker-$WORKER_ID.log
  [[ -f $log_file ]] || die "no log at $log_file: has run.sh started a job on this worker?"
  local tail_args=(-n "$lines")
  if ((follow)); then tail_args+=(-F); fi
  if ((prefix)); then
    # With --worker=all the workers' lines interleave: tag each with its worker.
    tail "${tail_args[@]}" "$log_file" | sed -u "s/^/[worker $WORKER_ID] /"
  else
    tail "${tail_args[@]}" "$log_file"
  fi
}

main() {
  local sub=${1:-}
  case $sub in
    setup | start | stop | logs)
      shift
      "cmd_$sub" "$@"
      ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage >&2
      die "unknown subcommand '$sub'"
      ;;
  esac
}

main "$@"
