#!/usr/bin/env bash
# Builds and installs Horovod 0.28.1 (its last release) with gloo, for PyTorch and TensorFlow,
# into the Python environment of $PYTHON (default: .venv/bin/python).
#
# As released, 0.28.1 does not build against torch >= 2.1 / TensorFlow 2.21. The build takes
# its PyPI sdist and applies scripts/horovod-0.28.1.patch, three CMake-level changes:
#   1. the torch extension is compiled as C++17 (it was C++14; torch >= 2.1 and TF's absl
#      headers stop with "C++ versions less than C++17 are not supported");
#   2. it links the C++17 copy of the bundled gloo (`compatible17_gloo`, which Horovod already
#      knew how to make for TensorFlow; now also made when torch needs it): the C++11 copy
#      fails to link with a duplicate gloo::rendezvous::Store::kDefaultTimeout;
#   3. horovod/tensorflow/xla_mpi_ops.cc is left out: it needs highwayhash headers the TF 2.21
#      wheel does not ship, and serves only XLA on GPU.
# No MPI, no MXNet. The wheel is kept under ~/.cache/prefect-distrain/wheels, keyed by the
# Horovod, torch, TensorFlow and Python versions: pip does not cache wheels built from a
# patched local directory, so without this every install would build again (~5 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
version=0.28.1
read -r torch_version tf_version py_version < <(TF_CPP_MIN_LOG_LEVEL=3 "$python" -c "
import sys, torch, tensorflow as tf
print(torch.__version__.replace('+', '_'), tf.__version__, f'{sys.version_info.major}{sys.version_info.minor}')")
cache=${XDG_CACHE_HOME:-$HOME/.cache}/prefect-distrain/wheels/horovod-$version-torch$torch_version-tf$tf_version-py$py_version
pip=("$python" -m pip install --quiet --progress-bar off -c constraints.txt)

if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "Building Horovod $version for torch $torch_version and TensorFlow $tf_version (takes minutes)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$python" -m pip download --quiet --no-deps --no-binary :all: "horovod==$version" -d "$work"
  tar xzf "$work/horovod-$version.tar.gz" -C "$work"
  patch -d "$work/horovod-$version" -p1 --quiet < scripts/horovod-$version.patch
  "${pip[@]}" cmake setuptools wheel
  mkdir -p "$cache"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
  MAKEFLAGS="-j$(nproc)" \
    "$python" -m pip wheel --quiet --no-build-isolation --no-deps -w "$cache" "$work/horovod-$version"
fi
"${pip[@]}" cloudpickle psutil pyyaml packaging
"${pip[@]}" --no-deps "$cache"/horovod-*.whl
"$(dirname "$python")/horovodrun" --check-build
