#!/usr/bin/env bash
# Runs the main job on every GPU of this machine.
#   launch/gpu/local_multi_gpu.sh [--dry-run] [--processes N] [--gpus G] [--port P] CONFIG[:ARGS] WORKDIR [--config.KEY=VALUE ...]
#
# --processes 1 (the default, and the JAX way on one node): one process drives all
#   G GPUs; the mesh spans them and the batch is split over them.
# --processes N > 1: N processes of G/N GPUs each (CUDA_VISIBLE_DEVICES), joined
#   through jax.distributed at 127.0.0.1:P; the same job as N hosts would run, on
#   one machine (e.g. to rehearse a multi-node run). Process 0 prints and writes
#   WORKDIR/run.log; process i > 0 writes WORKDIR/process_<i>.log.
# --dry-run prints the commands, one per line, as they would run, and runs nothing.
# G defaults to what nvidia-smi lists; PYTHON (default: python) picks the interpreter.
set -euo pipefail

usage="usage: $0 [--dry-run] [--processes N] [--gpus G] [--port P] CONFIG[:ARGS] WORKDIR [--config.KEY=VALUE ...]"
dry_run=0 processes=1 gpus="" port=12355
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --processes) processes=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
python=${PYTHON:-python}

if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi --list-gpus | wc -l)
fi
if [ "$processes" -lt 1 ] || [ "$gpus" -lt "$processes" ] || [ $((gpus % processes)) -ne 0 ]; then
  echo "error: $gpus GPUs do not split evenly into $processes processes" >&2
  exit 2
fi

# The command of process $1 (followed by the job's extra arguments), into the array `cmd`.
command_of() {
  local i=$1 per=$((gpus / processes))
  shift
  cmd=()
  if [ "$processes" -gt 1 ]; then
    cmd+=(env "CUDA_VISIBLE_DEVICES=$(seq -s, $((i * per)) $((i * per + per - 1)))")
  fi
  cmd+=("$python" -m pixrec_jax.main --config "$config" --workdir "$workdir")
  if [ "$processes" -gt 1 ]; then
    cmd+=(--config.distributed.enabled=true "--config.distributed.coordinator_address=127.0.0.1:$port"
          "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$i")
  else
    # Never mistake a surrounding SLURM allocation or JAX_* variables for a multi-process job.
    cmd+=(--config.distributed.enabled=false)
  fi
  cmd+=("$@")
}

# One word as a shell reads it back (the quoting of Python's shlex.quote).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < processes; i++)); do
    command_of "$i" "$@"
    line=""
    for word in "${cmd[@]}"; do
      line+="${line:+ }$(quote "$word")"
    done
    echo "$line"
  done
  exit 0
fi

mkdir -p "$workdir"
if [ "$processes" = 1 ]; then
  command_of 0 "$@"
  "${cmd[@]}" 2>&1 | tee -a "$workdir/run.log"
  exit "${PIPESTATUS[0]}"
fi

pids=()
# One process failing leaves the others waiting at a collective: stop the ones this script started.
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
for ((i = 1; i < processes; i++)); do
  command_of "$i" "$@"
  "${cmd[@]}" >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
command_of 0 "$@"
status=0
"${cmd[@]}" 2>&1 | tee -a "$workdir/run.log" || status=$?
if [ "$status" != 0 ]; then
  cleanup
fi
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [ "$status" = 0 ]; then
    status=$rc
  fi
done
pids=()
exit "$status"
