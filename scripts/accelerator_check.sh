#!/usr/bin/env bash
# One command to check flaxtrain on this machine's accelerator.
#
#   bash scripts/accelerator_check.sh [--tiny] [--no-install] [--skip-tests] [--out DIR]
#
# Detects the device: an NVIDIA GPU (nvidia-smi lists one), a TPU VM (/dev/accel*,
# VFIO groups under /dev/vfio, or TPU_* environment variables), else the CPU. Installs
# the matching extra into the current environment (pip install -e '.[cuda12]' or
# '.[tpu]'; --no-install skips it), then runs scripts/accelerator_check.py: a subset of
# the tests on the device (--skip-tests skips them), train throughput of fashion_cnn and
# ResNet-50 (bf16, 224 px) through flaxtrain's compiled chunk with steps_per_dispatch 1
# and 25, MFU, the ratio to a bare jitted step, and two identical topology-invariant
# runs that must give bitwise-equal parameters. Prints a table; writes
# DIR/accelerator_check.json (default DIR: runs/accelerator_check).
#
# --tiny: a CPU smoke test in well under a minute (small batches, 25 steps, a small
# ResNet at 32 px instead of ResNet-50). On a GPU or TPU machine the full check takes a
# few minutes, most of it compiling ResNet-50 three times.
#
# Python: $PYTHON, else the active virtualenv's, else ./.venv/bin/python, else python3.
# Exit status: 0 when everything ran and passed, 1 when a test, a measurement or the
# determinism check failed, 2 for bad arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tiny=0
install=1
skip_tests=0
out="$ROOT/runs/accelerator_check"

usage() { sed -n '2,22s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case "$1" in
    --tiny) tiny=1 ;;
    --no-install) install=0 ;;
    --skip-tests) skip_tests=1 ;;
    --out)
      [[ $# -ge 2 ]] || { echo "accelerator_check: --out needs a directory" >&2; exit 2; }
      out="$2"
      shift
      ;;
    --out=*) out="${1#--out=}" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "accelerator_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  py="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  py="$ROOT/.venv/bin/python"
else
  py="python3"
fi

# A TPU VM's chips: /dev/accel* (v2-v4, v5p), VFIO groups (v5e, v6e).
tpu_devices() {
  compgen -G '/dev/accel*' || true
  compgen -G '/dev/vfio/[0-9]*' || true
}

platform=cpu
detected_by="no GPU or TPU found"
extra=""
gpus="$(nvidia-smi -L 2>/dev/null || true)"
if [[ "$gpus" == GPU* || "$gpus" == *$'\n'GPU* ]]; then
  platform=gpu
  extra=cuda12
  detected_by="nvidia-smi: $(grep -o '^GPU [0-9]*: [^(]*' <<<"$gpus" | cut -d' ' -f3- |
    sed 's/ *$//' | sort | uniq -c | sed 's/^ *//' | paste -sd, -)"
elif [[ -n "$(tpu_devices)${TPU_NAME:-}${TPU_ACCELERATOR_TYPE:-}${TPU_WORKER_ID:-}" ]]; then
  platform=tpu
  extra=tpu
  detected_by="TPU VM: $(tpu_devices | paste -sd, -)"
  detected_by+="${TPU_ACCELERATOR_TYPE:+ TPU_ACCELERATOR_TYPE=$TPU_ACCELERATOR_TYPE}"
fi
echo "accelerator_check: $platform ($detected_by); python: $py" >&2

install_status="not needed on CPU"
if [[ -n "$extra" ]]; then
  if ((install)); then
    echo "accelerator_check: installing flaxtrain[$extra] into $("$py" -c 'import sys; print(sys.prefix)')" >&2
    start=$SECONDS
    if "$py" -m pip --version >/dev/null 2>&1; then
      pip_cmd=("$py" -m pip install --quiet --disable-pip-version-check)
    elif command -v uv >/dev/null 2>&1; then
      pip_cmd=(uv pip install --quiet --python "$py")
    else
      pip_cmd=()
    fi
    packages=(-e "${ROOT}[$extra]")
    ((skip_tests)) || packages+=("pytest>=8")  # For the device tests; in the dev extra too.
    if ((${#pip_cmd[@]})) && "${pip_cmd[@]}" "${packages[@]}"; then
      install_status="installed flaxtrain[$extra] in $((SECONDS - start)) s"
    else
      # Offline machines may have it already: the check then says whether jax sees the device.
      install_status="FAILED to install flaxtrain[$extra]; continuing with what is installed"
      echo "accelerator_check: $install_status" >&2
    fi
  else
    install_status="skipped (--no-install)"
  fi
fi

args=(--out="$out" --platform="$platform" --detected_by="$detected_by" --install="$install_status")
((tiny)) && args+=(--tiny)
((skip_tests)) && args+=(--skip_tests)
cd "$ROOT"
exec "$py" scripts/accelerator_check.py "${args[@]}"
