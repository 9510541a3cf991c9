"""Training with a frozen tower's features cached (train.cache_image_features) against encoding the pixels.

Builds the job as the main job does (pixrec_jax.train.run.setup) twice, with train.cache_image_features
False and True, and runs the same training batches (same seed: the same windows) through each job's train
step, one at a time (a device sync after each): bench/length_buckets.py's loop (`run_steps`). The cached
run first encodes every catalogue image tile once (its time is reported apart, `encode_s`). Reports per setting the median seconds of the steps whose batch shape had been
compiled before (the steady step), the compile steps, the total, and the final loss (the same in both
runs, up to rounding). The state starts random (the trainer's random_state): values do not move times.
The config must freeze the vision tower (train.trainable=heads_lm_head, the paper option's, or
frozen_vision). The last line is one JSON object with the figures.

  python bench/feature_cache.py --config configs/demo.py:paper --steps 60
  python bench/feature_cache.py --config configs/smolvlm_256m.py:paper --steps 12 --config.model.dtype=float32
"""

import argparse
import json
import pathlib
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # bench/length_buckets.py's loop

from pixrec_jax import config_lib, host_memory  # pylint: disable=wrong-import-position
import length_buckets  # pylint: disable=wrong-import-position


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--steps", type=int, default=40, help="train steps of each run")
  args, rest = parser.parse_known_args(argv)
  cfg, _ = config_lib.parse_args(["--config", args.config, *rest])
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax's CPU client
  results = {}
  for name, on in (("pixels", False), ("cached", True)):
    cfg, _ = config_lib.parse_args(["--config", args.config, *rest, f"--config.train.cache_image_features={on}"])
    with tempfile.TemporaryDirectory() as workdir:
      results[name] = r = length_buckets.run_steps(cfg, args.steps, workdir)
    encoded = f"; the table encoded in {r['encode_s']} s first" if on else ""
    print(f"{name} (train.cache_image_features={on}): steady step {r['step_s']} s, {r['shapes']} shape(s) compiled "
          f"in {r['first_steps_s']} s, {r['total_s']} s in all{encoded}; final loss {r['final_loss']}", flush=True)
  pixels, cached = results["pixels"], results["cached"]
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
