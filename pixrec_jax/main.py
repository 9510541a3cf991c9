"""python -m pixrec_jax.main --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

Trains PixRec and evaluates it on held-out targets; writes DIR/metrics.json.
Checkpoints go to DIR/checkpoints; running the same command again resumes from the
latest one. SIGTERM saves at the next step boundary and exits 0.
"""

import sys
import tempfile

from pixrec_jax import config_lib, distributed


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    cfg, workdir = config_lib.parse_args(argv)
    # Before anything touches a device: every process of a multi-host job joins first.
    joined = distributed.maybe_initialize(cfg)
  except ValueError as e:  # a ConfigError, or distributed settings that cannot work
    print(f"error: {e}", file=sys.stderr)
    return 2
  if workdir is None:
    if joined:
      print("error: a multi-process job needs --workdir, the same path on every process", file=sys.stderr)
      return 2
    workdir = tempfile.mkdtemp(prefix="pixrec_jax_")
    print(f"no --workdir given: writing to {workdir}")
  from pixrec_jax.train import checkpoint, run  # after argument errors, which need no jax

  try:
    run.train_and_evaluate(cfg, workdir)
  except (run.NonFiniteLossError, checkpoint.CheckpointMismatchError, checkpoint.NonFiniteStateError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  # A run stopped by SIGTERM has saved its checkpoint: that is a success (exit 0) too.
  return 0


if __name__ == "__main__":
  sys.exit(main())
