"""python -m pixrec_jax.main --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

Trains PixRec and evaluates it on held-out targets; writes DIR/metrics.json and
DIR/report.md (with the baselines of eval.baselines), recall_ndcg.png and gallery.html.
With --config.eval.seeds=0,1,2 it runs once per seed in DIR/seed_N and reports the
mean and standard deviation of every metric in DIR/report.md and DIR/report.json.
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
    from pixrec_jax import host_memory  # pylint: disable=import-outside-toplevel  # jax, once the arguments parse
    host_memory.prepare(cfg.cpu.reuse_step_memory)  # before jax makes its CPU client
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
  from pixrec_jax import compare  # after argument errors, which need no jax
  from pixrec_jax.train import checkpoint, run

  try:
    if cfg.eval.seeds:
      compare.run_seeds(cfg, workdir)
    else:
      run.train_and_evaluate(cfg, workdir)
  except compare.Preempted as e:
    print(f"pixrec_jax: {e}", flush=True)
  except (run.NonFiniteLossError, checkpoint.CheckpointMismatchError, checkpoint.NonFiniteStateError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  # A run stopped by SIGTERM has saved its checkpoint: that is a success (exit 0) too.
  return 0


if __name__ == "__main__":
  sys.exit(main())
