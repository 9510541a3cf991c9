"""python -m pixrec_jax.main --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

Trains PixRec and evaluates it on held-out targets; writes DIR/metrics.json.
"""

import sys
import tempfile

from pixrec_jax import config_lib


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    cfg, workdir = config_lib.parse_args(argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix="pixrec_jax_")
    print(f"no --workdir given: writing to {workdir}")
  from pixrec_jax.train.run import train_and_evaluate  # after argument errors, which need no jax

  train_and_evaluate(cfg, workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
