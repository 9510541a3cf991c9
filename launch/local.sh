#!/usr/bin/env bash
# Runs the main job on this machine with all of its accelerators (or CPU cores).
#   launch/local.sh CONFIG[:ARGS] WORKDIR [--config.KEY=VALUE ...]
# XLA_FLAGS and JAX_PLATFORMS pass through; on a CPU-only host, set
# PIXREC_HOST_DEVICES=N to split the CPU into N devices for sharding tests.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARGS] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
if [ -n "${PIXREC_HOST_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${PIXREC_HOST_DEVICES}"
fi
mkdir -p "$workdir"
python -m pixrec_jax.main --config "$config" --workdir "$workdir" "$@" 2>&1 | tee -a "$workdir/run.log"
