#!/usr/bin/env bash
# Downloads into .wheels/ the wheels of our dependencies that the GPU machine's image lacks
# (grain and its array_record and portpicker, ml_collections, tensorboardX), built for what that
# machine runs: Linux x86-64, CPython 3.12. Everything else engram_jax needs (jax, flax, optax,
# orbax-checkpoint, tensorstore, etils, absl-py, cloudpickle, protobuf, psutil, PyYAML, packaging,
# tokenizers, sympy, tqdm, numpy) is installed there already. Versions are the ones the test suite
# runs with. Extra NAME==VERSION arguments are fetched too (e.g. a newer optax, should the image's
# be too old).
#
#   bash bench/fetch_wheels.sh [NAME==VERSION ...]
#
# bench/run_gpu.sh installs whatever .wheels/ holds with `pip install --no-index --no-deps`;
# .wheels/ is git-ignored, so it travels to the GPU machine only when named in the run's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS_DIR:-.wheels}
PYVER=${WHEELS_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each package: two would stop the whole install
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" \
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5 "$@"
ls -l "$DEST"
du -sh "$DEST"
