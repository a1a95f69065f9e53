#!/usr/bin/env bash
# The GPU codec's check on a machine with a CUDA device: torch with CUDA and triton installed,
# no Horovod needed, no network needed, no virtual environment of ours needed.
#   1. the core's compiled CPU loops (native.c), built with the C compiler when they are not
#      built for this Python (optional: without them the core runs its numpy reference, the
#      same bytes, only slower to compare against);
#   2. tests/unit/test_gpu_kernels.py, compiled on the GPU: payload bytes and decoded sums
#      identical to the core's;
#   3. benchmarks/gpu_speed.py: encode / decode-of-8 time against a device copy, after checking
#      the payloads and sums of every configuration against the core at 1M (and, with native.c,
#      16M) elements.
# The whole run stays under 8 minutes (each step has its own time limit).
#   PYTHON=python3.12 scripts/gpu_check.sh
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the kernels must run compiled
log() { printf '[gpu-check] %s\n' "$*"; }

if ! "$PY" -c "import torch, triton, numpy; assert torch.cuda.is_available()" 2>/dev/null; then
  log "needs torch with a CUDA device, triton and numpy for $PY; nothing checked"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | sed 's/^/[gpu-check]   /'
  exit 1
fi
"$PY" -c "import torch, triton; print('[gpu-check]', torch.cuda.get_device_name(0), \
'torch', torch.__version__, 'triton', triton.__version__)"

SUFFIX=$("$PY" -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])")
if [ ! -e "horovod_tnq/core/_native$SUFFIX" ] && command -v "${CC:-cc}" >/dev/null; then
  # a ctypes library (native.py): no Python headers needed; the same flags as setup.py
  if "${CC:-cc}" -O3 -std=c99 -ffp-contract=off -fno-fast-math -shared -fPIC \
      horovod_tnq/core/native.c -o "horovod_tnq/core/_native$SUFFIX" -lm; then
    log "built horovod_tnq/core/_native$SUFFIX"
  else
    log "native.c not built: the core compares on its numpy reference"
  fi
fi

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  log "tests/unit/test_gpu_kernels.py on the GPU"
  timeout 270 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_gpu_kernels.py || status=1
else
  log "pytest is not installed for $PY: tests skipped (the benchmark still checks exactness)"
  status=1
fi

log "benchmarks/gpu_speed.py"
timeout 200 "$PY" -m benchmarks.gpu_speed || status=1
log "done (status $status)"
exit $status
