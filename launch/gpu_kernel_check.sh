#!/usr/bin/env bash
# One-shot check of the optional CUDA kernels (hyena_cp/ops/kernels.py) on a machine with a GPU:
# installs causal-conv1d and subquadratic-ops-torch-cu<CUDA major> where it can, runs the GPU
# tests (tests/test_kernels_gpu.py: each kernel against the pure-torch path, outputs and
# gradients, fp32 and bf16) and the CPU dispatch tests, then prints the status and a table of
# errors and forward+backward times (launch/kernel_check.py).
#
#   bash launch/gpu_kernel_check.sh
#   KERNEL_WHEELS=/path/to/wheels bash launch/gpu_kernel_check.sh   # offline: install from there
#   SKIP_INSTALL=1 bash launch/gpu_kernel_check.sh                  # test what is installed
#
# Environment read here:
#   PYTHON          interpreter of the venv with hyena_cp and a CUDA torch (default: python)
#   KERNEL_WHEELS   a folder of wheels: pip installs from it only (--no-index)
#   SKIP_INSTALL=1  install nothing
#   PIP_TIMEOUT_S   seconds per pip install before giving up (default 900: causal-conv1d may
#                   compile from source when no prebuilt wheel matches torch and CUDA)
# pip runs with --no-deps so that it can never replace the installed torch. A package that does
# not install is reported and its tests skip: the torch path is then what runs.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device (or a CPU build of torch): the kernels cannot run here; CPU tests only"
    "$py" -m pytest -q tests/test_kernels.py
    exit $?
fi

cuda_major=$("$py" -c 'import torch; print(torch.version.cuda.split(".")[0])')
if [[ -z ${SKIP_INSTALL:-} ]]; then
    source_args=()
    [[ -n ${KERNEL_WHEELS:-} ]] && source_args=(--no-index --find-links "$KERNEL_WHEELS")
    for pkg in causal-conv1d "subquadratic-ops-torch-cu${cuda_major}"; do
        if timeout "${PIP_TIMEOUT_S:-900}" "$py" -m pip install --no-deps --no-build-isolation \
                "${source_args[@]}" "$pkg"; then
            echo "installed $pkg"
        else
            echo "could not install $pkg: its convolution stays on the torch path"
        fi
    done
fi

"$py" -m pytest -q -rs tests/test_kernels_gpu.py tests/test_kernels.py
status=$?
"$py" launch/kernel_check.py || status=1
exit $status
