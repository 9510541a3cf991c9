"""Training on batches cut to the lengths they use (data.length_buckets) against the layout's static shapes.

Builds the job as the main job does (pixrec_jax.train.run.setup) twice, with data.length_buckets=0 and
with --buckets K, and runs the same training batches (same seed: the same windows) through each job's
train step, one at a time (a device sync after each). Reports, per setting: the median seconds of the
steps whose batch shape had been compiled before (the steady step), the seconds of the first step of
each new shape (compilation), the total, the shapes seen, and the share of the full pass's tokens and
of the image rows (or slots) encoded that are real. Both runs end at the same loss. The state starts
random (the trainer's random_state, as in bench/train_step.py): the values do not move the step's time.
The last line is one JSON object with the figures. The paper option's feature table (train.cache_image_features)
is on in both runs, as in training; session 20's figures in BENCHMARKS.md predate it (add
--config.train.cache_image_features=False to encode pixels as they did).

  python bench/length_buckets.py --config configs/demo.py:paper --steps 60
  python bench/length_buckets.py --config configs/smolvlm_256m.py:paper --steps 12 --config.model.dtype=float32
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from pixrec_jax import config_lib, host_memory


def _image_rows(batch: dict) -> tuple[int, int]:
  """(tiles, rows) the vision tower encodes (or a feature table gives): packed rows (data.image_budget) or
  slots; (0, 0) text only."""
  from pixrec_jax.data import features  # pylint: disable=import-outside-toplevel
  if "image_index" in batch:
    rows = len(batch[features.rows_key(batch)])
    return len(np.unique(batch["image_index"][batch["image_valid"].astype(bool)])), rows
  valid = batch.get("image_valid", np.zeros(0))
  return int(np.count_nonzero(valid)), int(valid.size)


def run_steps(cfg, steps: int, workdir: str, after=None) -> dict:
  """`steps` training batches of the job `cfg` builds through its train step, timed one by one (also
  bench/feature_cache.py's loop). With train.cache_image_features the table is encoded first (timed).
  after(job, state, table): more figures, measured once the steps have run."""
  # Imported once host_memory.prepare has run: importing the trainer starts jax's backends.
  from pixrec_jax.data import buckets, pipeline  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel

  job = run.setup(cfg, workdir)
  state = job.trainer.random_state(cfg.seed)
  start, table = time.perf_counter(), None
  if job.feature_cache:
    table = run.encode_features(job, state.params, state.frozen)
  encode_s = round(time.perf_counter() - start, 2) if table else None
  it = run._train_iterator(job, table)  # as training reads it
  seen, steady, first, real, total = set(), [], [], np.zeros(2), np.zeros(2)
  for _ in range(steps):
    batch = pipeline.split_bookkeeping(next(it))[0]
    key = buckets.shape_key(batch)
    tiles, rows = _image_rows(batch)
    real += [np.count_nonzero(batch["full_mask"]), tiles]
    total += [batch["full_mask"].size, rows]
    start = time.perf_counter()
    state, metrics = job.trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    (steady if key in seen else first).append(time.perf_counter() - start)
    seen.add(key)
  extra = after(job, state, table) if after else {}
  return {**extra, "length_buckets": job.length_buckets, "cache_image_features": job.feature_cache or None,
          "encode_s": encode_s, "steps": steps, "shapes": len(seen),
          "step_s": round(statistics.median(steady), 4) if steady else None,
          "first_steps_s": round(sum(first), 2), "total_s": round(sum(steady) + sum(first), 2),
          "real_token_share": round(real[0] / total[0], 3),
          "real_image_share": round(real[1] / total[1], 3) if total[1] else None,
          "final_loss": round(float(jax.device_get(metrics)["loss"]), 5)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--buckets", type=int, default=4, help="data.length_buckets of the cut run (default 4)")
  parser.add_argument("--steps", type=int, default=40, help="train steps of each run")
  args, rest = parser.parse_known_args(argv)
  results = {}
  cfg, _ = config_lib.parse_args(["--config", args.config, *rest])
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax's CPU client
  for name, k in (("static", 0), ("cut", args.buckets)):
    cfg, _ = config_lib.parse_args(["--config", args.config, *rest, f"--config.data.length_buckets={k}"])
    with tempfile.TemporaryDirectory() as workdir:
      results[name] = run_steps(cfg, args.steps, workdir)
    r = results[name]
    print(f"{name} (data.length_buckets={k}): steady step {r['step_s']} s, {r['shapes']} shape(s) compiled in "
          f"{r['first_steps_s']} s, {r['total_s']} s in all; real: {r['real_token_share']:.0%} of the full pass's "
          f"tokens, {r['real_image_share'] or 0:.0%} of the images encoded; final loss {r['final_loss']}", flush=True)
  static, cut = results["static"], results["cut"]
  out = {"bench": "length_buckets", "config": args.config, "device": jax.devices()[0].device_kind,
         "buckets": args.buckets, **{f"{k}": v for k, v in results.items()},
         "steady_speedup": round(static["step_s"] / cut["step_s"], 3) if static["step_s"] and cut["step_s"] else None,
         "total_speedup": round(static["total_s"] / cut["total_s"], 3)}
  print(f"steady step: {out['steady_speedup']}x faster cut; in all, compilation included: {out['total_speedup']}x")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
