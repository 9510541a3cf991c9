#!/usr/bin/env bash
# Wheels for a GPU machine without internet that already has jax (with CUDA), torch and transformers, as
# lent cloud boxes and cluster images often do: what bench/gpu_suite.sh needs beyond those, at the versions
# requirements.txt pins (array_record and portpicker: grain's needs, pinned here), for that machine's Python.
#
#   bash bench/offline_wheels.sh [PYTHON_VERSION] [DIR]    # default: 3.12 into .whl (git ignores it)
#
# Then, on the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash bench/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
dir="${2:-.whl}"
pinned() {  # NAME...: NAME==VERSION as requirements.txt pins it; stops if it does not
  local name line
  for name in "$@"; do
    line="$(grep -E "^${name}==" requirements.txt | cut -d' ' -f1)"
    [ -n "$line" ] || { echo "offline_wheels.sh: requirements.txt pins no $name" >&2; exit 1; }
    echo "$line"
  done
}
mkdir -p "$dir"
# --no-deps: each need is named, so that nothing the machine already has (numpy, absl-py, protobuf, ...)
# arrives in a second version.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" \
  $(pinned ml_collections grain bm25s) array_record==0.8.6 portpicker==1.6.0
ls -1 "$dir"
