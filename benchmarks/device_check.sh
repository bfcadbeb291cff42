#!/usr/bin/env bash
# One command on a GPU machine (<= 8 minutes on one H100/H200): a fresh venv with the CUDA
# build of JAX, the attention and model tests on the GPU, then benchmarks/device_check.py
# (train-step MFU in bf16, decode bandwidth, sampler tokens/s, each attention implementation
# against xla) into one JSON, printed as a table.
#
#   benchmarks/device_check.sh [--out device_check.json]        # GPU: venv, install, test, measure
#   benchmarks/device_check.sh --no-install                      # GPU: the current python's JAX
#   benchmarks/device_check.sh --cpu [--out /tmp/dc.json]        # CPU, tiny shapes, current python
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
install=1
out=device_check.json
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) mode=cpu; install=0 ;;
    --no-install) install=0 ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    *) echo "device_check.sh: unknown argument $1 (use --cpu, --no-install, --out PATH)" >&2
       exit 2 ;;
  esac
  shift
done

python="${PYTHON:-python3}"
if [[ $install == 1 ]]; then
  venv="${DEVICE_CHECK_VENV:-/tmp/rpt_device_check_venv}"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  python="$venv/bin/python"
  "$python" -m pip install -q --upgrade pip
  # The CUDA build of JAX with the package; the model tests compare against PyTorch on CPU.
  "$python" -m pip install -q -e ".[cuda]" pytest transformers
  "$python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $mode == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  export JAX_PLATFORMS=cuda,cpu
  # One GPU: the 8-device sharding tests need the simulated CPU mesh, so they are left out.
  tests=(tests/model/test_attention.py tests/model/test_transformer.py -k "not sharded")
else
  export JAX_PLATFORMS=cpu
  tests=(tests/model/test_attention.py -k "live_lengths or refuses")
fi

set +e
summary=$("$python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tail -n 1)
set -e
echo "tests: $summary"
platform_flag=()
[[ $mode == cpu ]] && platform_flag=(--cpu)
"$python" benchmarks/device_check.py "${platform_flag[@]}" --out "$out" --tests "$summary"
