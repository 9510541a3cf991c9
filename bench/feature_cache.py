"""Training with a frozen tower's features cached (train.cache_image_features) against encoding the pixels.

Builds the job as the main job does (pixrec_jax.train.run.setup) twice, with train.cache_image_features
False and True, and runs the same training batches (same seed: the same windows) through each job's train
step, one at a time (a device sync after each): bench/length_buckets.py's loop (`run_steps`). The cached
run first encodes every catalogue image tile once (its time is reported apart, `encode_s`). Reports per setting the median seconds of the steps whose batch shape had been
compiled before (the steady step), the compile steps, the total, and the final loss (the same in both
runs, up to rounding). The state starts random (the trainer's random_state): values do not move times.
The config must freeze the vision tower (train.trainable=heads_lm_head, the paper option's, or
frozen_vision). `--eval-items N` also times the evaluation's catalogue pass (dense item embeddings, as
pixrec_jax.eval.ranking computes them) over the first N items, from pixels in one run and from the table in
the other, after the steps (`eval_s`, compilation included; `eval_embeddings`, kept to compare the two).
The last line is one JSON object with the figures.

  python bench/feature_cache.py --config configs/demo.py:paper --steps 60
  python bench/feature_cache.py --config configs/smolvlm_256m.py:paper --steps 12 --config.model.dtype=float32
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # bench/length_buckets.py's loop

from pixrec_jax import config_lib, host_memory  # pylint: disable=wrong-import-position
import length_buckets  # pylint: disable=wrong-import-position


def _eval_pass(items: int):
  """run_steps' `after`: the job's dense catalogue embeddings of the first `items` items, timed, read from the
  table where the run has one (as the job's evaluation does: run.eval_settings)."""
  def after(job, state, table):
    from pixrec_jax.eval import ranking  # pylint: disable=import-outside-toplevel
    from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel
    job.features_table = table
    keys = run.item_input_keys(job)[:items]
    start = time.perf_counter()
    emb = ranking.catalog_embeddings(job.trainer.graphdef, (state.params, state.frozen), job.builder, keys,
                                     job.mesh, run.eval_settings(job))
    return {"eval_items": items, "eval_s": round(time.perf_counter() - start, 2), "eval_embeddings": emb}
  return after


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--steps", type=int, default=40, help="train steps of each run")
  parser.add_argument("--eval-items", type=int, default=0, help="also time the catalogue's dense embeddings of "
                      "this many items, from pixels and from the table (0: not)")
  args, rest = parser.parse_known_args(argv)
  cfg, _ = config_lib.parse_args(["--config", args.config, *rest])
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax's CPU client
  results = {}
  for name, on in (("pixels", False), ("cached", True)):
    cfg, _ = config_lib.parse_args(["--config", args.config, *rest, f"--config.train.cache_image_features={on}"])
    with tempfile.TemporaryDirectory() as workdir:
      results[name] = r = length_buckets.run_steps(cfg, args.steps, workdir,
                                                   _eval_pass(args.eval_items) if args.eval_items else None)
    encoded = f"; the table encoded in {r['encode_s']} s first" if on else ""
    print(f"{name} (train.cache_image_features={on}): steady step {r['step_s']} s, {r['shapes']} shape(s) compiled "
          f"in {r['first_steps_s']} s, {r['total_s']} s in all{encoded}; final loss {r['final_loss']}", flush=True)
  pixels, cached = results["pixels"], results["cached"]
  if args.eval_items:
    diff = np.abs(pixels.pop("eval_embeddings") - cached.pop("eval_embeddings")).max()
    results["eval_max_abs_difference"] = float(diff)
    print(f"the catalogue pass over {args.eval_items} items: {pixels['eval_s']} s from pixels, {cached['eval_s']} s "
          f"from the table; the embeddings differ by at most {diff:.2g}", flush=True)
  out = {"bench": "feature_cache", "config": args.config, "device": jax.devices()[0].device_kind, **results,
         "steady_speedup": round(pixels["step_s"] / cached["step_s"], 3) if pixels["step_s"] and cached["step_s"]
         else None,
         "total_speedup": round(pixels["total_s"] / (cached["total_s"] + cached["encode_s"]), 3)}
  print(f"steady step: {out['steady_speedup']}x faster cached; in all, compilation and the table's encoding "
        f"included: {out['total_speedup']}x")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
